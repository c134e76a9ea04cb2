"""Kernel-variant sweep on the GPU: the same cases timed under configurations the heuristics do not
pick, to choose tile sizes, pipeline depths and split counts from measurements (one device visit).

    python bench/sweep.py [gemm] [moe] [attention] [--json PATH] [--iters 20]

gemm: the four GPU MODE group GEMM cases (bench_group_gemm.GPUMODE_GROUP's row counts), W4A4 and W4A16, each config of PORTABLE and HOPPER (hopper
only on compute capability 9.0). moe: the MoE decode cases of bench_group_gemm.MOE (ragged, 1-16 rows per
expert), W4A4 and W4A16, over MOE_PORTABLE and MOE_HOPPER. attention: decode B=1 S=32768 and B=16 S=8192 (page 16) over
DECODE_CONFIGS x split multipliers, and prefill B=1 S=4096 over PREFILL_CONFIGS (32 query heads, 8 KV
heads, d128, fp16). Each output is compared with the default choice's output (max |diff|, printed), so
a broken variant shows. Configs are forced by replacing the heuristics (gemm.choose_config,
attention.tile_config, attention.choose_num_splits) for the duration of one call.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench_group_gemm import GPUMODE_GROUP
from common import Results, environment, gemm_operands, moe_bytes, moe_operands, require_gpu_or_exit, time_fn


# (block_m, warps_m, stages)
PORTABLE = [(128, 2, 4), (64, 1, 4)]
# (block_m, stages, row_blocks)
HOPPER = [(128, 8, 1), (128, 6, 2), (128, 8, 2), (128, 6, 1), (64, 8, 1)]
# MoE decode (few rows per expert): (block_m, warps_m, stages, sub_stages) and (block_m, stages, row_blocks)
MOE_PORTABLE = [(16, 1, 4, 1), (16, 1, 2, 2), (16, 1, 2, 4), (16, 1, 3, 4)]
MOE_HOPPER = [(16, 6, 2)]
# (block_n, warps, stages)
DECODE_CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 4), (128, 4, 2), (64, 2, 3)]
SPLIT_FACTORS = [1, 2, 4]
PREFILL_CONFIGS = [(64, 8, 2), (64, 8, 3), (32, 8, 3), (128, 8, 2), (64, 4, 2), (64, 4, 3)]


class forced:
    """Context manager: module.name replaced by fn."""

    def __init__(self, module, name, fn):
        self.module, self.name, self.fn = module, name, fn

    def __enter__(self):
        self.old = getattr(self.module, self.name)
        setattr(self.module, self.name, self.fn)

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.old)


def sweep_gemm(cp, res, iters):
    from cuflash import _jit, gemm

    rng = np.random.default_rng(0)
    hopper = _jit.device_cc(cp.cuda.Device().id) == (9, 0)
    for case, ms, N, K in GPUMODE_GROUP:  # the benchmark's row counts (uneven: tile padding matters)
        for form in ("W4A4", "W4A16"):
            tokens = "nvfp4" if form == "W4A4" else "float16"
            ops = [gemm_operands(cp, rng, 1, m, N, K, form) for m in ms]
            A, B, SB = [o[0][0] for o in ops], [o[1][0] for o in ops], [o[3][0] for o in ops]
            SA = None if form == "W4A16" else [o[2][0] for o in ops]
            out = [cp.empty((m, N), dtype=cp.float32) for m in ms]
            gemm.group_gemm(A, B, SA, SB, out=out)  # the default choice: the yardstick
            want = [o.copy() for o in out]
            configs = [gemm.GemmKernelConfig(tokens, bm, wm, st) for bm, wm, st in PORTABLE]
            if hopper:
                configs += [gemm.GemmKernelConfig(tokens, bm, 1, st, arch="hopper", row_blocks=rb) for bm, st, rb in HOPPER]
            for cfg in configs:
                name = cfg.kernel_name()
                try:
                    # calls with `out` replay their first launch (gemm._launch_cache): forget it
                    # before and after, so that each variant runs its own kernel
                    gemm._launch_cache.clear()
                    with forced(gemm, "choose_config", lambda *a, cfg=cfg, **k: cfg):
                        out = [cp.full((m, N), np.nan, dtype=cp.float32) for m in ms]
                        run = lambda: gemm.group_gemm(A, B, SA, SB, out=out)  # noqa: E731
                        run()
                        diff = max(float(cp.abs(o - w).max()) for o, w in zip(out, want))
                        t = time_fn(run, iters=iters)
                    gemm._launch_cache.clear()
                except Exception as exc:  # a variant that does not compile or launch: say so, go on
                    print(f"gemm {case} {form} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                res.add(f"gemm_{form}", case, name, t, max_abs_diff_vs_default=diff)
                print(f"gemm {case} {form} {name}: {t.median_us:.1f} us (max |diff| vs default {diff:.3g})", flush=True)


def sweep_moe(cp, res, iters):
    from bench_group_gemm import MOE
    from cuflash import _jit, gemm

    rng = np.random.default_rng(0)
    hopper = _jit.device_cc(cp.cuda.Device().id) == (9, 0)
    for case, G, rows, N, K in MOE:
        for form in ("W4A4", "W4A16"):
            tokens = "nvfp4" if form == "W4A4" else "float16"
            a, b, sa, sb, offsets = moe_operands(cp, rng, G, rows, N, K, form)
            total = a.shape[0]
            out = cp.empty((total, N), dtype=cp.float16)
            gemm.group_gemm_ragged(a, b, sa, sb, offsets, out=out)  # the default choice: the yardstick
            want = out.astype(cp.float32)
            configs = [gemm.GemmKernelConfig(tokens, bm, wm, st, sub_stages=sub) for bm, wm, st, sub in MOE_PORTABLE]
            if hopper:
                configs += [gemm.GemmKernelConfig(tokens, bm, 1, st, arch="hopper", row_blocks=rb)
                            for bm, st, rb in MOE_HOPPER]
            nbytes = moe_bytes(G, total, N, K, form)
            for cfg in configs:
                name = cfg.kernel_name()
                try:
                    gemm._launch_cache.clear()
                    with forced(gemm, "choose_config", lambda *a_, cfg=cfg, **k_: cfg):
                        out.fill(np.nan)
                        run = lambda: gemm.group_gemm_ragged(a, b, sa, sb, offsets, out=out)  # noqa: E731
                        run()
                        diff = float(cp.abs(out.astype(cp.float32) - want).max())
                        t = time_fn(run, iters=iters)
                    gemm._launch_cache.clear()
                except Exception as exc:
                    print(f"moe {case} {form} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                res.add(f"moe_{form}", case, name, t, max_abs_diff_vs_default=diff, nbytes=nbytes)
                print(f"moe {case} {form} {name}: {t.median_us:.1f} us, {nbytes / t.median_us / 1e6:.2f} TB/s "
                      f"(max |diff| vs default {diff:.3g})", flush=True)
            a = b = sa = sb = out = None
            cp.get_default_memory_pool().free_all_blocks()


def sweep_attention(cp, res, iters):
    import bench_attention as BA
    from cuflash import attention as A

    rng = np.random.default_rng(0)
    cases = [("decode", "B=1 S=32768", 1, 1, 32768, 16), ("decode", "B=16 S=8192", 16, 1, 8192, 16),
             ("prefill", "B=1 S=4096", 1, 4096, 4096, BA.PREFILL_PAGE_SIZE)]
    base_tile_config, base_splits = A.tile_config, A.choose_num_splits
    for role, case, batch, q_len, kv_len, page in cases:
        d = BA.build(cp, rng, batch, q_len, kv_len, page)
        indptr = None if q_len == 1 else np.arange(0, (batch + 1) * q_len, q_len, dtype=np.int32)

        def plan():
            return A.AttentionPlan(indptr, np.full(batch, kv_len), num_heads=BA.HEADS, num_kv_heads=BA.KV_HEADS,
                                   head_dim=BA.HEAD_DIM, page_size=page, dtype="float16",
                                   max_pages_per_seq=d["table"].shape[1])

        def run_with(p):
            return lambda: p.run(d["q"], d["k_pages"], d["v_pages"], d["table"], d["lens"], out=d["out"])

        run_with(plan())()
        want = d["out"].copy()
        variants = [(c, f) for c in DECODE_CONFIGS for f in SPLIT_FACTORS] if role == "decode" else \
            [(c, 1) for c in PREFILL_CONFIGS]
        for (bn, warps, stages), factor in variants:
            def tile(dtype, head_dim, r, max_smem=A.H100_SMEM_PER_BLOCK, bn=bn, warps=warps, stages=stages):
                return A.AttentionConfig(dtype, head_dim, bn, warps, stages)

            def splits(n_ctas, max_tiles, slots, factor=factor):
                return max(1, min(A.MAX_SPLITS, max_tiles, base_splits(n_ctas, max_tiles, slots) * factor))

            name = f"n{bn}_w{warps}_s{stages}_splits_x{factor}"
            try:
                with forced(A, "tile_config", tile), forced(A, "choose_num_splits", splits):
                    p = plan()
                d["out"].fill(np.nan)
                run = run_with(p)
                run()
                diff = float(cp.nanmax(cp.abs(d["out"].astype(cp.float32) - want.astype(cp.float32))))
                if bool(cp.isnan(d["out"]).any()):
                    diff = float("nan")
                t = time_fn(run, iters=iters)
            except Exception as exc:
                print(f"attention {role} {case} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            res.add(f"attention_{role}", case, name, t, max_abs_diff_vs_default=diff, plan=repr(p))
            print(f"attention {role} {case} {name}: {t.median_us:.1f} us (max |diff| vs default {diff:.3g}) {p!r}",
                  flush=True)
        d = None  # frees the pools
        cp.get_default_memory_pool().free_all_blocks()
    assert A.tile_config is base_tile_config and A.choose_num_splits is base_splits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", choices=("gemm", "moe", "attention"),
                    default=["gemm", "moe", "attention"])
    ap.add_argument("--json")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    cp = require_gpu_or_exit()
    res = Results()
    if "gemm" in args.what:
        sweep_gemm(cp, res, args.iters)
    if "moe" in args.what:
        sweep_moe(cp, res, args.iters)
    if "attention" in args.what:
        sweep_attention(cp, res, args.iters)
    if args.json:
        res.write_json(args.json, environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
