"""Which part of the cuflash LLM runner makes its logits differ from the fp32 reference? (GPU)

Runs the agreement comparison of bench/bench_llm.py (same model, seed and prompts) four times, with the
attention and/or the GEMMs swapped for float64 stand-ins on the GPU:

    cuflash          the runner as benchmarked
    ref-attention    attention computed by cuflash.reference (float64) from the same fp16 pages
    ref-gemm         every GEMM computed in float64 on the dequantized weights (fp16 inputs as given)
    ref-both         both

fp16 activations, KV and outputs stay where the runner rounds them, so ref-both should land at the
rounding-only error that NumpyOps(precision="gpu") shows on the CPU (0.008-0.009 in the logits of the
Llama shape, NOTES.md). Prints max |logit - reference| per prompt and variant.

    python bench/llm_diagnose.py [--arch llama|mixtral] [--steps 32]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from common import require_gpu_or_exit


def reference_attention(cp, reference):
    def attention(self, layer, q, *, out=None, lse=None, return_lse=False):
        kp, vp = self.cache.layer(layer)
        o, _ = reference.paged_attention(cp.asnumpy(q), cp.asnumpy(kp), cp.asnumpy(vp), cp.asnumpy(self.block_table),
                                         cp.asnumpy(self.kv_lens), q_indptr=cp.asnumpy(self.q_indptr))
        out[...] = cp.asarray(o).astype(out.dtype)
        return out
    return attention


def reference_gemm_ops(O, reference, cp):
    """A CuflashOps subclass with float64 GEMMs on the GPU. Make it once: its instances share the
    dequantized weights (~9 GB for the Llama shape, slow to build on the host)."""
    deq_cache = {}  # id(w.data) -> (float64 q * s on the GPU, 1 / global scale)

    class RefGemmOps(O.CuflashOps):
        def _deq(self, w):
            key = id(w.data)
            if key not in deq_cache:
                data, scales = cp.asnumpy(w.data), cp.asnumpy(w.scales)
                if data.ndim == 3:
                    qs = np.stack([reference.dequantize_fp4(d, s) for d, s in zip(data, scales)])
                else:
                    qs = reference.dequantize_fp4(data, scales)
                inv = 1.0 / np.asarray(w.global_scale, dtype=np.float64)
                deq_cache[key] = (cp.asarray(qs), inv)
            return deq_cache[key]

        def linear(self, x, w, out):
            qs, inv = self._deq(w)
            out[...] = (x.astype(cp.float64) @ qs.T) * float(inv)

        def linear_multi(self, x, ws, outs):
            for w, o in zip(ws, outs):
                self.linear(x, w, o)

        def gated_mlp(self, x, gate, up, out):
            xf = x.astype(cp.float64)
            (qg, ig), (qu, iu) = self._deq(gate), self._deq(up)
            g, u = (xf @ qg.T) * float(ig), (xf @ qu.T) * float(iu)
            out[...] = g / (1.0 + cp.exp(-g)) * u

        def experts(self, x, w, offsets, out):
            qs, inv = self._deq(w)
            off = cp.asnumpy(offsets)
            for e in range(len(off) - 1):
                lo, hi = int(off[e]), int(off[e + 1])
                if hi > lo:
                    out[lo:hi] = (x[lo:hi].astype(cp.float64) @ qs[e].T) * float(inv[e])

    return RefGemmOps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("llama", "mixtral"), default="llama")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--variants", default="cuflash,ref-attention,ref-gemm,ref-both")
    args = ap.parse_args()
    cp = require_gpu_or_exit()
    from cuflash import attention as A, reference
    from llm import check, convert, model as M, ops as O, reference as R
    import bench_llm as B

    R.exact_fp32()
    shape = dict(convert.LLAMA_1B if args.arch == "llama" else convert.MIXTRAL_4L)
    cfg = convert.hf_config(args.arch, **shape, max_positions=131072 if args.arch == "llama" else 32768)
    hf = convert.build_hf_model(cfg, seed=0, device="cuda")
    weights = convert.convert(hf, on_gpu=True)
    ref = R.reference_model(hf, weights, inplace=True)
    prompts = B._prompts(np.random.default_rng(0), shape["vocab"], B.CHECK_PROMPT_LENS)
    original, ref_attention = A.PagedBatch.attention, reference_attention(cp, reference)
    ref_gemm_ops = reference_gemm_ops(O, reference, cp)
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        A.PagedBatch.attention = ref_attention if variant in ("ref-attention", "ref-both") else original
        ops_class = ref_gemm_ops if variant in ("ref-gemm", "ref-both") else O.CuflashOps
        runner = M.Runner(ops_class(weights), max_batch=len(prompts), max_seq_len=256, page_size=B.PAGE_SIZE,
                          max_tokens=512)
        gen = runner.generate(prompts, args.steps)
        diffs = []
        for b, p in enumerate(prompts):
            tf = check.teacher_forced(gen.tokens[b], gen.logits[b], R.teacher_forced_logits(ref, p, gen.tokens[b]), 0.0)
            diffs.append(round(tf.max_abs_diff, 4))
        print(f"{args.arch} {variant:14s} max |logit diff| per prompt {diffs} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        del runner
    A.PagedBatch.attention = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
