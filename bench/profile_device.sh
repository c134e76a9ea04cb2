#!/usr/bin/env bash
# Nsight Compute on the benchmark cases of bench/profile_kernels.py, one text report each into $OUT
# (run from the repository root on the device). Sections: speed of light, compute and memory
# workload, scheduler and warp-state statistics, occupancy, launch and instruction statistics, source
# counters (uncoalesced global and shared accesses), and every warp stall reason.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-/tmp/cuflash-cache}
OUT=${OUT:-/tmp/cuflash-out}
mkdir -p "$OUT"
sections=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
          --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats
          --section InstructionStats --section SourceCounters
          # every stall reason, in cycles per issued instruction (the sections print only the top ones)
          --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio')
prof() {  # name kernel-regex case [env...]
  local name=$1 kernel=$2 case=$3; shift 3
  echo "=== $name"
  env "$@" timeout -k 5 "${PROFILE_TIMEOUT:-90}" ncu "${sections[@]}" -k "regex:$kernel" --launch-skip 2 --launch-count 1 \
    python3 bench/profile_kernels.py "$case" > "$OUT/ncu_$name.txt" 2>&1
  echo "exit $?"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Issued Ipc|No Eligible|Warp Cycles Per Issued" "$OUT/ncu_$name.txt" | head -12
}
prof gemm-w4a16 group_gemm gemm-w4a16
prof gemm-w4a4 group_gemm gemm-w4a4
prof gemm-w4a16-wgmma group_gemm gemm-w4a16 CUFLASH_GEMM_WGMMA=1
prof attn-prefill paged_attention_kernel attn-prefill
prof attn-decode paged_attention_kernel attn-decode
