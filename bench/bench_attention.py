"""Paged attention benchmark: cuflash against torch SDPA (flash and cuDNN backends, contiguous K/V).

Cases (causal, fp16, 32 query heads, 8 KV heads, head dim 128):
- prefill B=1 S=4096, B=1 S=16384, B=8 S=2048, and a chunked prefill (1024 new queries on 8192 keys);
  TFLOP/s counts causal work only (the half square for q_len = kv_len: 4*B*H*S*S*D/2);
- decode B=1 S=32768, B=16 S=8192, B=64 S=4096, B=128 S=2048, page size 16 and 128; TB/s counts K and V
  read once (2 * B * S * kv_heads * head_dim * 2 bytes), against the copy-bandwidth ceiling measured here.

SDPA has no bottom-right causal mask, so it runs the prefill cases with is_causal=True (same thing when
q_len = kv_len), decode without a mask (one query sees every key) and skips the chunked case. Each peer
result also records cuflash's max |difference| from it (a quick correctness check on the GPU).

Timing: bench/common.time_fn, per call, the L2 flushed before each call by a write over twice its size
(``--flush clean``: then also a read, so the call starts with clean lines instead of dirty ones).

Usage: python bench/bench_attention.py [--quick] [--json PATH] [--plot PATH] [--flush write|clean]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from common import FLUSH_MODES, Results, environment, measure_ceilings, require_gpu_or_exit, time_fn

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
ELEM_BYTES = 2
PREFILL = [("B=1 S=4096", 1, 4096, 4096), ("B=1 S=16384", 1, 16384, 16384), ("B=8 S=2048", 8, 2048, 2048),
           ("chunked B=1 q=1024 kv=8192", 1, 1024, 8192)]  # (case, batch, q_len, kv_len)
DECODE = [("B=1 S=32768", 1, 32768), ("B=16 S=8192", 16, 8192), ("B=64 S=4096", 64, 4096), ("B=128 S=2048", 128, 2048)]
DECODE_PAGE_SIZES = (16, 128)
PREFILL_PAGE_SIZE = 16


def causal_flops(batch: int, q_len: int, kv_len: int) -> float:
    """4 * H * D per (query, visible key) pair; q_len = kv_len gives 4*B*H*S*S*D/2 (+ the diagonal)."""
    visible = sum(kv_len - q_len + i + 1 for i in range(q_len)) if q_len != kv_len else kv_len * kv_len / 2
    return 4.0 * batch * HEADS * HEAD_DIM * visible


def build(cp, rng, batch, q_len, kv_len, page_size):
    """Shuffled paged cache, queries, and the contiguous copies SDPA reads."""
    from cuflash import attention as A

    pages_per_seq = -(-kv_len // page_size)
    num_pages = batch * pages_per_seq
    perm = cp.asarray(rng.permutation(num_pages).astype(np.int32))
    table = perm.reshape(batch, pages_per_seq)
    k = cp.random.standard_normal((batch, kv_len, KV_HEADS, HEAD_DIM), dtype=cp.float32).astype(cp.float16)
    v = cp.random.standard_normal((batch, kv_len, KV_HEADS, HEAD_DIM), dtype=cp.float32).astype(cp.float16)
    k_pages = cp.full((num_pages, page_size, KV_HEADS, HEAD_DIM), np.nan, dtype=cp.float16)
    v_pages = cp.full_like(k_pages, np.nan)
    pad = pages_per_seq * page_size - kv_len
    kp = cp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch * pages_per_seq, page_size, KV_HEADS, HEAD_DIM)
    vp = cp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch * pages_per_seq, page_size, KV_HEADS, HEAD_DIM)
    k_pages[table.reshape(-1)] = kp
    v_pages[table.reshape(-1)] = vp
    q = cp.random.standard_normal((batch * q_len, HEADS, HEAD_DIM), dtype=cp.float32).astype(cp.float16)
    lens = cp.full((batch,), kv_len, dtype=cp.int32)
    indptr = None if q_len == 1 else np.arange(0, (batch + 1) * q_len, q_len, dtype=np.int32)
    plan = A.AttentionPlan(indptr, np.full(batch, kv_len), num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                           page_size=page_size, dtype="float16", max_pages_per_seq=pages_per_seq)
    out = cp.empty_like(q)
    return dict(q=q, k=k, v=v, k_pages=k_pages, v_pages=v_pages, table=cp.ascontiguousarray(table), lens=lens,
                plan=plan, out=out)


def sdpa_peers(torch, data, batch, q_len, kv_len, causal):
    """{backend name: callable} of torch SDPA on contiguous K/V, plus the reference output for the diff."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    tq = torch.from_dlpack(data["q"]).view(batch, q_len, HEADS, HEAD_DIM).transpose(1, 2)
    tk = torch.from_dlpack(data["k"]).transpose(1, 2)
    tv = torch.from_dlpack(data["v"]).transpose(1, 2)
    group = HEADS // KV_HEADS
    peers = {}
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        for gqa in (True, False):  # native GQA where the backend takes it, else K/V heads repeated
            k_, v_ = (tk, tv) if gqa else (tk.repeat_interleave(group, 1), tv.repeat_interleave(group, 1))
            kw = {"enable_gqa": True} if gqa else {}

            def fn(k_=k_, v_=v_, kw=kw, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(tq, k_, v_, is_causal=causal, **kw)

            try:
                ref = fn()
                torch.cuda.synchronize()
            except Exception:
                continue
            peers[name] = (fn, ref, "native GQA" if gqa else "K/V repeated per query head")
            break
    return peers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations and one case per group")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH")
    ap.add_argument("--flush", choices=FLUSH_MODES, default="write",
                    help="L2 flush before each timed call: a write over twice the L2 (default, the method of the "
                         "peer timings in ../shared/DEVICE.md), or that write then a read, leaving clean lines")
    args = ap.parse_args()
    cp = require_gpu_or_exit()
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    iters = 10 if args.quick else 50
    res = Results()
    timed = lambda fn, **kw: time_fn(fn, iters=iters, flush=args.flush, **kw)  # noqa: E731
    ceil = measure_ceilings(torch_available=torch is not None)
    print(f"copy bandwidth ceiling: {ceil['copy_TBps']:.2f} TB/s", file=sys.stderr)
    ext = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream) if torch is not None else None

    prefill = PREFILL[:1] + PREFILL[-1:] if args.quick else PREFILL
    for case, batch, q_len, kv_len in prefill:
        d = build(cp, rng, batch, q_len, kv_len, PREFILL_PAGE_SIZE)
        flops = causal_flops(batch, q_len, kv_len)
        run = lambda d=d: d["plan"].run(d["q"], d["k_pages"], d["v_pages"], d["table"], d["lens"], out=d["out"])
        res.add("prefill", case, "cuflash", timed(run), flops=flops, page_size=PREFILL_PAGE_SIZE,
                plan=repr(d["plan"]))
        if torch is not None and q_len == kv_len:
            for name, (fn, ref, how) in sdpa_peers(torch, d, batch, q_len, kv_len, causal=True).items():
                run()
                cp.cuda.Device().synchronize()
                ours = torch.from_dlpack(d["out"]).view(batch, q_len, HEADS, HEAD_DIM).transpose(1, 2)
                diff = float((ours.float() - ref.float()).abs().max())
                res.add("prefill", case, name, timed(fn, stream=ext), flops=flops, gqa=how,
                        max_abs_diff_cuflash=diff)
        del d
        cp.get_default_memory_pool().free_all_blocks()

    decode = DECODE[:1] if args.quick else DECODE
    for case, batch, kv_len in decode:
        nbytes = 2 * batch * kv_len * KV_HEADS * HEAD_DIM * ELEM_BYTES
        for ps in DECODE_PAGE_SIZES:
            d = build(cp, rng, batch, 1, kv_len, ps)
            run = lambda d=d: d["plan"].run(d["q"], d["k_pages"], d["v_pages"], d["table"], d["lens"], out=d["out"])
            r = res.add("decode", f"{case} page={ps}", "cuflash", timed(run), nbytes=nbytes, page_size=ps,
                        plan=repr(d["plan"]))
            r.extra["fraction_of_copy_bw"] = round(r.tbps / ceil["copy_TBps"], 3)
            if torch is not None and ps == DECODE_PAGE_SIZES[0]:
                for name, (fn, ref, how) in sdpa_peers(torch, d, batch, 1, kv_len, causal=False).items():
                    run()
                    cp.cuda.Device().synchronize()
                    ours = torch.from_dlpack(d["out"]).view(batch, 1, HEADS, HEAD_DIM).transpose(1, 2)
                    diff = float((ours.float() - ref.float()).abs().max())
                    res.add("decode", case, name, timed(fn, stream=ext), nbytes=nbytes, gqa=how,
                            max_abs_diff_cuflash=diff)
            del d
            cp.get_default_memory_pool().free_all_blocks()

    print(f"copy-bandwidth ceiling measured in this run: {ceil['copy_TBps']:.2f} TB/s")
    print(res.table())
    env = environment()
    env["copy_TBps"] = round(ceil["copy_TBps"], 3)
    env["l2_flush"] = args.flush
    if "fp16_TFLOPs" in ceil:
        env["fp16_matmul_TFLOPs"] = round(ceil["fp16_TFLOPs"], 1)
    if args.json:
        res.write_json(args.json, env)
    if args.plot:
        plot(res, args.plot)
    return 0


def plot(res: Results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, op, metric, unit in ((axes[0], "prefill", "tflops", "TFLOP/s"), (axes[1], "decode", "tbps", "TB/s")):
        recs = [r for r in res.records if r.op == op]
        cases = list(dict.fromkeys(r.case.split(" page=")[0] for r in recs))
        impls = list(dict.fromkeys(r.impl + (f" p{r.extra['page_size']}" if "page_size" in r.extra and op == "decode" else "")
                                   for r in recs))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            ys = []
            for c in cases:
                match = [r for r in recs if r.case.split(" page=")[0] == c and
                         (r.impl + (f" p{r.extra['page_size']}" if "page_size" in r.extra and op == "decode" else "")) == impl]
                ys.append(getattr(match[0], metric) if match else 0)
            ax.bar(np.arange(len(cases)) + i * width, ys, width, label=impl)
        ax.set_xticks(np.arange(len(cases)) + width * (len(impls) - 1) / 2, cases, rotation=20, fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(op)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
