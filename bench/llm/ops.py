"""The kernel backends of the runner: every step that is a kernel on the GPU, behind one small interface.

The runner (model.py) does the rest (embedding, RMSNorm, RoPE, routing, residuals) with ``ops.xp``
(numpy or CuPy) array code shared by both backends, so all of it is tested on the CPU.

Interface (x, out: backend arrays; w: a convert.QuantWeight whose arrays live on the backend's device)::

    xp, act_dtype, state_dtype     array module; GEMM-input / KV dtype; residual and GEMM-output dtype
    linear(x [T, K], w [N, K], out [T, N])                  out = x @ W^T
    linear_multi(x, [w_i], [out_i])                         several weights on one input (q, k, v)
    gated_mlp(x [T, H], gate [I, H], up [I, H], out [T, I]) out = silu(x @ Wg^T) * (x @ Wu^T)
    experts(x [R, K], w [E, N, K], offsets [E + 1], out [R, N])  rows offsets[e]:offsets[e+1] times expert e
    allocate_kv(layers, num_pages, page_size)               page pools [num_pages, page_size, kv_heads, D]
    new_batch(q_lens, plan_kv_lens, table_width) -> meta    per-forward metadata (AttentionPlan on the GPU)
    update_batch(meta, block_table, kv_lens)                host tables -> the meta's buffers
    append_kv(layer, k [T, kvh, D], v, meta)                new tokens' K/V into their pages
    attention(layer, q [T, heads, D], meta, out)            causal paged attention over the cache
    capture(fn) -> replay                                   run fn once now; replay() repeats it (CUDA graph)
    scope()                                                 context the generation loop runs in (the stream)

Two backends: ``CuflashOps`` (CuPy + cuflash kernels; fp16 activations and KV, fp32 residual and GEMM
outputs) and ``NumpyOps`` (cuflash.reference in float64 with the weights dequantized once; with
``precision="gpu"`` it rounds at the same points as CuflashOps, so its error against the fp32 reference
is what the GPU path should show when its kernels are right).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from cuflash import attention as attn
from cuflash import reference

PRECISIONS = ("exact", "gpu")


@dataclass
class BatchMeta:
    """The per-forward attention metadata: sequence b has q_lens[b] new tokens (rows ragged in order).

    block_table int32 [B, table_width] and kv_lens int32 [B] (lengths after this forward's append) live
    on the backend's device and are rewritten by update_batch; append_indptr int32 [B + 1] is constant.
    """

    q_lens: np.ndarray  # host int64 [B]
    block_table: Any
    kv_lens: Any
    append_indptr: Any
    plan: Any = None  # cuflash AttentionPlan (CuflashOps)


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

    def allocate_kv(self, layers: int, num_pages: int, page_size: int):
        shape = (layers, num_pages, page_size, self.spec.kv_heads, self.spec.head_dim)
        self.k_pages = np.full(shape, np.nan, dtype=self.act_dtype)
        self.v_pages = np.full(shape, np.nan, dtype=self.act_dtype)
        self.page_size = page_size
        return int(self.k_pages.nbytes + self.v_pages.nbytes)

    def new_batch(self, q_lens, plan_kv_lens, table_width: int) -> BatchMeta:
        q_lens = np.asarray(q_lens, dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        return BatchMeta(q_lens, np.full((len(q_lens), table_width), -1, np.int32), np.zeros(len(q_lens), np.int32),
                         indptr)

    def update_batch(self, meta: BatchMeta, block_table, kv_lens):
        meta.block_table[...] = block_table
        meta.kv_lens[...] = kv_lens

    def append_kv(self, layer: int, k, v, meta: BatchMeta):
        slots = attn.slot_positions(meta.kv_lens, meta.q_lens, meta.block_table, self.page_size)
        flat = (-1, self.spec.kv_heads, self.spec.head_dim)
        self.k_pages[layer].reshape(flat)[slots] = k
        self.v_pages[layer].reshape(flat)[slots] = v

    def attention(self, layer: int, q, meta: BatchMeta, out):
        o, _ = reference.paged_attention(q, self.k_pages[layer], self.v_pages[layer], meta.block_table, meta.kv_lens,
                                         q_indptr=meta.append_indptr)
        out[...] = o

    def capture(self, fn):
        fn()
        return fn

    def scope(self):
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# CuPy + cuflash
# ----------------------------------------------------------------------------------------------


class CapturedStep:
    """A CUDA graph of one decode step, with everything its replays read kept alive.

    ``pool``: the private memory pool the capture allocated from (temporaries freed during capture must
    never be handed to anyone else); ``tables``: cuflash's cached GEMM problem tables the graph points at
    (the cache is an LRU of 256 entries: without a reference an evicted table would be freed under the graph).
    """

    def __init__(self, graph, stream, pool, tables):
        self.graph, self.stream, self.pool, self.tables = graph, stream, pool, tables

    def __call__(self):
        self.graph.launch(stream=self.stream)


class CuflashOps:
    """CuPy arrays and cuflash kernels: W4A16 GEMMs (fp16 activations, fp32 outputs), the fused dual GEMM
    for gate/up, the ragged group GEMM for experts, paged KV append and attention on fp16 pools.

    Everything runs on ``self.stream`` (a non-blocking stream, so decode steps can be captured).
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

    def scope(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self.device)
        stack.enter_context(self.stream)
        return stack

    def linear(self, x, w, out):
        import cuflash

        cuflash.group_gemm([x], [w.data], None, [w.scales], alpha=w.alpha, out=[out])

    def linear_multi(self, x, ws, outs):
        import cuflash

        # one launch for all products: the persistent grid walks the tiles of every weight
        cuflash.group_gemm([x] * len(ws), [w.data for w in ws], None, [w.scales for w in ws],
                           alpha=[w.alpha for w in ws], out=list(outs))

    def gated_mlp(self, x, gate, up, out):
        import cuflash

        cuflash.dual_gemm(x, gate.data, up.data, None, gate.scales, up.scales, alpha1=gate.alpha, alpha2=up.alpha,
                          out=out)

    def experts(self, x, w, offsets, out):
        import cuflash

        cuflash.group_gemm_ragged(x, w.data, None, w.scales, offsets, alpha=w.alpha, out=out)

    def allocate_kv(self, layers: int, num_pages: int, page_size: int):
        cp = self.xp
        shape = (layers, num_pages, page_size, self.spec.kv_heads, self.spec.head_dim)
        with self.scope():
            fill = cp.full if self.nan_fill_kv else (lambda s, _v, dtype: cp.empty(s, dtype=dtype))
            self.k_pages = fill(shape, np.nan, dtype=self.act_dtype)
            self.v_pages = fill(shape, np.nan, dtype=self.act_dtype)
        self.page_size = page_size
        return int(self.k_pages.nbytes + self.v_pages.nbytes)

    def new_batch(self, q_lens, plan_kv_lens, table_width: int) -> BatchMeta:
        """Device buffers and an AttentionPlan sized for kv lengths up to plan_kv_lens (all ones in q_lens:
        a decode plan, reusable while the lengths grow, as CUDA-graph replays need)."""
        cp = self.xp
        q_lens = np.asarray(q_lens, dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        decode = bool(np.all(q_lens == 1))
        with self.scope():  # every buffer written in stream order with the kernels that read it
            meta = BatchMeta(q_lens, cp.full((len(q_lens), table_width), -1, dtype=cp.int32),
                             cp.zeros(len(q_lens), dtype=cp.int32), cp.asarray(indptr))
            meta.plan = attn.AttentionPlan(
                None if decode else indptr, np.asarray(plan_kv_lens, dtype=np.int64), num_heads=self.spec.heads,
                num_kv_heads=self.spec.kv_heads, head_dim=self.spec.head_dim, page_size=self.page_size,
                dtype=self.act_dtype.name, max_pages_per_seq=table_width,
            )
        return meta

    def update_batch(self, meta: BatchMeta, block_table, kv_lens):
        meta.block_table.set(np.ascontiguousarray(block_table, dtype=np.int32), stream=self.stream)
        meta.kv_lens.set(np.ascontiguousarray(kv_lens, dtype=np.int32), stream=self.stream)

    def append_kv(self, layer: int, k, v, meta: BatchMeta):
        # check=False: the runner's KVPageTable already checked the lengths (no host sync, capturable)
        attn.append_paged_kv(k, v, self.k_pages[layer], self.v_pages[layer], meta.block_table, meta.kv_lens,
                             append_indptr=meta.append_indptr, check=False)

    def attention(self, layer: int, q, meta: BatchMeta, out):
        meta.plan.run(q, self.k_pages[layer], self.v_pages[layer], meta.block_table, meta.kv_lens, out=out)

    def capture(self, fn):
        """Run fn() (this step's real work; it also fills cuflash's GEMM table and kernel caches), then
        capture fn() into a CUDA graph from a private memory pool and return its replay."""
        from cuflash import gemm

        cp = self.xp
        fn()
        pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(pool.malloc):
            self.stream.begin_capture()
            try:
                fn()
            finally:
                graph = self.stream.end_capture()
        return CapturedStep(graph, self.stream, pool, list(gemm._table_cache.values()))
