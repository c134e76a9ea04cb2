"""The end-to-end model runner (bench/llm): building blocks, the runner on numpy kernels, and the runner on
cuflash's kernels against transformers.

- numpy only (CI runs these): RoPE, RMSNorm, routing and the ragged expert layout, the agreement checker,
  and the runner on NumpyOps with random NVFP4 weights (batching, chunked prefill, graph-mode plumbing);
- torch + transformers (skipped without them): the NumpyOps runner against transformers' fp32 model
  holding the same (dequantized) weights, for LLaMA and Mixtral;
- GPU (``@pytest.mark.gpu``): the CuflashOps runner against the same reference, chunked prefill, and
  CUDA-graph decode against eager decode.
"""

import collections
import contextlib
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: bench.llm

import cuflash  # noqa: E402
from bench.llm import check, convert, model as M, ops as O  # noqa: E402

ARCHS = ("llama", "mixtral")
TINY = {"llama": convert.TINY_LLAMA, "mixtral": convert.TINY_MIXTRAL}
PROMPT_LENS = (5, 17, 33, 1)  # around page boundaries (16) and a one-token prompt
STEPS = 40  # greedy steps compared (the issue asks for >= 32)

# float64 NumpyOps against transformers' fp32 model: float32 round-off only (measured 5e-7 on logits of
# magnitude <= 1 on both tiny configs).
EXACT_LOGIT_ATOL = 1e-5
EXACT_TIE_MARGIN = 2 * EXACT_LOGIT_ATOL
# The GPU path (fp16 activations, fp16 KV, fp32 residual): NumpyOps(precision="gpu"), which rounds at the
# same points, measured 3.3e-4 .. 4.8e-4 on the tiny configs; the tolerance is ten times that, relative
# to max(1, max |reference logit|). Two logits closer than twice the tolerance may swap.
GPU_LOGIT_ATOL = 5e-3
GPU_TIE_MARGIN = 2 * GPU_LOGIT_ATOL


def _prompts(vocab, rng, lens=PROMPT_LENS):
    return [rng.integers(0, vocab, n) for n in lens]


# ----------------------------------------------------------------------------------------------
# Building blocks (numpy)
# ----------------------------------------------------------------------------------------------


def test_bf16_bits_to_f32(rng):
    x = rng.standard_normal(1000).astype(np.float32) * 10
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(M.bf16_bits_to_f32(np, bits), want)


def test_rms_norm_matches_formula(rng):
    x = rng.standard_normal((7, 96)) * 3
    w = rng.standard_normal(96).astype(np.float32)
    got = M.rms_norm(np, x, w, 1e-5, np.empty_like(x))
    want = np.stack([w * r / np.sqrt(np.mean(r * r) + 1e-5) for r in x])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_rope_rotates_each_frequency_pair_by_its_angle(rng):
    """Rotate-half RoPE = pair (x[i], x[i + D/2]) multiplied by exp(1j * position * inv_freq[i])."""
    D, heads, positions = 64, 3, np.array([0, 1, 17, 300])
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    cos, sin = M.rope_tables(inv_freq, 1.0, 512)
    x = rng.standard_normal((len(positions), heads, D))
    got = M.apply_rope(x, cos[positions], sin[positions], np.empty_like(x))
    z = (x[..., : D // 2] + 1j * x[..., D // 2:]) * np.exp(1j * positions[:, None, None] * inv_freq.astype(np.float64))
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], axis=-1), atol=1e-4)  # float32 angles
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity


def test_top_k_route_matches_a_sort(rng):
    logits = rng.standard_normal((50, 8))
    experts, weights = M.top_k_route(np, logits, 2)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.argsort(-p, axis=1)[:, :2]
    np.testing.assert_array_equal(experts, want)
    top = np.take_along_axis(p, want, axis=1)
    np.testing.assert_allclose(weights, top / top.sum(1, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_expert_layout_groups_rows_by_expert_in_token_order(rng, tokens):
    E, k = 8, 2
    experts = np.stack([rng.choice(E, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    offsets, dest = M.expert_layout(np, experts, E)
    flat = experts.reshape(-1)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=E))]))
    assert sorted(dest.tolist()) == list(range(flat.size))  # a permutation
    for e in range(E):  # expert e's block holds exactly its rows, in (token, slot) order
        rows = np.flatnonzero(flat == e)
        np.testing.assert_array_equal(dest[rows], np.arange(offsets[e], offsets[e + 1]))


