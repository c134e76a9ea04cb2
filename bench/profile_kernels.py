"""Runs one kernel of one benchmark case a few times, for a profiler to look at (no timing here):

    ncu --set full -k regex:group_gemm --launch-skip 2 --launch-count 1 python3 bench/profile_kernels.py gemm-w4a16
    python3 bench/profile_kernels.py --list

Cases: the first GPU MODE group GEMM case (G=8, M=128, N=4096, K=7168) in W4A4 and W4A16 form, the
first MoE decode case (ragged, 64 experts of 1-16 rows, N=4096, K=7168) in W4A16 form, and
the attention benchmark's prefill B=1 S=4096 and decode B=1 S=32768 (32 query heads, 8 KV heads,
head dim 128). Set CUFLASH_GEMM_WGMMA=1 for the Hopper GEMM kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gemm_operands, moe_operands, require_gpu_or_exit  # noqa: E402


def gemm_case(cp, rng, form: str):
    from cuflash import gemm

    G, M, N, K = 8, 128, 4096, 7168
    A, B, SA, SB = gemm_operands(cp, rng, G, M, N, K, form)
    out = [cp.empty((M, N), dtype=cp.float16) for _ in range(G)]
    return lambda: gemm.group_gemm(A, B, SA, SB, out=out)


def moe_case(cp, rng):
    from cuflash import gemm

    N = 4096
    a, b, _, sb, offsets = moe_operands(cp, rng, 64, (1, 16), N, 7168, "W4A16")
    out = cp.empty((a.shape[0], N), dtype=cp.float16)
    return lambda: gemm.group_gemm_ragged(a, b, None, sb, offsets, out=out)


def attention_case(cp, rng, decode: bool):
    import bench_attention as BA

    batch, q_len, kv_len, page = (1, 1, 32768, 16) if decode else (1, 4096, 4096, BA.PREFILL_PAGE_SIZE)
    d = BA.build(cp, rng, batch, q_len, kv_len, page)
    return lambda: d["plan"].run(d["q"], d["k_pages"], d["v_pages"], d["table"], d["lens"], out=d["out"])


CASES = {
    "gemm-w4a4": lambda cp, rng: gemm_case(cp, rng, "W4A4"),
    "gemm-w4a16": lambda cp, rng: gemm_case(cp, rng, "W4A16"),
    "moe-w4a16": moe_case,
    "attn-prefill": lambda cp, rng: attention_case(cp, rng, False),
    "attn-decode": lambda cp, rng: attention_case(cp, rng, True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", nargs="?", choices=sorted(CASES))
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list or not args.case:
        print("\n".join(sorted(CASES)))
        return 0
    require_gpu_or_exit()
    import cupy as cp

    fn = CASES[args.case](cp, np.random.default_rng(0))
    for _ in range(args.runs):
        fn()
    cp.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
