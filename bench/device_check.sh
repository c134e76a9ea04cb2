#!/usr/bin/env bash
# One visit to the lent GPU (see ../shared/DEVICE.md): run from the repository root on the device,
#   bash bench/device_check.sh [stage ...]
# stages: info tests sanitize bench-quant bench-gemm bench-gemm-wgmma bench-attn bench-llm (default: all, in that order). Logs and JSON go
# to $OUT (the device tool's return folder) or /tmp/cuflash-out. Each stage's exit status is kept and
# a summary printed last, so one failing stage does not hide the others.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-/tmp/cuflash-cache}
out=${OUT:-/tmp/cuflash-out}
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info tests sanitize bench-quant bench-gemm bench-gemm-wgmma bench-attn bench-llm)
declare -A status

run_stage() {
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  status[$name]=${PIPESTATUS[0]}
}

for s in "${stages[@]}"; do
  case $s in
    info) run_stage info python3 -m cuflash info ;;
    tests) run_stage tests python3 -m pytest -m gpu -q -rs tests ;;
    # small cases only: the sanitizers slow kernels down 10-100x
    sanitize)
      run_stage memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 -m pytest -m gpu -q -x -k sanitize tests
      run_stage racecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
        python3 -m pytest -m gpu -q -x -k sanitize tests ;;
    bench-gemm) run_stage bench-gemm python3 bench/bench_group_gemm.py --json "$out/bench_group_gemm.json" ;;
    bench-quant) run_stage bench-quant python3 bench/bench_quantize.py --json "$out/bench_quantize.json" ;;
    bench-gemm-wgmma) run_stage bench-gemm-wgmma env CUFLASH_GEMM_WGMMA=1 python3 bench/bench_group_gemm.py --json "$out/bench_group_gemm_wgmma.json" ;;
    bench-llm) run_stage bench-llm python3 bench/bench_llm.py --json "$out/bench_llm.json" ;;
    bench-attn) run_stage bench-attn python3 bench/bench_attention.py --json "$out/bench_attention.json" ;;
    *) echo "unknown stage $s"; status[$s]=2 ;;
  esac
done

echo "=== summary"
rc=0
for s in "${!status[@]}"; do
  echo "$s: exit ${status[$s]}"
  [ "${status[$s]}" -ne 0 ] && rc=1
done
exit $rc
