"""The model runner shared by both backends: batched greedy generation over a paged KV cache.

Layouts (T tokens of a forward, rows ragged by sequence in batch order; H hidden, D head dim):

- hidden state ``h [T, H]`` in ``ops.state_dtype`` (fp32 on the GPU): the residual stream;
- GEMM inputs ``[T, K]`` in ``ops.act_dtype`` (fp16 on the GPU), GEMM outputs in the state dtype;
- ``qkv [T, heads*D + 2*kv_heads*D]`` (q | k | v columns), then q ``[T, heads, D]`` and k, v
  ``[T, kv_heads, D]`` after RoPE, the layout the paged cache takes;
- MoE: ``R = T * top_k`` (token, slot) rows regrouped by expert (``expert_layout``) for the ragged GEMM.

Generation: prompts of different lengths are prefilled (in one forward, or in chunks of ``prefill_chunk``
tokens per sequence), then every sequence decodes one token per step. The KV lives in the backend's
cache (a ``cuflash.PagedKVCache`` of every layer on the GPU); each forward runs over a batch of it
(``cache.batch``): ``batch.step()`` is the host work of a forward (the page bookkeeping, once for all
layers, and the table uploads into the batch's fixed buffers), and every layer appends and attends through
the batch. A decode step's device work reads only fixed buffers, so ``use_graph`` captures it once and
replays it after each ``batch.step()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

BF16_SHIFT = 16  # a bf16 is the top half of the float32 with the same value


# ----------------------------------------------------------------------------------------------
# Building blocks (xp = numpy or cupy; tested directly on the CPU)
# ----------------------------------------------------------------------------------------------


def bf16_bits_to_f32(xp, bits):
    """float32 values of bf16 bit patterns (uint16)."""
    return xp.left_shift(bits.astype(xp.uint32), BF16_SHIFT).view(xp.float32)


def rms_norm(xp, x, weight, eps: float, out):
    """out = weight * x / sqrt(mean(x^2) + eps) over the last axis, computed in x's dtype (fp32 or fp64)."""
    var = (x * x).mean(axis=-1, keepdims=True)
    out[...] = (x / xp.sqrt(var + x.dtype.type(eps))) * weight.astype(x.dtype)
    return out


