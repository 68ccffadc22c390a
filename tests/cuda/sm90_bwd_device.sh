#!/usr/bin/env bash
# One device session for the sm90 backward: the op library (carried, else built here), a smoke test
# (stops early on a hang or a wrong result), the pytest files, the fwd+bwd benchmark against SDPA
# flash / cuDNN (and our sm80 backward), compute-sanitizer memcheck. Logs and CSVs under $OUT; a
# short summary is printed last.
#
#   FA_LIB=build/bwd90/carry/_C.so tests/cuda/sm90_bwd_device.sh     # carry build/bwd90/carry and .devcache
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/bwd90-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/python:$PWD/tests/python"
export FLASH_ATTENTION_LIBRARY="$PWD/${FA_LIB:-build/bwd90/carry/_C.so}"
start=$SECONDS
say() { echo "[$((SECONDS - start))s] $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee -a "$OUT/summary.txt"

build_here() {
  mkdir -p /tmp/cutlass && tar xzf .devcache/cutlass_include.tgz -C /tmp/cutlass
  export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++  # the image's default gcc breaks torch error formatting
  cmake -S . -B build/dev90 -G Ninja -DFLASH_ATTENTION_BUILD_TORCH=ON -DFLASH_ATTENTION_BUILD_TESTS=OFF \
    -DFLASH_ATTENTION_CUDA_ARCHS=90a -DFLASH_ATTENTION_HEADDIMS="64;128" -DFLASH_ATTENTION_DTYPES=bf16 \
    -DCUTLASS_PATH=/tmp/cutlass >"$OUT/configure.log" 2>&1 && cmake --build build/dev90 -j16 >"$OUT/build.log" 2>&1
}

if ! python3 -c "import flash_attention as fa; print(fa.build_info())" >"$OUT/load.log" 2>&1; then
  say "carried library did not load ($(tail -1 "$OUT/load.log")); building"
  if ! build_here; then
    say "build failed"; tail -30 "$OUT/build.log"; exit 1
  fi
  export FLASH_ATTENTION_LIBRARY="$PWD/build/dev90/_C.so"
  grep -E "bwd_main|spill" "$OUT/build.log" | grep -v " 0 bytes spill" | head >>"$OUT/summary.txt"
fi
say "library: $(tail -1 "$OUT/load.log")"

timeout 90 python3 tests/cuda/sm90_bwd_smoke.py >"$OUT/smoke.log" 2>&1
rc=$?
tee -a "$OUT/summary.txt" <"$OUT/smoke.log"
say "smoke rc=$rc"
((rc == 124)) && exit 1  # a hang: nothing else would finish

timeout "${FA_TEST_TIMEOUT:-150}" python3 -m pytest tests/python/test_cuda_sm90_bwd.py tests/python/test_cuda_backward.py \
  -q -n 8 -p no:cacheprovider >"$OUT/pytest.log" 2>&1
say "pytest: $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30 | tee -a "$OUT/summary.txt"
((rc != 0)) && exit 1

bench() {
  timeout 100 python3 benchmarks/bench_gpu.py --dtypes bf16 --hdims 64,128 --seqlens 1024,4096,16384 --modes fwdbwd \
    --out "$OUT" "$@"
}
bench --impls sdpa-flash,sdpa-cudnn --name fwdbwd_sm90 >"$OUT/bench.log" 2>&1
say "benchmark rc=$?"
if [[ -n "${FA_BENCH_SM80:-}" ]]; then
  FLASH_ATTENTION_BWD_PATH=sm80 bench --impls "" --name fwdbwd_sm80bwd >"$OUT/bench_sm80.log" 2>&1
  say "benchmark (sm80 backward) rc=$?"
fi

timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 tests/cuda/sm90_bwd_smoke.py --small >"$OUT/memcheck.log" 2>&1
say "memcheck rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log")"
grep -A40 "^mode" "$OUT/bench.log"
[[ -f "$OUT/bench_sm80.log" ]] && grep -A40 "^mode" "$OUT/bench_sm80.log"
cat "$OUT/summary.txt" | grep -v "^mode" | tail -20
