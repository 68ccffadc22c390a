#!/usr/bin/env bash
# The test command: configure + build build/test, run the C++ tests (ctest) and the Python tests
# (pytest) against that build. Exits non-zero when anything fails.
#
#   tools/test.sh                      # everything
#   tools/test.sh -k varlen            # extra arguments go to pytest
#
# CUDA kernels are built when FLASH_ATTENTION_CUDA_ARCHS is set (e.g. "80;90a") or a GPU is present
# ("auto"); otherwise CPU only. Environment: FLASH_ATTENTION_BUILD_DIR (default build/test),
# FLASH_ATTENTION_JOBS (default: number of CPUs), CUTLASS_PATH, FLASH_ATTENTION_HEADDIMS, ..._DTYPES.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="${FLASH_ATTENTION_BUILD_DIR:-build/test}"
jobs="${FLASH_ATTENTION_JOBS:-$(nproc)}"
python="${PYTHON:-python3}"

if [[ -n "${FLASH_ATTENTION_CUDA_ARCHS:-}" ]]; then
  archs="$FLASH_ATTENTION_CUDA_ARCHS"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  archs=auto
else
  archs=none
fi

configure=(-S . -B "$build" -G Ninja -DFLASH_ATTENTION_BUILD_TORCH=ON -DFLASH_ATTENTION_BUILD_TESTS=ON
           -DFLASH_ATTENTION_CUDA_ARCHS="$archs" -DPython_EXECUTABLE="$(command -v "$python")")
[[ -n "${FLASH_ATTENTION_HEADDIMS:-}" ]] && configure+=(-DFLASH_ATTENTION_HEADDIMS="$FLASH_ATTENTION_HEADDIMS")
[[ -n "${FLASH_ATTENTION_DTYPES:-}" ]] && configure+=(-DFLASH_ATTENTION_DTYPES="$FLASH_ATTENTION_DTYPES")
[[ -n "${CUTLASS_PATH:-}" ]] && configure+=(-DCUTLASS_PATH="$CUTLASS_PATH")

echo "== configure ($build, CUDA archs: $archs)"
cmake "${configure[@]}"
echo "== build (-j$jobs)"
cmake --build "$build" -j "$jobs"

echo "== ctest"
ctest --test-dir "$build" --output-on-failure --no-tests=error -j "$jobs"

echo "== pytest"
[[ "$build" = /* ]] || build="$root/$build"
PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}" FLASH_ATTENTION_LIBRARY="$build/_C.so" \
  "$python" -m pytest "$root/tests/python" -q "$@"
echo "== all tests passed"
