"""The kernel backends of the runner: every step that is a kernel on the GPU, behind one small interface.

The runner (model.py) does the rest (embedding, RMSNorm, RoPE, routing, residuals) with ``ops.xp``
(numpy or CuPy) array code shared by both backends, so all of it is tested on the CPU.

Interface (x, out: backend arrays; w: a convert.QuantWeight whose arrays live on the backend's device)::

    xp, act_dtype, state_dtype     array module; GEMM-input / KV dtype; residual and GEMM-output dtype
    linear(x [T, K], w [N, K], out [T, N])                  out = x @ W^T
    linear_multi(x, [w_i], [out_i])                         several weights on one input (q, k, v)
    gated_mlp(x [T, H], gate [I, H], up [I, H], out [T, I]) out = silu(x @ Wg^T) * (x @ Wu^T)
    experts(x [R, K], w [E, N, K], offsets [E + 1], out [R, N])  rows offsets[e]:offsets[e+1] times expert e
    new_kv_cache(layers, num_pages, page_size, max_pages_per_seq) -> cache
    capture(fn) -> replay                                   run fn once now; replay() repeats it (CUDA graph)
    scope()                                                 context the generation loop runs in (the stream)

The cache is a ``cuflash.PagedKVCache`` (CuflashOps) or a ``NumpyKVCache`` with the same interface
(``pages``: the cuflash.attention.KVPageTable shared by all layers; ``add_sequence``, ``free_sequence``,
``nbytes``, ``batch(seq_ids, q_lens, num_heads=, max_kv_len=)``). Its batches are
``cuflash.attention.BatchState`` subclasses (cuflash's ``PagedBatch`` on the GPU): ``step()`` counts a
forward's tokens in every layer once and refreshes the batch's tables; ``append(layer, k, v)`` and
``attention(layer, q, out=)`` read only the batch's fixed buffers.

Two backends: ``CuflashOps`` (CuPy + cuflash kernels; fp16 activations and KV, fp32 residual and GEMM
outputs) and ``NumpyOps`` (cuflash.reference in float64 with the weights dequantized once; with
``precision="gpu"`` it rounds at the same points as CuflashOps, so its error against the fp32 reference
is what the GPU path should show when its kernels are right).
"""

from __future__ import annotations

import contextlib

import numpy as np

from cuflash import attention as attn
from cuflash import reference

PRECISIONS = ("exact", "gpu")


def _silu(x):
    return x / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------------------------
# numpy: cuflash.reference
# ----------------------------------------------------------------------------------------------


