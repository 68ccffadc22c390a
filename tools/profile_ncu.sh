#!/usr/bin/env bash
# Nsight Compute summary of the kernels a Python script launches (on the GPU machine, after a build):
#   tools/profile_ncu.sh 'bwd_main|flash_bwd' script.py [count]
# Prints, per profiled kernel: duration, issue rate, eligible warps, stall summary, registers, shared
# memory, occupancy; the whole report goes to $OUT/ncu.txt. ncu locks clocks (H200: 1.35 GHz), so compare
# kernels within one report, not with do_bench timings. Session 3 used it on the hdim-256 backward
# (benchmarks/NOTES.md, run 3).
set -uo pipefail
regex="$1" script="$2" count="${3:-2}"
OUT="${OUT:-/tmp/fa-out}"
mkdir -p "$OUT"
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout 300 "$NCU" -k "regex:$regex" -c "$count" --section SpeedOfLight --section WarpStateStats \
  --section InstructionStats --section LaunchStats --section Occupancy --section SchedulerStats \
  python3 "$script" >"$OUT/ncu.txt" 2>&1
echo "ncu rc=$?"
grep -E "^  [a-z_ ]*void|^  [a-zA-Z_]+<|Duration|Issued Warp|No Eligible|Eligible Warps|Warp Cycles Per Issued|Registers Per|Dynamic Shared|Achieved Occupancy|Executed Instructions  " \
  "$OUT/ncu.txt" | cut -c1-150