def test_workspace_gives_fixed_buffers_and_refuses_overflow():
    ws = M.Workspace(np, 8)
    a = ws.get("x", 3, (4,), np.float32)
    b = ws.get("x", 8, (4,), np.float32)
    assert a.ctypes.data == b.ctypes.data and a.shape == (3, 4)
    assert ws.get("x", 2, (4,), np.float16).ctypes.data != a.ctypes.data  # another dtype, another buffer
    with pytest.raises(ValueError, match="exceeds the workspace"):
        ws.get("x", 9, (4,), np.float32)


# ----------------------------------------------------------------------------------------------
# The agreement checker (numpy)
# ----------------------------------------------------------------------------------------------


def test_teacher_forced_excuses_only_near_ties():
    ref = np.array([[0.0, 1.0, 0.999], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    ok = check.teacher_forced(np.array([2, 0, 2]), ref + 1e-4, ref, margin=0.01)  # step 0: a near tie, swapped
    assert ok.tokens_ok and ok.excused == 1 and ok.near_ties == 1
    assert ok.max_abs_diff == pytest.approx(1e-4) and ok.ref_max_abs == 3.0
    bad = check.teacher_forced(np.array([1, 1, 2]), ref, ref, margin=0.01)  # step 1: a clear winner missed
    assert bad.bad_steps == [1] and not bad.tokens_ok
    with pytest.raises(ValueError, match="do not match"):
        check.teacher_forced(np.array([1, 1]), ref, ref, margin=0.01)


def test_free_running_agreement():
    ref_logits = np.array([[0.0, 1.0], [0.5, 0.501], [1.0, 0.0]])
    same = check.free_running(np.array([1, 1, 0]), np.array([1, 1, 0]), ref_logits, 0.01)
    assert same.ok and same.agreed == 3
    tie = check.free_running(np.array([1, 0, 1]), np.array([1, 1, 0]), ref_logits, 0.01)
    assert tie.ok and tie.agreed == 1 and tie.diverged_at_near_tie
    clear = check.free_running(np.array([0, 1, 0]), np.array([1, 1, 0]), ref_logits, 0.01)
    assert not clear.ok and clear.agreed == 0


def test_align_routes_forces_only_near_ties():
    ref = np.array([
        [3.0, 1.0, 0.995, -1.0],  # 0: top-2 {0, 1}; the runner took 2 (0.005 below the 2nd): forced
        [3.0, 1.0, 0.5, -1.0],  # 1: the runner took 2, 0.5 below: bad
        [0.0, 2.0, 1.0, 0.5],  # 2: same set, other order: fine (the 2nd/3rd gap is 0.5: no tie)
        [1.0, 1.0, 1.0, 0.0],  # 3: the runner repeats an expert: bad
    ])
    experts = np.array([[2, 0], [0, 2], [2, 1], [0, 0]])
    runner = ref + 1e-4
    new, st = check.align_routes(ref, experts, margin_rtol=0.002, runner_logits=runner)  # margin 0.006 on rows 0-1
    assert (st.rows, st.near_ties, st.forced, st.bad) == (4, 2, 1, 2)  # ties: rows 0 and 3
    assert st.max_abs_logit_diff == pytest.approx(1e-4)
    np.testing.assert_array_equal(new[0], [3.0, 0.995, 1.0, -1.0])  # experts 1 and 2 trade logits
    assert set(np.argsort(-new[0])[:2]) == {0, 2}
    np.testing.assert_array_equal(new[1:], ref[1:])  # bad or agreeing rows are left alone
    with pytest.raises(ValueError, match="expected"):
        check.align_routes(ref, experts[:, :1].repeat(4, axis=1), 0.1)


# ----------------------------------------------------------------------------------------------
# The runner on NumpyOps with random NVFP4 weights (numpy only)
# ----------------------------------------------------------------------------------------------


def _quant(rng, *shape):
    x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if len(shape) == 2:
        t = cuflash.quantize(x)
        return convert.QuantWeight(t.data, np.asarray(t.scales).view(np.uint8), np.array(t.global_scale, np.float32))
    parts = [_quant(rng, *shape[1:]) for _ in range(shape[0])]
    return convert.QuantWeight(np.stack([p.data for p in parts]), np.stack([p.scales for p in parts]),
                               np.array([p.global_scale for p in parts], np.float32))


def random_weights(arch: str, seed: int = 0) -> convert.ModelWeights:
    """Random NVFP4 weights of a tiny config, built without torch."""
    rng = np.random.default_rng(seed)
    shape = TINY[arch]
    spec = convert.ModelSpec(arch, rms_eps=1e-5, **shape)
    H, I, E = spec.hidden, spec.intermediate, spec.experts

    def norm():
        return (1 + 0.1 * rng.uniform(-1, 1, H)).astype(np.float32)

    layers = []
    for _ in range(spec.layers):
        lw = convert.LayerWeights(norm(), norm(), _quant(rng, spec.q_dim, H), _quant(rng, spec.kv_dim, H),
                                  _quant(rng, spec.kv_dim, H), _quant(rng, H, spec.q_dim))
        if E:
            lw.router = (rng.standard_normal((E, H)) * 0.02).astype(ml_dtypes.bfloat16).astype(np.float32)
            lw.experts_gate_up, lw.experts_down = _quant(rng, E, 2 * I, H), _quant(rng, E, H, I)
        else:
            lw.gate, lw.up, lw.down = _quant(rng, I, H), _quant(rng, I, H), _quant(rng, H, I)
        layers.append(lw)
    D = spec.head_dim
    embed = (rng.standard_normal((spec.vocab, H)) * 0.02).astype(ml_dtypes.bfloat16).view(np.uint16)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    return convert.ModelWeights(spec, embed, norm(), _quant(rng, spec.vocab, H), inv_freq, 1.0, layers)


def _numpy_runner(weights, precision="exact", page_size=5, max_tokens=64, max_batch=4):
    return M.Runner(O.NumpyOps(weights, precision), max_batch=max_batch, max_seq_len=96, page_size=page_size,
                    max_tokens=max_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generation_equals_one_sequence_at_a_time(rng, arch):
    w = random_weights(arch)
    prompts = _prompts(w.spec.vocab, rng)
    runner = _numpy_runner(w)
    batched = runner.generate(prompts, 12)
    for b, p in enumerate(prompts):
        alone = runner.generate([p], 12)
        np.testing.assert_array_equal(alone.tokens[0], batched.tokens[b])
        np.testing.assert_allclose(alone.logits[0], batched.logits[b], rtol=0, atol=1e-12)
    assert runner.pages.free_pages == runner.pages.num_pages  # every page came back


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 7, 16])
@pytest.mark.parametrize("precision, atol", [("exact", 1e-12), ("gpu", 1e-3)])  # gpu: fp16 roundings may move
def test_chunked_prefill_equals_one_call(rng, arch, chunk, precision, atol):
    w = random_weights(arch)
    prompts = _prompts(w.spec.vocab, rng)
    runner = _numpy_runner(w, precision)
    whole = runner.generate(prompts, 8)
    chunked = runner.generate(prompts, 8, prefill_chunk=chunk)
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_allclose(chunked.logits, whole.logits, rtol=0, atol=atol)


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_mode_plumbing_equals_eager(rng, arch):
    """On numpy "capture" just runs the step: this checks that a decode step reads only its fixed buffers
    (tokens, positions, tables rewritten in place before each replay)."""
    w = random_weights(arch)
    prompts = _prompts(w.spec.vocab, rng)
    runner = _numpy_runner(w, precision="gpu")
    eager = runner.generate(prompts, 10)
    graph = runner.generate(prompts, 10, use_graph=True)
    np.testing.assert_array_equal(graph.tokens, eager.tokens)
    np.testing.assert_array_equal(graph.logits, eager.logits)


def test_runner_rejects_what_does_not_fit(rng):
    w = random_weights("llama")
    runner = _numpy_runner(w, max_tokens=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        runner.generate([rng.integers(0, 10, 90)], 10)
    with pytest.raises(ValueError, match="exceeds the workspace"):
        runner.generate([rng.integers(0, 10, 20)], 2)
    assert runner.pages.free_pages == runner.pages.num_pages
    with pytest.raises(ValueError, match="at least one token"):
        runner.generate([[]], 2)


class CuflashArgsCheckingOps(O.NumpyOps):
    """NumpyOps in the GPU path's dtypes that first passes every kernel call, as CuflashOps makes it, through
    cuflash's own argument validation (which runs on numpy arrays), and insists that no operand would be
    copied (a copy moves the operand: cached GEMM tables and CUDA-graph replays would miss it)."""

    def __init__(self, weights):
        super().__init__(weights, "gpu")
        self.calls = collections.Counter()

    @staticmethod
    def _no_copies(*descs):
        for d in descs:
            if d is not None:
                assert not d.needs_copy, f"{d.name} would be copied before the launch"

    def linear(self, x, w, out):
        self.linear_multi(x, [w], [out])

    def linear_multi(self, x, ws, outs):
        prods, tokens, odt = cuflash.gemm.validate_group_gemm([x] * len(ws), [w.data for w in ws], None,
                                                              [w.scales for w in ws], alpha=[w.alpha for w in ws],
                                                              out=list(outs))
        assert (tokens, odt) == ("float16", "float32")
        for p in prods:
            self._no_copies(p.a, *p.b, *p.sfb, p.out)
        self.calls["group_gemm"] += 1
        for w, o in zip(ws, outs):
            super().linear(x, w, o)

    def gated_mlp(self, x, gate, up, out):
        p, tokens, odt = cuflash.gemm.validate_dual_gemm(x, gate.data, up.data, None, gate.scales, up.scales,
                                                         alpha1=gate.alpha, alpha2=up.alpha, out=out)
        assert (tokens, odt) == ("float16", "float16")
        self._no_copies(p.a, *p.b, *p.sfb, p.out)
        self.calls["dual_gemm"] += 1
        super().gated_mlp(x, gate, up, out)

    def experts(self, x, w, offsets, out):
        rg, tokens, odt = cuflash.gemm.validate_group_gemm_ragged(x, w.data, None, w.scales, offsets,
                                                                  alpha=w.alpha, out=out)
        assert offsets.dtype == np.int32 and (tokens, odt) == ("float16", "float32")
        self._no_copies(rg.a, rg.b, rg.sfb, rg.out)
        self.calls["group_gemm_ragged"] += 1
        super().experts(x, w, offsets, out)

    def new_kv_cache(self, *args):
        cache = super().new_kv_cache(*args)
        cache.batch_class = CheckedBatch
        cache.calls = self.calls
        return cache


class CheckedBatch(O.NumpyBatch):
    """A numpy batch that first passes each append and attention, as cuflash's PagedBatch makes them, through
    cuflash's own host-side argument checks."""

    def append(self, layer, k, v):
        kp, vp = self.cache.layer(layer)
        cuflash.attention._check_append_args(k, v, kp, vp, self.block_table, self.kv_lens, self.q_indptr)
        self.cache.calls["append"] += 1
        super().append(layer, k, v)

    def attention(self, layer, q, *, out):
        # AttentionPlan.run's own checks (the plan itself needs a GPU; its fields are stood in for here)
        plan = types.SimpleNamespace(dtype="float16", total_q=q.shape[0], num_heads=q.shape[1],
                                     head_dim=self.cache.k_pages.shape[-1], page_size=self.cache.page_size,
                                     num_kv_heads=self.cache.k_pages.shape[-2], batch=self.batch,
                                     max_kv_len=int(self.kv_lens.max()))
        kp, vp = self.cache.layer(layer)
        cuflash.attention.AttentionPlan._check_run_args(plan, q, kp, vp, self.block_table, self.kv_lens, out, None)
        self.cache.calls["attention"] += 1
        return super().attention(layer, q, out=out)


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_calls_pass_cuflash_validation_without_copies(rng, arch):
    w = random_weights(arch)
    ops = CuflashArgsCheckingOps(w)
    runner = M.Runner(ops, max_batch=4, max_seq_len=96, page_size=16, max_tokens=64)
    prompts = _prompts(w.spec.vocab, rng)
    runner.generate(prompts, 6, prefill_chunk=7, use_graph=True)
    want = {"llama": {"group_gemm", "dual_gemm", "append", "attention"},
            "mixtral": {"group_gemm", "group_gemm_ragged", "append", "attention"}}
    assert set(ops.calls) == want[arch]


# ----------------------------------------------------------------------------------------------
# Against transformers (torch + transformers)
# ----------------------------------------------------------------------------------------------


def _hf(arch, seed=0):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bench.llm import reference as R

    hf = convert.build_hf_model(convert.hf_config(arch, **TINY[arch]), seed=seed)
    weights = convert.convert(hf)
    return hf, weights, R.reference_model(hf, weights), R


def test_dequantize_torch_matches_cuflash(rng):
    pytest.importorskip("torch")
    from bench.llm import reference as R

    w = _quant(rng, 3, 32, 64)
    got = R.dequantize_torch(w).numpy()
    for e in range(3):
        t = cuflash.nvfp4.NVFP4Tensor(w.data[e], w.scales[e].view(ml_dtypes.float8_e4m3fn), w.global_scale[e])
        np.testing.assert_array_equal(got[e], cuflash.dequantize(t))


def _compare(runner, ref, R, prompts, atol, margin, steps=STEPS):
    """Teacher-forced and free-running comparison of every prompt (MoE: the reference routed like the runner
    at router near ties, margin ``margin`` relative); returns the worst logit difference relative to
    max(1, max |ref|) and the routing statistics of the teacher-forced forwards, after asserting the token
    and routing rules."""
    moe = bool(runner.spec.experts)
    gen = runner.generate(prompts, steps, record_routes=moe)
    forcing = R.RouteForcing(ref, margin) if moe else None
    worst, routing = 0.0, check.RouteStats()
    with forcing if moe else contextlib.nullcontext():
        for b, p in enumerate(prompts):
            pa = R.prompt_agreement(ref, p, gen.tokens[b], gen.logits[b], margin, forcing, gen.routes[b] if moe else None)
            if moe:
                assert pa.routes.bad == 0, f"prompt {b}: experts differ from the reference with a clear margin"
                routing.add(pa.routes)
            tf, fr = pa.teacher_forced, pa.free_running
            assert tf.tokens_ok, f"prompt {b}: tokens differ from the reference with a clear margin at steps {tf.bad_steps}"
            worst = max(worst, tf.max_abs_diff / max(1.0, tf.ref_max_abs))
            assert fr.ok, f"prompt {b}: free-running tokens diverge at step {fr.agreed} without a near tie"
    assert worst <= atol, f"logits differ by {worst:.3g} (relative to max(1, max|ref|)), tolerance {atol}"
    return worst, routing


@pytest.mark.parametrize("arch", ARCHS)
def test_numpy_runner_matches_transformers(rng, arch):
    hf, weights, ref, R = _hf(arch)
    runner = M.Runner(O.NumpyOps(weights), max_batch=4, max_seq_len=80, page_size=5, max_tokens=64)
    _compare(runner, ref, R, _prompts(weights.spec.vocab, rng), EXACT_LOGIT_ATOL, EXACT_TIE_MARGIN)


def test_numpy_runner_routes_like_transformers(rng):
    """The exact runner's recorded routes are transformers' own: nothing forced, nothing bad."""
    hf, weights, ref, R = _hf("mixtral")
    runner = M.Runner(O.NumpyOps(weights), max_batch=4, max_seq_len=80, page_size=5, max_tokens=64)
    _, routing = _compare(runner, ref, R, _prompts(weights.spec.vocab, rng, (9, 21)), EXACT_LOGIT_ATOL,
                          EXACT_TIE_MARGIN, steps=8)
    layers = weights.spec.layers
    assert routing.rows == layers * (9 + 7 + 21 + 7) and routing.forced == 0 and routing.bad == 0
    assert routing.max_abs_logit_diff < EXACT_LOGIT_ATOL


def test_route_forcing_makes_the_reference_follow_the_runner(rng, monkeypatch):
    """A runner that takes every token's 3rd expert instead of its 2nd (the two router logits swapped): the
    reference told that every boundary is a tie follows it to float32 round-off; told that none is, it
    reports every first-layer decision as bad (later layers see other inputs and may agree by chance)."""
    hf, weights, ref, R = _hf("mixtral")
    original = M.top_k_route

    def third_for_second(xp, logits, k):
        order = np.argsort(-logits, axis=1)
        swapped = logits.copy()
        rows = np.arange(logits.shape[0])
        swapped[rows, order[:, 1]], swapped[rows, order[:, 2]] = logits[rows, order[:, 2]], logits[rows, order[:, 1]]
        return original(xp, swapped, k)

    monkeypatch.setattr(M, "top_k_route", third_for_second)
    runner = M.Runner(O.NumpyOps(weights), max_batch=4, max_seq_len=80, page_size=5, max_tokens=64)
    prompt = _prompts(weights.spec.vocab, rng, (11,))[0]
    gen = runner.generate([prompt], 6, record_routes=True)
    with R.RouteForcing(ref, 1e9) as forcing:
        got = R.teacher_forced_logits(ref, prompt, gen.tokens[0], forcing, gen.routes[0])
    assert forcing.stats.forced == forcing.stats.rows == weights.spec.layers * 16 and forcing.stats.bad == 0
    np.testing.assert_allclose(got, gen.logits[0], atol=EXACT_LOGIT_ATOL)
    assert np.abs(R.teacher_forced_logits(ref, prompt, gen.tokens[0]) - gen.logits[0]).max() > 100 * EXACT_LOGIT_ATOL
    with R.RouteForcing(ref, 0.0) as strict:
        R.teacher_forced_logits(ref, prompt, gen.tokens[0], strict, gen.routes[0])
    assert strict.stats.bad >= 16 and strict.stats.forced == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_holds_the_quantized_weights(rng, arch):
    """The tolerance sees quantization error: the original (unquantized) model is far outside it."""
    hf, weights, ref, R = _hf(arch)
    import torch

    p = _prompts(weights.spec.vocab, rng, (9,))[0]
    ids = torch.as_tensor(p)[None]
    with torch.no_grad():
        diff = float((hf(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max())
    assert diff > 100 * EXACT_LOGIT_ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_rounding_emulation_is_well_inside_the_gpu_tolerance(rng, arch):
    """NumpyOps(precision="gpu") rounds where CuflashOps does: its error is what right kernels cost, and the
    GPU tolerance leaves a factor of at least 5 over it."""
    hf, weights, ref, R = _hf(arch)
    runner = M.Runner(O.NumpyOps(weights, "gpu"), max_batch=4, max_seq_len=80, page_size=16, max_tokens=64)
    worst, _ = _compare(runner, ref, R, _prompts(weights.spec.vocab, rng), GPU_LOGIT_ATOL / 5, GPU_TIE_MARGIN)
    assert worst > EXACT_LOGIT_ATOL  # it really rounds


# ----------------------------------------------------------------------------------------------
# GPU: the runner on cuflash's kernels
# ----------------------------------------------------------------------------------------------


def _cuflash_runner(weights, max_tokens=64):
    return M.Runner(O.CuflashOps(weights, nan_fill_kv=True), max_batch=4, max_seq_len=80, page_size=16,
                    max_tokens=max_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuflash_runner_matches_reference(rng, arch):
    hf, weights, ref, R = _hf(arch)
    _compare(_cuflash_runner(weights), ref, R, _prompts(weights.spec.vocab, rng), GPU_LOGIT_ATOL, GPU_TIE_MARGIN)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 16])
def test_cuflash_chunked_prefill_same_tokens(rng, arch, chunk):
    _, weights, _, _ = _hf(arch)
    runner = _cuflash_runner(weights)
    prompts = _prompts(weights.spec.vocab, rng)
    whole = runner.generate(prompts, 16)
    chunked = runner.generate(prompts, 16, prefill_chunk=chunk)
    for b in range(len(prompts)):  # the same tokens, up to a swap at a near tie of the one-call logits
        fr = check.free_running(chunked.tokens[b], whole.tokens[b], whole.logits[b], GPU_TIE_MARGIN)
        assert fr.ok, f"prompt {b}: chunked prefill diverges at step {fr.agreed} without a near tie"
    np.testing.assert_allclose(chunked.logits[:, 0], whole.logits[:, 0], rtol=0, atol=GPU_LOGIT_ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuflash_graph_decode_equals_eager(rng, arch):
    """Replays read the tables, lengths, tokens and positions rewritten before each launch: the same kernels
    on the same inputs give the same tokens and (to the last bit, no atomics) the same logits."""
    _, weights, _, _ = _hf(arch)
    runner = _cuflash_runner(weights)
    prompts = _prompts(weights.spec.vocab, rng)
    eager = runner.generate(prompts, STEPS)
    graph = runner.generate(prompts, STEPS, use_graph=True)
    np.testing.assert_array_equal(graph.tokens, eager.tokens)
    np.testing.assert_allclose(graph.logits, eager.logits, rtol=0, atol=1e-6)