def rope_tables(inv_freq: np.ndarray, scale: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [max_positions, D/2] of angle position * inv_freq, as transformers forms them
    (float32 product, then cos/sin, times its attention scaling)."""
    pos = np.arange(max_positions, dtype=np.float32)[:, None]
    ang = pos * inv_freq.astype(np.float32)[None, :]
    return (np.cos(ang) * np.float32(scale)).astype(np.float32), (np.sin(ang) * np.float32(scale)).astype(np.float32)


def apply_rope(x, cos, sin, out):
    """Rotate-half RoPE: x [T, heads, D] (any strides), cos/sin [T, D/2] of each row's position.

    First half x1*cos - x2*sin, second half x2*cos + x1*sin (transformers' rotate_half convention).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    out[..., :half] = x1 * c - x2 * s
    out[..., half:] = x2 * c + x1 * s
    return out


def softmax(xp, x):
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def router_logits(xs, w):
    """xs [T, H] @ w[E, H]^T. CuPy refuses cuBLAS inside a CUDA graph capture, so small (decode-sized)
    products are a broadcast multiply and a reduction, both plain kernels; large ones (prefill, never
    captured) go to the BLAS. The choice depends on the shape alone, so eager and captured steps agree."""
    if xs.shape[0] * w.shape[0] * w.shape[1] <= 1 << 24:
        return (xs[:, None, :] * w[None, :, :]).sum(axis=2)
    return xs @ w.T


def top_k_route(xp, router_logits, k: int):
    """Mixtral routing: softmax over all experts, the k largest probabilities, renormalised.

    router_logits [T, E] -> (experts int32 [T, k], weights [T, k] summing to 1). Repeated argmax instead
    of a sort (no host sync, capturable).
    """
    probs = softmax(xp, router_logits)
    rest = probs.copy()
    rows = xp.arange(probs.shape[0])
    idx, val = [], []
    for _ in range(k):
        i = rest.argmax(axis=1)
        idx.append(i)
        val.append(probs[rows, i])
        rest[rows, i] = -xp.inf
    experts = xp.stack(idx, axis=1).astype(xp.int32)
    weights = xp.stack(val, axis=1)
    return experts, weights / weights.sum(axis=1, keepdims=True)


def expert_layout(xp, experts, num_experts: int):
    """The ragged layout of routed rows: (offsets int32 [E + 1], dest [R]).

    experts [T, k] -> R = T*k rows in (token, slot) order; row r goes to position dest[r] of the expert-
    grouped matrix, expert e's rows being offsets[e]:offsets[e+1], stable in token order. Counting (a
    one-hot prefix sum) rather than sorting: no host sync, capturable.
    """
    flat = experts.reshape(-1)
    onehot = (flat[:, None] == xp.arange(num_experts, dtype=flat.dtype)[None, :]).astype(xp.int32)  # [R, E]
    counts = onehot.sum(axis=0)
    offsets = xp.concatenate([xp.zeros(1, dtype=xp.int32), xp.cumsum(counts).astype(xp.int32)])
    rank = xp.cumsum(onehot, axis=0)[xp.arange(flat.shape[0]), flat] - 1
    dest = offsets[flat] + rank
    return offsets, dest


class Workspace:
    """Named activation buffers of ``max_rows`` rows, allocated once: a forward of T tokens gets the first
    T rows. Kernels therefore see the same addresses at every step (cuflash caches a GEMM problem table
    per address set; CUDA-graph replays need them fixed)."""

    def __init__(self, xp, max_rows: int):
        self.xp, self.max_rows = xp, int(max_rows)
        self._bufs = {}

    def get(self, name: str, rows: int, tail: tuple, dtype, factor: int = 1):
        """[rows, *tail] of buffer ``name`` (capacity max_rows * factor rows)."""
        if rows > self.max_rows * factor:
            raise ValueError(f"{name}: a forward of {rows} rows exceeds the workspace ({self.max_rows * factor}); "
                             f"prefill in chunks or raise max_tokens")
        key = (name, tuple(tail), np.dtype(dtype).str)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self.xp.empty((self.max_rows * factor,) + tuple(tail), dtype=dtype)
            self._bufs[key] = buf
        return buf[:rows]

    @property
    def nbytes(self) -> int:
        return int(sum(b.nbytes for b in self._bufs.values()))


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


@dataclass
class Routes:
    """The MoE routing one sequence saw (``generate(record_routes=True)``), position by position: the
    prompt's tokens, then each fed generated token (P = prompt length + steps - 1 positions)."""

    experts: np.ndarray  # int32 [P, layers, k]: the experts the runner chose
    logits: np.ndarray  # float32 [P, layers, E]: the router logits it chose them from


@dataclass
class Generation:
    tokens: np.ndarray  # int64 [B, n]: token i of sequence b is the greedy choice after step i
    logits: np.ndarray | None  # float32 [B, n, V]: the logits each token was chosen from (keep_logits)
    routes: list | None = None  # per sequence, its Routes (record_routes, MoE models)


class Runner:
    """Greedy batched generation of a converted model on an ops backend.

    max_batch, max_seq_len: capacity of the paged cache (pages of ``page_size`` tokens); max_tokens: the
    most tokens one forward takes (the workspace size; prefill chunks must fit).
    """

    def __init__(self, ops, *, max_batch: int, max_seq_len: int, page_size: int = 16, max_tokens: int = 512):
        self.ops, self.xp = ops, ops.xp
        self.spec = ops.spec
        self.w = ops.weights
        self.page_size = int(page_size)
        self.table_width = -(-int(max_seq_len) // self.page_size)
        self.max_seq_len = int(max_seq_len)
        num_pages = int(max_batch) * self.table_width
        self.cache = ops.new_kv_cache(self.spec.layers, num_pages, self.page_size, self.table_width)
        self.pages = self.cache.pages  # the host bookkeeping (cuflash.attention.KVPageTable), shared by all layers
        self.kv_nbytes = self.cache.nbytes
        self.ws = Workspace(self.xp, max(int(max_tokens), int(max_batch)))
        cos, sin = rope_tables(self.w.rope_inv_freq, self.w.rope_scale, self.max_seq_len)
        self.cos, self.sin = self._device(cos), self._device(sin)
        self.norms = [(self._device(lw.attn_norm), self._device(lw.mlp_norm)) for lw in self.w.layers]
        self.final_norm = self._device(self.w.final_norm)
        self.routers = [None if lw.router is None else self._device(lw.router) for lw in self.w.layers]
        # expert offsets live at one address: the ragged GEMM's plan reads them from there at every run
        self.moe_offsets = self._device(np.zeros(self.spec.experts + 1, np.int32)) if self.spec.experts else None
        self._route_log = None  # while recording routes: each MoE layer's (experts, router logits) of a forward

    def _device(self, host):
        with self.ops.scope():
            return self.xp.asarray(host)

    def _upload(self, name: str, host: np.ndarray):
        """host int array -> the workspace buffer ``name`` (fixed address)."""
        buf = self.ws.get(name, host.shape[0], host.shape[1:], np.int32)
        self._set(buf, host)
        return buf

    def _set(self, buf, host):
        """Write a host int array into a device int32 buffer (in stream order on the GPU)."""
        if self.xp is np:
            buf[...] = host
        else:
            buf.set(np.ascontiguousarray(host, dtype=np.int32), stream=self.ops.stream)

    # -- one forward ---------------------------------------------------------------------------

    def forward(self, tokens, positions, last_rows, batch):
        """Logits [B, V] (state dtype) of rows ``last_rows`` after running tokens [T] at positions [T]
        (device int32 arrays) through every layer, appending their K/V to the cache through ``batch``
        (a cache batch whose step() already counted these tokens)."""
        xp, ws, spec = self.xp, self.ws, self.spec
        T = tokens.shape[0]
        h = ws.get("h", T, (spec.hidden,), self.ops.state_dtype)
        h[...] = bf16_bits_to_f32(xp, self.w.embed_bf16[tokens])
        cos, sin = self.cos[positions], self.sin[positions]
        for layer in range(spec.layers):
            attn_norm, mlp_norm = self.norms[layer]
            xs, x = self._norm(h, attn_norm)
            h += self._attention(layer, x, cos, sin, batch)
            xs, x = self._norm(h, mlp_norm)
            h += self._moe(layer, xs, x) if spec.experts else self._mlp(layer, x)
        B = last_rows.shape[0]
        hl = ws.get("h_last", B, (spec.hidden,), self.ops.state_dtype)
        hl[...] = h[last_rows]
        _, x = self._norm(hl, self.final_norm, prefix="head")
        logits = ws.get("logits", B, (spec.vocab,), self.ops.state_dtype)
        self.ops.linear(x, self.w.lm_head, logits)
        return logits

    def _norm(self, h, weight, prefix="norm"):
        """(normed in the state dtype, the same cast to the activation dtype for the GEMMs)."""
        T = h.shape[0]
        xs = rms_norm(self.xp, h, weight, self.spec.rms_eps, self.ws.get(prefix + "_s", T, h.shape[1:], h.dtype))
        x = self.ws.get(prefix + "_a", T, h.shape[1:], self.ops.act_dtype)
        x[...] = xs
        return xs, x

    def _attention(self, layer, x, cos, sin, batch):
        ws, spec, ops, lw = self.ws, self.spec, self.ops, self.w.layers[layer]
        T, D, nq, nk = x.shape[0], spec.head_dim, spec.q_dim, spec.kv_dim
        qkv = ws.get("qkv", T, (nq + 2 * nk,), ops.state_dtype)
        ops.linear_multi(x, [lw.q, lw.k, lw.v], [qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]])
        q = apply_rope(qkv[:, :nq].reshape(T, spec.heads, D), cos, sin, ws.get("q", T, (spec.heads, D), ops.act_dtype))
        k = apply_rope(qkv[:, nq:nq + nk].reshape(T, spec.kv_heads, D), cos, sin,
                       ws.get("k", T, (spec.kv_heads, D), ops.act_dtype))
        v = ws.get("v", T, (spec.kv_heads, D), ops.act_dtype)
        v[...] = qkv[:, nq + nk:].reshape(T, spec.kv_heads, D)
        batch.append(layer, k, v)
        o = ws.get("attn", T, (spec.heads, D), ops.act_dtype)
        batch.attention(layer, q, out=o)
        y = ws.get("o_proj", T, (spec.hidden,), ops.state_dtype)
        ops.linear(o.reshape(T, nq), lw.o, y)
        return y

    def _mlp(self, layer, x):
        ws, ops, lw = self.ws, self.ops, self.w.layers[layer]
        T = x.shape[0]
        act = ws.get("act", T, (self.spec.intermediate,), ops.act_dtype)
        ops.gated_mlp(x, lw.gate, lw.up, act)
        y = ws.get("down", T, (self.spec.hidden,), ops.state_dtype)
        ops.linear(act, lw.down, y)
        return y

    def _moe(self, layer, xs, x):
        """Top-k MoE: route in the state dtype, regroup rows by expert, two ragged GEMMs, weighted sum back."""
        xp, ws, ops, spec, lw = self.xp, self.ws, self.ops, self.spec, self.w.layers[layer]
        T, k, I = x.shape[0], spec.top_k, spec.intermediate
        rl = router_logits(xs, self.routers[layer])
        experts, weights = top_k_route(xp, rl, k)
        if self._route_log is not None:
            self._route_log.append((experts, rl))
        offsets, dest = expert_layout(xp, experts, spec.experts)
        self.moe_offsets[...] = offsets
        offsets = self.moe_offsets
        R = T * k
        xe = ws.get("moe_x", R, (spec.hidden,), ops.act_dtype, factor=k)
        xe[dest] = x[xp.arange(R) // k]
        gate_up = ws.get("moe_gate_up", R, (2 * I,), ops.state_dtype, factor=k)
        ops.experts(xe, lw.experts_gate_up, offsets, gate_up)
        g, u = gate_up[:, :I], gate_up[:, I:]
        act = ws.get("moe_act", R, (I,), ops.act_dtype, factor=k)
        act[...] = g / (1 + xp.exp(-g)) * u
        down = ws.get("moe_down", R, (spec.hidden,), ops.state_dtype, factor=k)
        ops.experts(act, lw.experts_down, offsets, down)
        y = ws.get("moe_out", T, (spec.hidden,), ops.state_dtype)
        y[...] = (down[dest].reshape(T, k, spec.hidden) * weights[..., None].astype(down.dtype)).sum(axis=1)
        return y

    # -- generation ------------------------------------------------------------------------------

    def _prefill(self, seq_ids, prompts, chunk: int | None):
        """First-token logits [B, V] (host float32) of every prompt, prefilled in rounds of at most
        ``chunk`` tokens per sequence (None: the whole prompt at once)."""
        B = len(prompts)
        done = np.zeros(B, dtype=np.int64)
        first = [None] * B
        while True:
            active = [b for b in range(B) if done[b] < len(prompts[b])]
            if not active:
                break
            q_lens = np.array([len(prompts[b]) - done[b] if chunk is None else min(chunk, len(prompts[b]) - done[b])
                               for b in active], dtype=np.int64)
            batch = self.cache.batch([seq_ids[b] for b in active], q_lens, num_heads=self.spec.heads)
            batch.step()  # counts the chunk in every layer and uploads the tables (current stream)
            toks = np.concatenate([prompts[b][done[b]:done[b] + n] for b, n in zip(active, q_lens)])
            pos = np.concatenate([np.arange(done[b], done[b] + n) for b, n in zip(active, q_lens)])
            last = np.cumsum(q_lens) - 1
            logits = self.forward(self._upload("tok", toks), self._upload("pos", pos), self._upload("last", last), batch)
            host = np.array(self._host(logits), dtype=np.float32)  # a copy: the buffer is reused next round
            self._store_routes(np.repeat(active, q_lens), pos)
            for i, b in enumerate(active):
                done[b] += q_lens[i]
                if done[b] == len(prompts[b]):
                    first[b] = host[i]
        return np.stack(first)

    def _host(self, x):
        return x if self.xp is np else x.get(stream=self.ops.stream)

    def _store_routes(self, rows_seq, rows_pos):
        """Move the routes of the last forward (rows of sequences ``rows_seq`` at positions ``rows_pos``,
        host arrays) into ``self._routes`` when recording."""
        if self._route_log is None:
            return
        log = self._route_log[:]
        self._route_log.clear()
        if not log:
            return
        experts = np.stack([self._host(e) for e, _ in log], axis=1)  # [T, layers, k]
        logits = np.stack([self._host(r) for _, r in log], axis=1).astype(np.float32)
        for row, (b, p) in enumerate(zip(rows_seq, rows_pos)):
            self._routes[b].experts[p] = experts[row]
            self._routes[b].logits[p] = logits[row]

    def prefill(self, prompts, *, prefill_chunk: int | None = None) -> np.ndarray:
        """First-token logits [B, V] (host float32) of each prompt; the sequences are freed afterwards
        (what the benchmark times as prefill)."""
        prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
        seq_ids = [self.cache.add_sequence() for _ in prompts]
        try:
            with self.ops.scope():
                return self._prefill(seq_ids, prompts, prefill_chunk)
        finally:
            for s in seq_ids:
                self.cache.free_sequence(s)

    def generate(self, prompts, max_new_tokens: int, *, prefill_chunk: int | None = None, use_graph: bool = False,
                 keep_logits: bool = True, step_times: list | None = None, record_routes: bool = False) -> Generation:
        """Greedy generation of ``max_new_tokens`` tokens after each prompt (lists of token ids).

        step_times: if a list, each decode step's wall time in seconds is appended (host bookkeeping,
        uploads, the device work and the token read-back: what one step of a serving loop costs).
        record_routes (MoE models, eager only): keep every position's experts and router logits
        (``Generation.routes``), one host copy per forward.
        """
        prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
        B = len(prompts)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: every prompt needs at least one token")
        longest = max(len(p) for p in prompts) + max_new_tokens - 1
        if longest > self.max_seq_len:
            raise ValueError(f"prompts: {longest} positions needed, the runner holds {self.max_seq_len} (max_seq_len)")
        seq_ids = [self.cache.add_sequence() for _ in range(B)]
        tokens = np.zeros((B, max_new_tokens), dtype=np.int64)
        kept = np.zeros((B, max_new_tokens, self.spec.vocab), np.float32) if keep_logits else None
        routes = None
        if record_routes:
            if use_graph or not self.spec.experts:
                raise ValueError(f"record_routes: needs an MoE model in eager mode, got experts={self.spec.experts}, "
                                 f"use_graph={use_graph}")
            L, k, E = self.spec.layers, self.spec.top_k, self.spec.experts
            routes = [Routes(np.full((len(p) + max_new_tokens - 1, L, k), -1, np.int32),
                             np.full((len(p) + max_new_tokens - 1, L, E), np.nan, np.float32)) for p in prompts]
        self._routes, self._route_log = routes, ([] if record_routes else None)
        try:
            with self.ops.scope():
                logits = self._prefill(seq_ids, prompts, prefill_chunk)
                tokens[:, 0] = logits.argmax(axis=1)
                if keep_logits:
                    kept[:, 0] = logits
                self._decode(seq_ids, prompts, tokens, kept, use_graph, step_times)
        finally:
            self._routes, self._route_log = None, None
            for s in seq_ids:
                self.cache.free_sequence(s)
        return Generation(tokens, kept, routes)

    def _decode(self, seq_ids, prompts, tokens, kept, use_graph: bool, step_times):
        """Steps 1..n-1: one token per sequence; the device work of a step reads only fixed buffers."""
        xp, B, n = self.xp, len(seq_ids), tokens.shape[1]
        if n < 2:
            return
        final_len = max(len(p) for p in prompts) + n - 1
        # one batch for every step: a decode plan sized for the final lengths, fixed device buffers
        batch = self.cache.batch(seq_ids, None, num_heads=self.spec.heads, max_kv_len=final_len)
        last = self._upload("dec_last", np.arange(B))
        tok_buf = self.ws.get("dec_tok", B, (), np.int32)
        pos_buf = self.ws.get("dec_pos", B, (), np.int32)
        next_buf = self.ws.get("dec_next", B, (), np.int32)

        def step():
            logits = self.forward(tok_buf, pos_buf, last, batch)
            next_buf[...] = xp.argmax(logits, axis=1)

        replay = None
        for i in range(1, n):
            t0 = time.perf_counter()
            lens = batch.step()  # host bookkeeping + table uploads, outside the graph
            self._set(tok_buf, tokens[:, i - 1])
            self._set(pos_buf, lens - 1)
            timed = True
            if not use_graph:
                step()
            elif replay is None:
                replay = self.ops.capture(step)  # runs this step, then records it (capture is not timed)
                timed = False
            else:
                replay()
            tokens[:, i] = self._host(next_buf)  # waits for the step (the stream's work ends here)
            self._store_routes(np.arange(B), lens - 1)
            if step_times is not None and timed:
                step_times.append(time.perf_counter() - t0)
            if kept is not None:
                kept[:, i] = self._host(self.ws.get("logits", B, (self.spec.vocab,), self.ops.state_dtype))
