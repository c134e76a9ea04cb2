#!/usr/bin/env bash
# One visit to the lent GPU (see ../shared/DEVICE.md): run from the repository root on the device,
#   bash bench/device_check.sh [stage ...]
# stages: info tests sanitize bench-quant bench-gemm bench-gemm-wgmma bench-attn bench-llm (the default:
# all of these, in that order), and on request gemm-tests (the GEMM tests with each kernel), sanitize-wgmma
# (the GEMM sanitizer cases on the wgmma kernel), llm-diagnose (bench/llm_diagnose.py), sweep (bench/sweep.py) and profile
# (bench/profile_device.sh: Nsight Compute reports). Logs and JSON go to a work folder that is packed after every stage
# into $OUT/results.tgz (the device tool returns at most 8 files a call). Each stage runs under its own
# time limit (STAGE_TIMEOUT seconds, default 240) and keeps its exit status; a summary comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-/tmp/cuflash-cache}
OUT=${OUT:-/tmp/cuflash-out}
work=/tmp/cuflash-work
mkdir -p "$OUT" "$work"
limit=${STAGE_TIMEOUT:-240}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info tests sanitize bench-quant bench-gemm bench-gemm-wgmma bench-attn bench-llm)
summary="$work/summary.txt"
: > "$summary"

run_stage() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  # console: the end of each log only; the whole log travels in results.tgz
  tail -n "${TAIL_LINES:-25}" "$work/$name.log"
  echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$summary"
  tar -C "$work" -czf "$OUT/results.tgz" . 2>/dev/null
}

for s in "${stages[@]}"; do
  case $s in
    info) run_stage info python3 -m cuflash info ;;
    # the GEMM tests once more on the portable kernel (on an H100 the default picks wgmma for some calls)
    # and the attention tests on the portable prefill kernel (on an H100 prefill defaults to wgmma)
    tests) run_stage tests python3 -m pytest -m gpu -q -rfEs tests
           run_stage tests-portable-gemm env CUFLASH_GEMM_WGMMA=0 python3 -m pytest -m gpu -q -rfEs \
             tests/test_gemm.py tests/test_gpumode.py
           run_stage tests-portable-attention env CUFLASH_ATTN_WGMMA=0 python3 -m pytest -m gpu -q -rfEs \
             tests/test_attention.py ;;
    # the GEMM tests alone: default kernel choice, then each kernel forced
    gemm-tests) run_stage gemm-tests python3 -m pytest -m gpu -q -rfEs tests/test_gemm.py tests/test_gpumode.py
                run_stage gemm-tests-wgmma env CUFLASH_GEMM_WGMMA=1 python3 -m pytest -m gpu -q -rfEs -x \
                  tests/test_gemm.py tests/test_gpumode.py
                run_stage gemm-tests-portable env CUFLASH_GEMM_WGMMA=0 python3 -m pytest -m gpu -q -rfEs -x \
                  tests/test_gemm.py tests/test_gpumode.py ;;
    sanitize-wgmma)
      run_stage memcheck-wgmma env CUFLASH_GEMM_WGMMA=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 -m pytest -m gpu -q -x -k "sanitize and gemm" tests
      run_stage racecheck-wgmma env CUFLASH_GEMM_WGMMA=1 compute-sanitizer --tool racecheck --error-exitcode 1 \
        python3 -m pytest -m gpu -q -x -k "sanitize and gemm" tests
      run_stage synccheck-wgmma env CUFLASH_GEMM_WGMMA=1 compute-sanitizer --tool synccheck --error-exitcode 1 \
        python3 -m pytest -m gpu -q -x -k "sanitize and gemm" tests ;;
    # small cases only: the sanitizers slow kernels down 10-100x
    sanitize)
      run_stage memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 -m pytest -m gpu -q -x -k sanitize tests
      run_stage racecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
        python3 -m pytest -m gpu -q -x -k sanitize tests ;;
    bench-gemm) run_stage bench-gemm python3 bench/bench_group_gemm.py --json "$work/bench_group_gemm.json" ;;
    bench-quant) run_stage bench-quant python3 bench/bench_quantize.py --json "$work/bench_quantize.json" ;;
    bench-gemm-wgmma) run_stage bench-gemm-wgmma env CUFLASH_GEMM_WGMMA=1 python3 bench/bench_group_gemm.py --json "$work/bench_group_gemm_wgmma.json" ;;
    bench-llm) run_stage bench-llm python3 bench/bench_llm.py --json "$work/bench_llm.json" ;;
    bench-attn) run_stage bench-attn python3 bench/bench_attention.py --json "$work/bench_attention.json" ;;
    llm-diagnose) run_stage llm-diagnose python3 bench/llm_diagnose.py --arch llama ;;
    sweep) run_stage sweep python3 bench/sweep.py --json "$work/sweep.json" ;;
    profile) run_stage profile env OUT="$work" bash bench/profile_device.sh ;;
    *) echo "unknown stage $s" | tee -a "$summary" ;;
  esac
done

echo "=== summary"
cat "$summary"
! grep -qv ': exit 0,' "$summary"
