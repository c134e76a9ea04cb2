"""NVFP4 group GEMM, MoE decode and dual GEMM on the GPU: cuflash against its peers, same run.

Cases: the four GPU MODE group GEMM benchmark cases, the four dual GEMM cases, two MoE decode
cases (ragged layout) and one dense G=1 M=N=K=8192 case, each in W4A4 (NVFP4 tokens) and W4A16
(fp16 tokens) form. Peers, timed on the same inputs:
- ``cublas_fp16``: torch.matmul per group on fp16 operands dequantized beforehand (exact values);
- ``grouped_mm_bf16``: torch._grouped_mm on bf16 operands dequantized beforehand (if available);
- ``torch_dequant_matmul``: dequantize in torch, then torch.matmul, per call;
- ``floor``: max(FLOPs / fp16 matmul rate, bytes / copy bandwidth), both measured in this run.
Each cuflash output is checked against an fp32 torch matmul of the dequantized operands before
timing. Usage: python bench/bench_group_gemm.py [--quick] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

GPUMODE_GROUP = [
    ("gpumode_g8_n4096_k7168", [80, 176, 128, 72, 64, 248, 96, 160], 4096, 7168),
    ("gpumode_g8_n7168_k2048", [40, 76, 168, 72, 164, 148, 196, 160], 7168, 2048),
    ("gpumode_g2_n3072_k4096", [192, 320], 3072, 4096),
    ("gpumode_g2_n4096_k1536", [128, 384], 4096, 1536),
]
DENSE = [("dense_8192", [8192], 8192, 8192)]
DUAL = [(256, 4096, 7168), (512, 4096, 7168), (256, 3072, 4096), (512, 3072, 7168)]
MOE = [("moe_g64_1to16_n4096_k7168", 64, (1, 16), 4096, 7168), ("moe_g256_8_n2048_k7168", 256, (8, 8), 2048, 7168)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: the smallest cases, few iterations")
    ap.add_argument("--json", type=Path, help="write the records as JSON here")
    ap.add_argument("--plot", type=Path, help="draw a PNG of cuflash's speedup over cuBLAS fp16 here")
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args(argv)

    cp = common.require_gpu_or_exit()
    import numpy as np
    import torch

    from cuflash import gemm

    torch.backends.cuda.matmul.allow_tf32 = False
    iters = 5 if args.quick else args.iters
    dev = torch.device("cuda")
    stream = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    ceil = common.measure_ceilings(torch_available=True)
    res = common.Results()
    gen = torch.Generator(device="cuda").manual_seed(0)
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], device=dev)

    def packed(rows, k):
        return torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, device=dev, generator=gen)

    def scales(rows, k, scale=1.0):
        v = torch.exp2(torch.rand((rows, k // 16), device=dev, generator=gen) * 4 - 3) * scale
        return v.to(torch.float8_e4m3fn).view(torch.uint8)

    def dequant(p, s, dtype=torch.float32):
        q = torch.stack([e2m1[(p & 15).long()], e2m1[(p >> 4).long()]], dim=-1).reshape(p.shape[0], -1)
        return (q * s.view(torch.float8_e4m3fn).float().repeat_interleave(16, dim=1)).to(dtype)

    def tokens(form, rows, k, scale=1.0):
        """(A, its scales or None, its exact fp32 value): packed NVFP4 (W4A4) or fp16 (W4A16), its
        magnitude times ``scale`` (a power of two)."""
        if form == "W4A4":
            a, sa = packed(rows, k), scales(rows, k, scale)
            return a, sa, dequant(a, sa)
        a = (torch.randn(rows, k, device=dev, generator=gen) * scale).half()
        return a, None, a.float()

    def timed(fn, hide_host=False):
        return common.time_fn(fn, warmup=3 if args.quick else 5, iters=iters, stream=stream, hide_host=hide_host)

    def check(name, got, ref):
        got, ref = got.float(), ref.float()
        rms = ref.pow(2).mean().sqrt().item()
        err = ((got - ref).abs() - 2**-10 * ref.abs()).max().item()
        if not math.isfinite(err) or err > 1e-3 * rms:
            raise SystemExit(f"{name}: cuflash output differs from the reference (excess error {err:.3g}, rms {rms:.3g})")

    def floor_us(flops, nbytes):
        return max(flops / (ceil["fp16_TFLOPs"] * 1e12), nbytes / (ceil["copy_TBps"] * 1e12)) * 1e6

    def add_floor(op, case, flops, nbytes):
        us = floor_us(flops, nbytes)
        res.add(op, case, "floor", common.Timing(us, us, us, 0), flops=flops, nbytes=nbytes)

    # ------------------------------------------------------------------ group GEMM (list) + dense
    group_cases = GPUMODE_GROUP[-1:] if args.quick else GPUMODE_GROUP + DENSE
    for case, ms, n, k in group_cases:
        G = len(ms)
        B = [packed(n, k) for _ in ms]
        SB = [scales(n, k) for _ in ms]
        Bf = [dequant(b, s) for b, s in zip(B, SB)]
        for form in ("W4A4", "W4A16"):
            A, SA, Af = zip(*[tokens(form, m, k) for m in ms])
            A, Af = list(A), list(Af)
            SA = list(SA) if form == "W4A4" else None
            out = [torch.empty(m, n, device=dev, dtype=torch.float16) for m in ms]
            run = lambda: gemm.group_gemm(A, B, SA, SB, out=out)  # noqa: E731
            run()
            for o, a, b in zip(out, Af, Bf):
                check(f"{case} {form}", o, a @ b.T)
            flops = sum(2 * m * n * k for m in ms)
            a_bytes = sum(m * k // 2 + m * k // 16 for m in ms) if form == "W4A4" else sum(2 * m * k for m in ms)
            nbytes = a_bytes + G * (n * k // 2 + n * k // 16) + sum(2 * m * n for m in ms)
            op = f"group_gemm_{form}"
            res.add(op, case, "cuflash", timed(run), flops=flops, nbytes=nbytes)
            # the same launch three more ways: through a GemmPlan (no validation, no cache lookup), and
            # host-hidden (GPU time alone, see common.time_fn) for cuflash and cuBLAS
            plan = gemm.plan_group_gemm(A, B, SA, SB, out=out)
            res.add(op, case, "cuflash_plan", timed(plan.run), flops=flops, nbytes=nbytes)
            res.add(op, case, "cuflash_gpu_time", timed(run, hide_host=True), flops=flops, nbytes=nbytes)
            Ah, Bh = [a.half() for a in Af], [b.half() for b in Bf]
            cublas = lambda: [torch.matmul(a, b.T) for a, b in zip(Ah, Bh)]  # noqa: E731
            res.add(op, case, "cublas_fp16_gpu_time", timed(cublas, hide_host=True), flops=flops, nbytes=nbytes)
            res.add(op, case, "cublas_fp16", timed(cublas),
                    flops=flops, nbytes=nbytes)
            if hasattr(torch, "_grouped_mm"):
                try:
                    a_cat = torch.cat([a.bfloat16() for a in Af])
                    b_st = torch.stack([b.bfloat16() for b in Bf]).transpose(1, 2)  # [G, K, N], K-major
                    offs = torch.tensor(np.cumsum(ms), dtype=torch.int32, device=dev)
                    torch._grouped_mm(a_cat, b_st, offs=offs)
                    res.add(op, case, "grouped_mm_bf16", timed(lambda: torch._grouped_mm(a_cat, b_st, offs=offs)),
                            flops=flops, nbytes=nbytes)
                except Exception as exc:  # shapes or dtypes this torch build refuses
                    print(f"# torch._grouped_mm skipped for {case}: {exc}", file=sys.stderr)
            if form == "W4A4":
                deq = lambda: [torch.matmul(dequant(a, sa, torch.float16), dequant(b, sb, torch.float16).T)  # noqa: E731
                               for a, sa, b, sb in zip(A, SA, B, SB)]
            else:
                deq = lambda: [torch.matmul(a, dequant(b, sb, torch.float16).T) for a, b, sb in zip(A, B, SB)]  # noqa: E731
            res.add(op, case, "torch_dequant_matmul", timed(deq), flops=flops, nbytes=nbytes)
            add_floor(op, case, flops, nbytes)

    # ------------------------------------------------------------------ dual GEMM
    for m, n, k in DUAL[:1] if args.quick else DUAL:
        case = f"dual_m{m}_n{n}_k{k}"
        b1, b2, s1, s2 = packed(n, k), packed(n, k), scales(n, k), scales(n, k)
        B1f, B2f = dequant(b1, s1), dequant(b2, s2)
        for form in ("W4A4", "W4A16"):
            # silu(h1) * h2 multiplies two sums of K products: A at 1/16 of the usual size keeps it in fp16
            a, sa, Af = tokens(form, m, k, scale=1 / 16)
            out = torch.empty(m, n, device=dev, dtype=torch.float16)
            run = lambda: gemm.dual_gemm(a, b1, b2, sa, s1, s2, out=out)  # noqa: E731
            run()
            check(f"{case} {form}", out, torch.nn.functional.silu(Af @ B1f.T) * (Af @ B2f.T))
            flops = 4 * m * n * k
            a_bytes = (m * k // 2 + m * k // 16) if form == "W4A4" else 2 * m * k
            nbytes = a_bytes + 2 * (n * k // 2 + n * k // 16) + 2 * m * n
            op = f"dual_gemm_{form}"
            res.add(op, case, "cuflash", timed(run), flops=flops, nbytes=nbytes)
            Ah, B1h, B2h = Af.half(), B1f.half(), B2f.half()
            res.add(op, case, "cublas_fp16", timed(lambda: torch.nn.functional.silu(Ah @ B1h.T) * (Ah @ B2h.T)),
                    flops=flops, nbytes=nbytes)
            add_floor(op, case, flops, nbytes)

    # ------------------------------------------------------------------ MoE decode (ragged)
    for case, G, (lo, hi), n, k in MOE[:1] if args.quick else MOE:
        rows = torch.randint(lo, hi + 1, (G,), generator=torch.Generator().manual_seed(1))
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), rows.cumsum(0)]).to(torch.int32)
        total = int(offsets[-1])
        offsets_d = offsets.to(dev)
        b = torch.randint(0, 256, (G, n, k // 2), dtype=torch.uint8, device=dev, generator=gen)
        sb = scales(G * n, k).view(G, n, k // 16)
        for form in ("W4A4", "W4A16"):
            a, sa, Af = tokens(form, total, k)
            out = torch.empty(total, n, device=dev, dtype=torch.float16)
            run = lambda: gemm.group_gemm_ragged(a, b, sa, sb, offsets_d, out=out)  # noqa: E731
            run()
            ref = torch.empty(total, n, device=dev)
            for g in range(G):
                r0, r1 = int(offsets[g]), int(offsets[g + 1])
                ref[r0:r1] = Af[r0:r1] @ dequant(b[g], sb[g]).T
            check(f"{case} {form}", out, ref)
            flops = 2 * total * n * k
            nbytes = common.moe_bytes(G, total, n, k, form)
            op = f"moe_decode_{form}"
            res.add(op, case, "cuflash", timed(run), flops=flops, nbytes=nbytes)
            Bh = [dequant(b[g], sb[g], torch.float16) for g in range(G)]
            Ah = Af.half()
            segs = [(int(offsets[g]), int(offsets[g + 1])) for g in range(G)]
            res.add(op, case, "cublas_fp16", timed(lambda: [torch.matmul(Ah[r0:r1], Bh[g].T) for g, (r0, r1) in enumerate(segs)]),
                    flops=flops, nbytes=nbytes)
            add_floor(op, case, flops, nbytes)

    print(res.table(baseline_impl="cublas_fp16"))
    meta = {"env": common.environment(), "ceilings": ceil, "quick": args.quick, "iters": iters}
    for form in ("W4A4", "W4A16"):
        for suffix, how in (("", "per call"), ("_gpu_time", "GPU time, host hidden")):
            ours = {r.case: r.median_us for r in res.records
                    if r.op == f"group_gemm_{form}" and r.impl == f"cuflash{suffix}"}
            base = {r.case: r.median_us for r in res.records
                    if r.op == f"group_gemm_{form}" and r.impl == f"cublas_fp16{suffix}"}
            cases = [c for c, *_ in GPUMODE_GROUP if c in ours and c in base]
            if cases:
                gm = math.exp(sum(math.log(base[c] / ours[c]) for c in cases) / len(cases))
                meta[f"gpumode_geomean_speedup_vs_cublas_{form}{suffix}"] = gm
                print(f"GPU MODE cases, {form} ({how}): geometric-mean speedup over cuBLAS fp16 = {gm:.2f}x")
    if args.json:
        res.write_json(args.json, meta)
    if args.plot:
        _plot(res, args.plot)
    return 0


def _plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {(r.op, r.case): r.median_us for r in res.records if r.impl == "cublas_fp16"}
    rows = [(f"{r.op}\n{r.case}", base[(r.op, r.case)] / r.median_us) for r in res.records
            if r.impl == "cuflash" and (r.op, r.case) in base]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    ax.barh([n for n, _ in rows], [s for _, s in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speedup over cuBLAS fp16 on pre-dequantized operands (higher is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
