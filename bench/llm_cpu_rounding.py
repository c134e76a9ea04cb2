"""The logit error that fp16 rounding alone costs the LLM runner, on the CPU (no GPU needed).

Builds bench/bench_llm.py's model (same shape, seed and prompts), runs the runner on NumpyOps with
precision "gpu" (fp16 activations, KV and GEMM inputs, fp32 residual, rounded where CuflashOps rounds;
float64 arithmetic otherwise) and prints max |logit - fp32 reference| per prompt: the yardstick for
what the GPU runner should reach (bench/llm_diagnose.py there). The model is built on the CPU, so its
random weights are not those bench_llm.py builds on a GPU (another RNG stream): same shape and
distribution, a statistical yardstick. Needs torch and transformers, ~20 GB of
memory and a few minutes for the Llama shape:

    python bench/llm_cpu_rounding.py [--prompts 4] [--steps 32]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="how many of bench_llm's check prompts")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--precision", default="gpu", choices=("gpu", "exact"))
    args = ap.parse_args()
    from llm import check, convert, model as M, ops as O, reference as R
    import bench_llm as B

    R.exact_fp32()
    shape = dict(convert.LLAMA_1B)
    t0 = time.perf_counter()
    hf = convert.build_hf_model(convert.hf_config("llama", **shape, max_positions=131072), seed=0)
    weights = convert.convert(hf)
    ref = R.reference_model(hf, weights, inplace=True)
    prompts = B._prompts(np.random.default_rng(0), shape["vocab"], B.CHECK_PROMPT_LENS)[:args.prompts]
    runner = M.Runner(O.NumpyOps(weights, args.precision), max_batch=len(prompts), max_seq_len=256,
                      page_size=B.PAGE_SIZE, max_tokens=512)
    gen = runner.generate(prompts, args.steps)
    for b, p in enumerate(prompts):
        tf = check.teacher_forced(gen.tokens[b], gen.logits[b], R.teacher_forced_logits(ref, p, gen.tokens[b]), 0.0)
        print(f"llama {args.precision}: prompt {b} ({len(p)} tokens): max |logit diff| {tf.max_abs_diff:.4f} "
              f"(max |ref| {tf.ref_max_abs:.3f}), {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
