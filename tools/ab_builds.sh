#!/usr/bin/env bash
# A/B of forward kernels across builds, on the GPU machine, in one command: builds each tree (bf16 only) in
# parallel, then runs benchmarks/ab_forward.py for each variant in alternating processes (the H200 runs at its
# power cap, so only alternation within one run compares builds) and prints TFLOP/s per shape and round.
#
#   TREES=". .wt/base" VARIANTS="new=.: base=.wt/base: new-nolazy=.:21" OUT=$OUT tools/ab_builds.sh
#
# A tree is a directory with this repository's sources: "." or an ignored .wt/<name> made here with
# `git archive <rev> | tar -x -C .wt/<name>` and passed to the device tool's `carry`. A variant is
# name=tree:mask, mask = FLASH_ATTENTION_SM90_FWD ("" = the tree's default). HD (head dims, default
# "64;128;256"), ROUNDS (2), JOBS (8), PROBE_ARGS (extra ab_forward.py arguments).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT="${OUT:-/tmp/fa-ab}"
mkdir -p "$OUT" /tmp/cutlass
tar xzf .devcache/cutlass_include.tgz -C /tmp/cutlass
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa-site .devcache/wheels/*.whl >/dev/null 2>&1
if [[ -x /usr/bin/g++ ]]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
variants="${VARIANTS:-new=.:}"
start=$SECONDS
for t in ${TREES:-.}; do
  name=$(basename "$(cd "$t" && pwd)")
  (cd "$t" && cmake -S . -B build/ab -G Ninja -DFLASH_ATTENTION_BUILD_TORCH=ON -DFLASH_ATTENTION_BUILD_TESTS=OFF \
     -DFLASH_ATTENTION_CUDA_ARCHS=90a -DCUTLASS_PATH=/tmp/cutlass -DFLASH_ATTENTION_HEADDIMS="${HD:-64;128;256}" \
     -DFLASH_ATTENTION_DTYPES=bf16 >/dev/null 2>&1 && cmake --build build/ab -j"${JOBS:-8}" >"$OUT/build_$name.log" 2>&1
   echo "build $t rc=$? at $((SECONDS - start)) s") &
  sleep 2  # the trees share /tmp/cutlass and /tmp/fa-site, unpacked above
done
wait
export PYTHONPATH="$ROOT/python:/tmp/fa-site" PYTHONUNBUFFERED=1
for r in $(seq "${ROUNDS:-2}"); do
  for v in $variants; do
    n=${v%%=*} rest=${v#*=}
    t=${rest%%:*} mask=${rest#*:}
    extra=""
    [[ $r == 1 && $v == "${variants%% *}" ]] && extra=--cudnn  # cuDNN once, with the first variant
    if [[ -n $mask ]]; then export FLASH_ATTENTION_SM90_FWD=$mask; else unset FLASH_ATTENTION_SM90_FWD; fi
    FLASH_ATTENTION_LIBRARY="$ROOT/$t/build/ab/_C.so" timeout 300 python3 benchmarks/ab_forward.py "$n@$r" $extra \
      ${PROBE_ARGS:-} >"$OUT/ab_${n}_$r.txt" 2>&1 || tail -3 "$OUT/ab_${n}_$r.txt"
  done
done
unset FLASH_ATTENTION_SM90_FWD
python3 - "$OUT" <<'PY'
import collections, glob, re, sys
rows, cudnn = collections.defaultdict(dict), {}
for f in sorted(glob.glob(sys.argv[1] + "/ab_*.txt")):
    for line in open(f):
        m = re.match(r"(\S+)@(\d+) d=(\d+) s=(\d+) causal=(\d) tflops=(\d+)(?: cudnn_tflops=(\d+))?", line)
        if m:
            key = (int(m[3]), int(m[4]), int(m[5]))
            rows[key].setdefault(m[1], []).append(m[6])
            if m[7]:
                cudnn[key] = m[7]
names = sorted({n for r in rows.values() for n in r})
print("hd   S      causal " + " ".join(f"{n:>14}" for n in names) + "  cudnn   (TFLOP/s per round)")
for key in sorted(rows):
    cells = " ".join(f"{'/'.join(rows[key].get(n, [])):>14}" for n in names)
    print(f"{key[0]:<4} {key[1]:<6} {key[2]:<6} {cells}  {cudnn.get(key, '')}")
PY
