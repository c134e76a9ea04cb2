"""End to end: LLaMA- and Mixtral-style models generating on cuflash kernels, against transformers.

Models (random init from a config, rounded to bf16; no downloads):
- llama: the Llama-3.2-1B shape (hidden 2048, 16 layers, 32 query / 8 KV heads of 64, intermediate 8192,
  llama3 RoPE, tied embeddings) with the vocabulary cut from 128256 to --vocab (default 32000);
- mixtral: Mixtral-8x7B's layer (hidden 4096, 32 / 8 heads of 128, 8 experts of 14336, top-2, vocab 32000)
  with 4 layers instead of 32.

cuflash runs every linear layer as NVFP4 (W4A16 GEMMs, gate/up through dual_gemm, experts through
group_gemm_ragged), fp16 activations, paged fp16 KV in one multi-layer cuflash.PagedKVCache, fp32
residual; the peer is transformers with the original bf16 weights and sdpa attention (dynamic and static
cache; static without torch.compile unless --hf-compile).

Reported, in one run:
1. agreement: greedy generation of prompts of 7, 31, 64 and 100 tokens for 32 steps against the same
   model holding the dequantized NVFP4 weights, run by transformers in fp32: max logit difference
   (teacher forced: the reference scores the runner's tokens), tokens (a swap is excused only where the
   reference's top-2 logits differ by less than the margin), free-running agreement, CUDA-graph decode and
   chunked prefill against eager one-call prefill; for Mixtral the same near-tie rule inside the model:
   where the reference's 2nd and 3rd router logits of a token are closer than the margin, the reference
   takes the runner's experts (any other routing difference fails), counts reported per prompt;
2. decode tokens/s at batch 1, 16 and 64 (prompts of 128 tokens, then --steps steps; one step = page
   bookkeeping, table uploads, the forward, the token read-back), eager and CUDA-graph replay;
3. prefill tokens/s (8 prompts of 512 tokens in one forward);
4. memory: weights (NVFP4 linears + bf16 embeddings / fp32 norms) against the bf16 model, KV per token.

Usage: python bench/bench_llm.py [--quick] [--json PATH] [--arch llama|mixtral|both] [--vocab N]
       [--steps N] [--hf-compile]
Exits 1 with one sentence where no GPU (or no torch / transformers) can be used, 2 when an agreement
check fails (the JSON is written first).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from common import Results, Timing, environment, require_gpu_or_exit

DECODE_BATCHES = (1, 16, 64)
DECODE_PROMPT = 128  # tokens of context before the timed decode steps
DECODE_STEPS = 64
PREFILL_BATCH, PREFILL_LEN = 8, 512  # 4096 tokens in one forward
CHECK_PROMPT_LENS = (7, 31, 64, 100)
CHECK_STEPS = 32  # the issue asks for >= 32 agreeing greedy steps
CHECK_CHUNK = 32  # chunked-prefill check: 32 tokens per sequence per forward
PAGE_SIZE = 16
# Logit tolerance relative to max(1, max |reference logit|): the tests' GPU tolerance (ten times what fp16
# activations and KV cost on the tiny configs when emulated in numpy). Top-2 logits closer than twice the
# tolerance may legitimately swap.
LOGIT_RTOL = 5e-3
TIE_MARGIN_RTOL = 2 * LOGIT_RTOL
# MoE routing: where the reference's k-th and (k+1)-th router logits of a token differ by less than this,
# relative to max(1, max |router logit|), either expert is a legitimate choice and the reference is made
# to take the runner's (check.align_routes); a clear-margin difference fails the check.
ROUTER_MARGIN_RTOL = TIE_MARGIN_RTOL
HF_REPEATS = 3


def _timing(seconds: list[float]) -> Timing:
    us = sorted(s * 1e6 for s in seconds)
    pick = lambda q: us[min(len(us) - 1, max(0, round(q * (len(us) - 1))))]  # noqa: E731
    return Timing(statistics.median(us), pick(0.2), pick(0.8), len(us))


def _wall(torch, fn, repeats: int) -> list[float]:
    """Wall-clock seconds of fn() (all GPU work included: the device is synchronised around it)."""
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _prompts(rng, vocab: int, lens) -> list[np.ndarray]:
    return [rng.integers(0, vocab, n) for n in lens]


# ----------------------------------------------------------------------------------------------
# Agreement against the fp32 reference
# ----------------------------------------------------------------------------------------------


def check_agreement(runner, ref, vocab: int, rng) -> dict:
    import contextlib

    from llm import check, reference as R

    prompts = _prompts(rng, vocab, CHECK_PROMPT_LENS)
    moe = bool(runner.spec.experts)
    gen = runner.generate(prompts, CHECK_STEPS, record_routes=moe)
    out = {"prompt_lens": list(CHECK_PROMPT_LENS), "steps": CHECK_STEPS, "per_prompt": []}
    if moe:
        out["router_margin_rtol"] = ROUTER_MARGIN_RTOL
    forcing = R.RouteForcing(ref, ROUTER_MARGIN_RTOL) if moe else None
    ok = True
    with forcing if moe else contextlib.nullcontext():
        for b, p in enumerate(prompts):
            pa = R.prompt_agreement(ref, p, gen.tokens[b], gen.logits[b], TIE_MARGIN_RTOL, forcing,
                                    gen.routes[b] if moe else None)
            tf, fr = pa.teacher_forced, pa.free_running
            logits_ok = tf.max_abs_diff <= LOGIT_RTOL * pa.scale
            ok &= tf.tokens_ok and fr.ok and logits_ok
            rec = {
                "max_abs_logit_diff": tf.max_abs_diff, "ref_max_abs_logit": tf.ref_max_abs, "tolerance": LOGIT_RTOL * pa.scale,
                "near_ties": tf.near_ties, "excused_swaps": tf.excused, "bad_steps": tf.bad_steps,
                "free_running_agreed_steps": fr.agreed, "free_running_ok": fr.ok,
            }
            if moe:
                st = pa.routes
                ok &= st.bad == 0
                rec["router"] = {"decisions": st.rows, "near_ties": st.near_ties, "forced": st.forced, "bad": st.bad,
                                 "max_abs_router_logit_diff": st.max_abs_logit_diff}
            out["per_prompt"].append(rec)
    graph = runner.generate(prompts, CHECK_STEPS, use_graph=True)
    out["graph_tokens_equal"] = bool(np.array_equal(graph.tokens, gen.tokens))
    out["graph_max_abs_logit_diff"] = float(np.abs(graph.logits - gen.logits).max())
    chunked = runner.generate(prompts, CHECK_STEPS, prefill_chunk=CHECK_CHUNK)
    out["chunked_prefill_ok"] = all(
        check.free_running(chunked.tokens[b], gen.tokens[b], gen.logits[b],
                           TIE_MARGIN_RTOL * max(1.0, float(np.abs(gen.logits[b]).max()))).ok
        for b in range(len(prompts)))
    out["chunked_first_logits_max_abs_diff"] = float(np.abs(chunked.logits[:, 0] - gen.logits[:, 0]).max())
    out["ok"] = bool(ok and out["graph_tokens_equal"] and out["chunked_prefill_ok"])
    return out


# ----------------------------------------------------------------------------------------------
# Throughput
# ----------------------------------------------------------------------------------------------


def bench_cuflash(runner, res: Results, arch: str, vocab: int, rng, steps: int, prefill_shape) -> None:
    b, n = prefill_shape
    prompts = _prompts(rng, vocab, [n] * b)
    runner.prefill(prompts)  # warm-up: kernels compiled, GEMM tables cached
    times = []
    for _ in range(HF_REPEATS):
        t0 = time.perf_counter()
        runner.prefill(prompts)  # ends with the logits read back
        times.append(time.perf_counter() - t0)
    t = _timing(times)
    res.add("prefill", f"{arch} B={b} S={n}", "cuflash", t, tokens_per_s=round(b * n / (t.median_us * 1e-6)))
    for batch in DECODE_BATCHES:
        prompts = _prompts(rng, vocab, [DECODE_PROMPT] * batch)
        for graph in (False, True):
            runner.generate(prompts, 4, use_graph=graph, keep_logits=False)  # warm-up
            step_times: list[float] = []
            runner.generate(prompts, steps + 1, use_graph=graph, keep_logits=False, step_times=step_times)
            t = _timing(step_times)
            res.add("decode", f"{arch} B={batch} ctx={DECODE_PROMPT}+{steps}", "cuflash graph" if graph else "cuflash",
                    t, tokens_per_s=round(batch / (t.median_us * 1e-6)))


def bench_hf(torch, peer, res: Results, arch: str, vocab: int, steps: int, prefill_shape, caches) -> None:
    b, n = prefill_shape
    dev = next(peer.parameters()).device
    ids = torch.randint(0, vocab, (b, n), device=dev)
    with torch.no_grad():
        fwd = lambda: peer(input_ids=ids, logits_to_keep=1)  # noqa: E731
        fwd()
        t = _timing(_wall(torch, fwd, HF_REPEATS))
    res.add("prefill", f"{arch} B={b} S={n}", "transformers bf16", t, tokens_per_s=round(b * n / (t.median_us * 1e-6)))
    for batch in DECODE_BATCHES:
        ids = torch.randint(0, vocab, (batch, DECODE_PROMPT), device=dev)
        for cache in caches:
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
            if cache != "dynamic":
                kw.update(cache_implementation="static", disable_compile=cache == "static")

            def gen(new_tokens, kw=kw, ids=ids):
                return lambda: peer.generate(input_ids=ids, max_new_tokens=new_tokens, **kw)

            gen(4)()  # warm-up (and compilation for "static+compile")
            prefill_only = statistics.median(_wall(torch, gen(1), HF_REPEATS))
            # per step = (time of 1 + steps tokens - time of 1 token) / steps, per repeat
            per_step = [(s - prefill_only) / steps for s in _wall(torch, gen(steps + 1), HF_REPEATS)]
            t = _timing(per_step)
            res.add("decode", f"{arch} B={batch} ctx={DECODE_PROMPT}+{steps}", f"transformers bf16 {cache}", t,
                    tokens_per_s=round(batch / (t.median_us * 1e-6)))


def memory(torch, weights, peer, runner) -> dict:
    ours = weights.nbytes()
    seen, peer_total, peer_linear = set(), 0, 0
    for name, p in peer.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        peer_total += p.numel() * p.element_size()
        if p.dim() >= 2 and "embed_tokens" not in name and ".gate.weight" not in name:
            peer_linear += p.numel() * p.element_size()
    if peer.config.tie_word_embeddings:  # the lm head shares the embedding in bf16; ours is a separate NVFP4 copy
        peer_linear += peer.lm_head.weight.numel() * peer.lm_head.weight.element_size()
    spec = weights.spec
    return {
        "weights_bytes": ours, "bf16_weights_bytes": peer_total,
        "weights_ratio_total": round(ours["total"] / peer_total, 3),
        "weights_ratio_linear_layers": round(ours["nvfp4_linear"] / peer_linear, 3),
        "kv_bytes_allocated": runner.kv_nbytes,
        "kv_bytes_per_token": 2 * spec.layers * spec.kv_heads * spec.head_dim * 2,  # fp16 K and V, same as bf16 peer
        "workspace_bytes": runner.ws.nbytes,
    }


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def run_arch(torch, arch: str, args, res: Results, rng) -> dict:
    from llm import convert, model as M, ops as O, reference as R

    shape = dict(convert.LLAMA_1B if arch == "llama" else convert.MIXTRAL_4L)
    shape["vocab"] = args.vocab
    prefill = (4, 256) if args.quick else (PREFILL_BATCH, PREFILL_LEN)
    max_seq = max(prefill[1], DECODE_PROMPT + args.steps + 1, max(CHECK_PROMPT_LENS) + CHECK_STEPS)
    cfg = convert.hf_config(arch, **shape, max_positions=131072 if arch == "llama" else 32768)
    t0 = time.perf_counter()
    model = convert.build_hf_model(cfg, seed=0, device="cuda")
    weights = convert.convert(model, on_gpu=True)
    peer = model.to(torch.bfloat16)  # in place: the values are bf16 already, nothing is lost
    runner = M.Runner(O.CuflashOps(weights), max_batch=max(DECODE_BATCHES), max_seq_len=max_seq, page_size=PAGE_SIZE,
                      max_tokens=max(prefill[0] * prefill[1], max(DECODE_BATCHES) * DECODE_PROMPT))
    print(f"{arch}: built and converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    info = {"shape": shape, "peer_experts_implementation": getattr(peer.config, "_experts_implementation", None)}
    if not args.no_check:
        ref = R.reference_model(peer, weights)  # a float32 copy holding the dequantized weights
        info["agreement"] = check_agreement(runner, ref, args.vocab, rng)
        del ref
        torch.cuda.empty_cache()
        a = info["agreement"]
        print(f"{arch}: agreement {'ok' if a['ok'] else 'FAILED'}", file=sys.stderr)
        if not a["ok"]:  # what failed, so one run says it
            for k, v in a.items():
                for line in ([f"{k}: {v}"] if k != "per_prompt" else [f"prompt {i}: {p}" for i, p in enumerate(v)]):
                    print(f"  {line}", file=sys.stderr)
    bench_cuflash(runner, res, arch, args.vocab, rng, args.steps, prefill)
    caches = ("static",) if args.quick else ("dynamic", "static")
    bench_hf(torch, peer.eval(), res, arch, args.vocab, args.steps, prefill,
             caches + (("static+compile",) if args.hf_compile else ()))
    info["memory"] = memory(torch, weights, peer, runner)
    return info


def tokens_table(res: Results) -> str:
    rows = ["| op | case | impl | tokens/s | median us | vs best transformers |",
            "| --- | --- | --- | --- | --- | --- |"]
    best = {}
    for r in res.records:
        if r.impl.startswith("transformers"):
            best[(r.op, r.case)] = max(best.get((r.op, r.case), 0), r.extra["tokens_per_s"])
    for r in res.records:
        peer = best.get((r.op, r.case))
        ratio = f"{r.extra['tokens_per_s'] / peer:.2f}x" if peer and not r.impl.startswith("transformers") else ""
        rows.append(f"| {r.op} | {r.case} | {r.impl} | {r.extra['tokens_per_s']} | {r.median_us:.0f} | {ratio} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 decode steps, a smaller prefill, static cache peer only")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--arch", choices=("llama", "mixtral", "both"), default="both")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (Llama-3.2-1B has 128256)")
    ap.add_argument("--steps", type=int, default=None, help=f"timed decode steps (default {DECODE_STEPS}, quick 16)")
    ap.add_argument("--hf-compile", action="store_true",
                    help="also time transformers with static cache + torch.compile")
    ap.add_argument("--no-check", action="store_true", help="skip the agreement checks")
    args = ap.parse_args()
    require_gpu_or_exit()
    try:
        import torch
        import transformers
    except ImportError as exc:
        print(f"This benchmark needs torch and transformers (the models and the peer come from them): {exc}.",
              file=sys.stderr)
        return 1
    from llm import reference as R

    args.steps = args.steps or (16 if args.quick else DECODE_STEPS)
    R.exact_fp32()
    rng = np.random.default_rng(0)
    res = Results()
    archs = ("llama", "mixtral") if args.arch == "both" else (args.arch,)
    meta = environment()
    meta["transformers"] = transformers.__version__
    meta["settings"] = {"decode_prompt": DECODE_PROMPT, "decode_steps": args.steps, "page_size": PAGE_SIZE,
                        "logit_rtol": LOGIT_RTOL, "tie_margin_rtol": TIE_MARGIN_RTOL, "vocab": args.vocab}
    for arch in archs:
        meta[arch] = run_arch(torch, arch, args, res, rng)
        torch.cuda.empty_cache()
    print(tokens_table(res))
    for arch in archs:
        m = meta[arch]["memory"]
        print(f"{arch}: weights {m['weights_bytes']['total'] / 1e9:.3f} GB vs bf16 "
              f"{m['bf16_weights_bytes'] / 1e9:.3f} GB "
              f"({m['weights_ratio_total']}x; linear layers {m['weights_ratio_linear_layers']}x); "
              f"KV {m['kv_bytes_per_token']} bytes/token, {m['kv_bytes_allocated'] / 1e9:.3f} GB allocated")
        if "agreement" in meta[arch]:
            a = meta[arch]["agreement"]
            worst = max(p["max_abs_logit_diff"] for p in a["per_prompt"])
            agreed = min(p["free_running_agreed_steps"] for p in a["per_prompt"])
            print(f"{arch}: agreement {'ok' if a['ok'] else 'FAILED'}: max |logit diff| {worst:.3g}, free-running "
                  f"agreement >= {agreed}/{a['steps']} steps, graph tokens equal {a['graph_tokens_equal']}, "
                  f"chunked prefill ok {a['chunked_prefill_ok']}")
    if args.json:
        res.write_json(args.json, meta)
    ok = all(meta[a].get("agreement", {"ok": True})["ok"] for a in archs)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
