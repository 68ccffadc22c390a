#!/usr/bin/env bash
# One GPU session in one command: build (sm90a, which also runs the sm80 path), the C++ and Python test
# suites on the GPU, then the benchmarks. Logs and CSVs go to $OUT (default /tmp/fa-out); a short table
# is printed last. Carry `.devcache` (CUTLASS headers + wheels the GPU machine lacks; tools/make_devcache.sh
# makes it).
#
#   tools/device_check.sh                  # everything
#   FA_STEPS="build test" tools/device_check.sh
#   FA_HEADDIMS="64;128;256" FA_BENCH_SEQLENS=1024,4096,16384 tools/device_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/fa-out}"
LOG="$OUT/logs"   # packed into $OUT/logs.tgz at the end (the device tool returns at most 8 files)
mkdir -p "$LOG"
steps="${FA_STEPS:-build test bench}"
headdims="${FA_HEADDIMS:-64;128;256}"
seqlens="${FA_BENCH_SEQLENS:-1024,4096,16384}"
dtypes="${FA_BENCH_DTYPES:-bf16,fp16}"
bench_modes="${FA_BENCH_MODES:-fwd fwdbwd}"
start=$SECONDS
say() { echo "[$((SECONDS - start))s] $*" | tee -a "$OUT/summary.txt"; }

mkdir -p /tmp/cutlass && tar xzf .devcache/cutlass_include.tgz -C /tmp/cutlass
if compgen -G ".devcache/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa-site .devcache/wheels/*.whl \
    >"$LOG/wheels.log" 2>&1 || say "wheel install failed (see logs/wheels.log)"
fi
# The GPU machine's default compiler (/opt/gcc) ships a libstdc++ other than the one Python loads, and an
# op library built with it segfaults formatting any error; build with the system compiler there.
if [[ -x /usr/bin/g++ ]]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
export PYTHONPATH="$PWD/python:/tmp/fa-site" FLASH_ATTENTION_LIBRARY="$PWD/build/dev/_C.so" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee -a "$OUT/summary.txt"

if [[ " $steps " == *" build "* ]]; then
  t=$SECONDS
  cmake -S . -B build/dev -G Ninja -DFLASH_ATTENTION_BUILD_TORCH=ON -DFLASH_ATTENTION_BUILD_TESTS=ON \
    -DFLASH_ATTENTION_CUDA_ARCHS=90a -DCUTLASS_PATH=/tmp/cutlass -DFLASH_ATTENTION_HEADDIMS="$headdims" \
    >"$LOG/configure.log" 2>&1 && cmake --build build/dev -j16 >"$LOG/build.log" 2>&1
  rc=$?
  say "build rc=$rc in $((SECONDS - t)) s (head dims $headdims)"
  grep -E "spill|error" "$LOG/build.log" | grep -v " 0 bytes spill" | head -20 >>"$OUT/summary.txt"
  if ((rc != 0)); then
    tail -40 "$LOG/build.log"; tar czf "$OUT/logs.tgz" -C "$OUT" logs; exit 1
  fi
fi

if [[ " $steps " == *" test "* ]]; then
  t=$SECONDS
  ctest --test-dir build/dev -j8 --timeout 120 >"$LOG/ctest.log" 2>&1
  say "ctest rc=$? ($(grep -E 'tests passed|tests failed' "$LOG/ctest.log"))"
  timeout "${FA_TEST_TIMEOUT:-240}" python3 -m pytest tests/python -q -rs --timeout=600 -p no:cacheprovider -n 8 >"$LOG/pytest.log" 2>&1
  say "pytest: $(tail -1 "$LOG/pytest.log") in $((SECONDS - t)) s"
  grep -E "^(FAILED|ERROR)" "$LOG/pytest.log" | head -20 | tee -a "$OUT/summary.txt"
fi

if [[ " $steps " == *" bench "* ]]; then
  t=$SECONDS
  if [[ " $bench_modes " == *" fwd "* ]]; then
    timeout "${FA_BENCH_TIMEOUT:-120}" python3 benchmarks/bench_gpu.py --dtypes "$dtypes" --hdims 64,128,256 --seqlens "$seqlens" \
      --modes fwd --configs "${FA_BENCH_CONFIGS:-all}" --impls sdpa-flash,sdpa-cudnn,sdpa-efficient --out "$OUT" --name fwd \
      >"$LOG/bench_fwd.log" 2>&1
    grep -A200 "^mode" "$LOG/bench_fwd.log" | tee -a "$OUT/summary.txt"
  fi
  if [[ " $bench_modes " == *" fp8 "* ]]; then
    timeout "${FA_BENCH_TIMEOUT:-120}" python3 benchmarks/bench_gpu.py --dtypes e4m3 --hdims 64,128,256 --seqlens "$seqlens" \
      --modes fwd --impls sdpa-cudnn --out "$OUT" --name fwd_fp8 >"$LOG/bench_fp8.log" 2>&1
    grep -A200 "^mode" "$LOG/bench_fp8.log" | tee -a "$OUT/summary.txt"
  fi
  if [[ " $bench_modes " == *" fwdbwd "* ]]; then
    timeout "${FA_BENCH_TIMEOUT:-120}" python3 benchmarks/bench_gpu.py --dtypes "${FA_FWDBWD_DTYPES:-$dtypes}" --hdims 64,128,256 \
      --seqlens "${FA_FWDBWD_SEQLENS:-$seqlens}" --modes fwdbwd --impls sdpa-flash,sdpa-cudnn --out "$OUT" --name fwdbwd >"$LOG/bench_fwdbwd.log" 2>&1
    grep -A200 "^mode" "$LOG/bench_fwdbwd.log" | tee -a "$OUT/summary.txt"
    grep "peak memory" "$LOG/bench_fwdbwd.log" | tee -a "$OUT/summary.txt"
  fi
  say "benchmarks in $((SECONDS - t)) s"
fi
if [[ " $steps " == *" decode "* ]]; then
  timeout 90 python3 benchmarks/bench_decode.py --out "$OUT" >"$LOG/bench_decode.log" 2>&1
  say "decode benchmark rc=$?"; tail -20 "$LOG/bench_decode.log" | tee -a "$OUT/summary.txt"
fi

if [[ " $steps " == *" models "* ]]; then
  timeout 75 python3 benchmarks/bench_models.py --csv "$OUT/models.csv" >"$LOG/models.log" 2>&1
  say "model timings rc=$?"; tail -12 "$LOG/models.log" | tee -a "$OUT/summary.txt"
fi
say "done"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOG"