class NumpyOps:
    """float64 numpy kernels from cuflash.reference on the dequantized weights.

    precision "exact": activations, KV and residual in float64 (checks the runner's logic against
    transformers to float32 round-off); "gpu": fp16 GEMM inputs, KV, queries and attention outputs and an
    fp32 residual, rounded where CuflashOps rounds.
    Pools are NaN-filled: a slot read before it was written poisons the logits.
    """

    xp = np

    def __init__(self, weights, precision: str = "exact"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        from .convert import to_numpy

        self.weights = weights.map_arrays(to_numpy)
        self.spec = weights.spec
        self.precision = precision
        self.act_dtype = np.dtype(np.float16 if precision == "gpu" else np.float64)
        self.state_dtype = np.dtype(np.float32 if precision == "gpu" else np.float64)
        self._deq = {}  # id(data) -> float64 q * s, [N, K] or [E, N, K]

    def _qs(self, w) -> np.ndarray:
        """float64 ``q * s`` of a weight (the reference's dequantization, done once)."""
        key = id(w.data)
        if key not in self._deq:
            if w.data.ndim == 3:  # experts: one [N, K/2] slice at a time (reference reads 3-D as a GPU MODE L axis)
                self._deq[key] = np.stack([reference.dequantize_fp4(d, s) for d, s in zip(w.data, w.scales)])
            else:
                self._deq[key] = reference.dequantize_fp4(w.data, w.scales)
        return self._deq[key]

    @staticmethod
    def _inv_gs(w) -> np.ndarray:
        return 1.0 / w.global_scale.astype(np.float64)

    def linear(self, x, w, out):
        out[...] = (x.astype(np.float64) @ self._qs(w).T) * self._inv_gs(w)

    def linear_multi(self, x, ws, outs):
        for w, o in zip(ws, outs):
            self.linear(x, w, o)

    def gated_mlp(self, x, gate, up, out):
        xf = x.astype(np.float64)
        g = (xf @ self._qs(gate).T) * self._inv_gs(gate)
        u = (xf @ self._qs(up).T) * self._inv_gs(up)
        out[...] = _silu(g) * u

    def experts(self, x, w, offsets, out):
        qs, inv = self._qs(w), self._inv_gs(w)
        for e in range(len(offsets) - 1):
            lo, hi = int(offsets[e]), int(offsets[e + 1])
            out[lo:hi] = (x[lo:hi].astype(np.float64) @ qs[e].T) * inv[e]

    def new_kv_cache(self, layers: int, num_pages: int, page_size: int, max_pages_per_seq: int):
        return NumpyKVCache(layers, num_pages, page_size, self.spec.kv_heads, self.spec.head_dim, self.act_dtype,
                            max_pages_per_seq)

    def capture(self, fn):
        fn()
        return fn

    def scope(self):
        return contextlib.nullcontext()


class NumpyBatch(attn.BatchState):
    """A batch on numpy pools: cuflash's host bookkeeping (BatchState) with the host arrays themselves as
    the kernels' buffers (rewritten in place by step(), like PagedBatch's device buffers)."""

    def __init__(self, cache, seq_ids, q_lens=None):
        super().__init__(cache.pages, seq_ids, q_lens)
        self.cache = cache
        self.block_table, self.kv_lens, self.q_indptr = self.block_table_host, self.kv_lens_host, self.q_indptr_host

    def append(self, layer: int, k, v) -> None:
        kp, vp = self.cache.layer(layer)
        if k.shape != (self.total_q,) + kp.shape[2:]:
            raise ValueError(f"k: expected shape {(self.total_q,) + kp.shape[2:]}, got {k.shape}")
        slots = attn.slot_positions(self.kv_lens, self.q_lens, self.block_table, self.cache.page_size)
        flat = (-1,) + kp.shape[2:]
        kp.reshape(flat)[slots] = k
        vp.reshape(flat)[slots] = v

    def attention(self, layer: int, q, *, out):
        kp, vp = self.cache.layer(layer)
        o, _ = reference.paged_attention(q, kp, vp, self.block_table, self.kv_lens, q_indptr=self.q_indptr)
        out[...] = o
        return out


class NumpyKVCache:
    """cuflash.PagedKVCache's interface on numpy pools [layers, num_pages, page_size, kv_heads, D], NaN-filled
    (a slot read before it was written poisons the logits); bookkeeping by cuflash's KVPageTable."""

    def __init__(self, num_layers, num_pages, page_size, kv_heads, head_dim, dtype, max_pages_per_seq=None):
        self.pages = attn.KVPageTable(num_pages, page_size, max_pages_per_seq, num_layers=num_layers)
        shape = (num_layers, num_pages, page_size, kv_heads, head_dim)
        self.k_pages = np.full(shape, np.nan, dtype=dtype)
        self.v_pages = np.full(shape, np.nan, dtype=dtype)
        self.batch_class = NumpyBatch

    @property
    def page_size(self) -> int:
        return self.pages.page_size

    @property
    def nbytes(self) -> int:
        return int(self.k_pages.nbytes + self.v_pages.nbytes)

    def layer(self, i: int):
        i = self.pages._layer(i)
        return self.k_pages[i], self.v_pages[i]

    def add_sequence(self, seq_id=None) -> int:
        return self.pages.add_sequence(seq_id)

    def free_sequence(self, seq_id) -> None:
        self.pages.free_sequence(seq_id)

    def batch(self, seq_ids, q_lens=None, *, num_heads: int, max_kv_len=None):
        return self.batch_class(self, seq_ids, q_lens)


# ----------------------------------------------------------------------------------------------
# CuPy + cuflash
# ----------------------------------------------------------------------------------------------


class CapturedStep:
    """A CUDA graph of one decode step, with everything its replays read kept alive.

    ``pool``: the private memory pool the capture allocated from (temporaries freed during capture must
    never be handed to anyone else); ``plans``: the cuflash GemmPlans the graph launches (each holds its
    device problem table, which the graph points at).
    """

    def __init__(self, graph, stream, pool, plans):
        self.graph, self.stream, self.pool, self.plans = graph, stream, pool, plans

    def __call__(self):
        self.graph.launch(stream=self.stream)


PLAN_CACHE_LIMIT = 4096  # GEMM plans kept per backend (one per distinct shape/address set: prefill lengths vary)


def _akey(a):
    """What a GEMM plan depends on of a CuPy array: address, shape, strides, dtype."""
    return (a.data.ptr, a.shape, a.strides, a.dtype.str)


class CuflashOps:
    """CuPy arrays and cuflash kernels: W4A16 GEMMs (fp16 activations, fp32 outputs), the fused dual GEMM
    for gate/up, the ragged group GEMM for experts, paged KV append and attention on fp16 pools.

    Everything runs on ``self.stream`` (a non-blocking stream, so decode steps can be captured).
    GEMMs run through cuflash GemmPlans this backend makes once per distinct call (same arrays, same
    addresses: the runner's workspace keeps them fixed) and keeps; a captured step holds the plans it launches.
    ``nan_fill_kv`` fills the pools with NaN first (tests: an unwritten slot that is read poisons the logits).
    """

    act_dtype = np.dtype(np.float16)
    state_dtype = np.dtype(np.float32)

    def __init__(self, weights, *, nan_fill_kv: bool = False, device: int | None = None):
        from cuflash import _jit

        cp = _jit.require_gpu()
        self.xp = cp
        self.device = cp.cuda.Device(device)
        with self.device:
            self.stream = cp.cuda.Stream(non_blocking=True)
            self.weights = weights.map_arrays(lambda a: cp.ascontiguousarray(cp.asarray(a)))
            # The copies ran on the legacy stream, which a non-blocking stream does not wait for.
            self.device.synchronize()
        self.spec = weights.spec
        self.nan_fill_kv = nan_fill_kv
        self._plans = {}
        self._capturing = None  # the list of plans a capture in progress launches

    def scope(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self.device)
        stack.enter_context(self.stream)
        return stack

    def _run(self, key, make):
        """Launch the plan of a GEMM call on self.stream, making it first if this call is new."""
        plan = self._plans.get(key)
        if plan is None:
            if self._capturing is not None:  # making a plan uploads its table: not inside a capture
                raise RuntimeError(f"GEMM {key[0]}: no plan was made before the capture "
                                   "(the warm-up run must make every plan the step launches)")
            if len(self._plans) >= PLAN_CACHE_LIMIT:
                self._plans.clear()  # captured steps keep their own references
            plan = self._plans[key] = make()
        if self._capturing is not None:
            self._capturing.append(plan)
        plan.run(self.stream)

    def linear(self, x, w, out):
        import cuflash

        self._run(("linear", _akey(x), id(w), _akey(out)),
                  lambda: cuflash.plan_group_gemm([x], [w.data], None, [w.scales], alpha=w.alpha, out=[out]))

    def linear_multi(self, x, ws, outs):
        import cuflash

        # one launch for all products: the persistent grid walks the tiles of every weight
        self._run(("linear_multi", _akey(x), tuple(id(w) for w in ws), tuple(_akey(o) for o in outs)),
                  lambda: cuflash.plan_group_gemm([x] * len(ws), [w.data for w in ws], None, [w.scales for w in ws],
                                                  alpha=[w.alpha for w in ws], out=list(outs)))

    def gated_mlp(self, x, gate, up, out):
        import cuflash

        self._run(("gated_mlp", _akey(x), id(gate), id(up), _akey(out)),
                  lambda: cuflash.plan_dual_gemm(x, gate.data, up.data, None, gate.scales, up.scales, alpha1=gate.alpha,
                                                 alpha2=up.alpha, out=out))

    def experts(self, x, w, offsets, out):
        import cuflash

        # the plan reads offsets by address at every run: the runner passes a fixed buffer
        self._run(("experts", _akey(x), id(w), _akey(offsets), _akey(out)),
                  lambda: cuflash.plan_group_gemm_ragged(x, w.data, None, w.scales, offsets, alpha=w.alpha, out=out))

    def new_kv_cache(self, layers: int, num_pages: int, page_size: int, max_pages_per_seq: int):
        with self.scope():
            cache = attn.PagedKVCache(num_pages, page_size, self.spec.kv_heads, self.spec.head_dim, self.act_dtype.name,
                                      num_layers=layers, max_pages_per_seq=max_pages_per_seq, device=self.device.id)
            if self.nan_fill_kv:
                cache.k_pages.fill(np.nan)
                cache.v_pages.fill(np.nan)
        return cache

    def capture(self, fn):
        """Run fn() (this step's real work; it also compiles the kernels and makes every GEMM plan the step
        uses), then capture fn() into a CUDA graph from a private memory pool and return its replay."""
        cp = self.xp
        fn()
        pool = cp.cuda.MemoryPool()
        plans = []
        self._capturing = plans
        try:
            with cp.cuda.using_allocator(pool.malloc):
                self.stream.begin_capture()
                try:
                    fn()
                finally:
                    graph = self.stream.end_capture()
        finally:
            self._capturing = None
        return CapturedStep(graph, self.stream, pool, plans)
