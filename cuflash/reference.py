"""float64 numpy references for everything the kernels compute, written for clarity, not speed.

They read the packed operands themselves (their own e2m1 table and blocked-offset formula), so they
check cuflash.nvfp4 as well as the kernels.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

_E2M1 = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, 6: 4.0, 7: 6.0}


def _e2m1_value(code: np.ndarray) -> np.ndarray:
    mag = np.vectorize(_E2M1.__getitem__, otypes=[np.float64])(code & 7)
    return np.where(code & 8, -mag, mag)


def _e4m3_value(scales: np.ndarray) -> np.ndarray:
    bits = scales if scales.dtype == np.uint8 else scales.view(np.uint8)
    return bits.view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """float64 e2m1 values [..., K] of packed bytes [..., K/2] (low nibble = lower K index)."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        packed = packed.view(np.uint8)
    lo, hi = _e2m1_value(packed & 0xF), _e2m1_value(packed >> 4)
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))


def plain_scales_from_blocked(blocked: np.ndarray, rows: int, kb: int) -> np.ndarray:
    """Scales [rows, kb] (or [rows, kb, L] for a 6-D input) read from the blocked layout by its byte
    offset formula, slice by slice."""
    blocked = np.asarray(blocked)
    slices = blocked.reshape(-1, blocked[0].size) if blocked.ndim == 6 else blocked.reshape(1, -1)
    cb = -(-kb // 4)
    r = np.arange(rows)[:, None]
    c = np.arange(kb)[None, :]
    offset = ((r // 128) * cb + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)
    out = np.stack([s[offset] for s in slices], axis=-1)
    return out if blocked.ndim == 6 else out[..., 0]


def dequantize_fp4(packed: np.ndarray, scales: np.ndarray, global_scale=None) -> np.ndarray:
    """float64 ``q * s`` (divided by the encode-form global scale when given), shape [..., K].

    ``packed`` [..., K/2] uint8 and ``scales`` [..., K/16] plain layout; a trailing L axis is
    allowed on both ([rows, K/2, L] with [rows, K/16, L]) as GPU MODE lays them out.
    """
    packed, scales = np.asarray(packed), np.asarray(scales)
    if packed.ndim == 3:  # GPU MODE's [rows, K/2, L]: move L to the front and back
        return np.stack(
            [dequantize_fp4(packed[..., l], scales[..., l], global_scale) for l in range(packed.shape[-1])], axis=-1
        )
    q = unpack_fp4(packed)
    s = np.repeat(_e4m3_value(scales), 16, axis=-1)
    x = q * s
    return x if global_scale is None else x / float(global_scale)


def _operand(x, sf, scale_layout: str) -> np.ndarray:
    """float64 [rows, K] or [rows, K, L] of a GEMM operand: packed NVFP4 with scales, or a plain
    fp16/bf16/fp32 matrix (sf None: the W4A16 activation)."""
    x = np.asarray(x)
    if sf is None:
        return x.astype(np.float64)
    rows, kb = x.shape[0], x.shape[1] * 2 // 16
    sf = np.asarray(sf)
    if scale_layout == "blocked":
        sf = plain_scales_from_blocked(sf, rows, kb)
    elif scale_layout != "plain":
        raise ValueError(f"scale_layout: expected 'plain' or 'blocked', got {scale_layout!r}")
    return dequantize_fp4(x, sf)


def _alpha(alpha, i):
    if alpha is None:
        return 1.0
    if np.ndim(alpha) == 0:
        return float(alpha)
    return float(np.asarray(alpha).reshape(-1)[i])


def gemm(a, b, sfa, sfb, *, alpha=1.0, scale_layout="plain") -> np.ndarray:
    """C = alpha * (A * sfa) @ (B * sfb)^T in float64.

    a: uint8 [M, K/2] (NVFP4, with sfa) or float [M, K] (W4A16, sfa None); b: uint8 [N, K/2];
    a trailing L axis on every operand gives C [M, N, L].
    """
    A, B = _operand(a, sfa, scale_layout), _operand(b, sfb, scale_layout)
    if A.ndim == 3:
        return np.stack([alpha * A[..., l] @ B[..., l].T for l in range(A.shape[-1])], axis=-1)
    return alpha * A @ B.T


def group_gemm(a, b, sfa, sfb, *, alpha=None, scale_layout="plain") -> list:
    """One :func:`gemm` per group; ``alpha`` None, a scalar or one value per group."""
    sfa = [None] * len(a) if sfa is None else sfa
    return [
        gemm(a[i], b[i], sfa[i], sfb[i], alpha=_alpha(alpha, i), scale_layout=scale_layout) for i in range(len(a))
    ]


def group_gemm_ragged(a, b, sfa, sfb, offsets, *, alpha=None, scale_layout="plain") -> np.ndarray:
    """MoE layout: rows offsets[g]:offsets[g+1] of ``a`` [total_M, K/2] multiply expert g of
    ``b`` [G, N, K/2]; returns [total_M, N]. Scales are plain: sfa [total_M, K/16], sfb [G, N, K/16]."""
    offsets = np.asarray(offsets)
    N = np.asarray(b).shape[1]
    out = np.zeros((np.asarray(a).shape[0], N), dtype=np.float64)
    for g in range(len(offsets) - 1):
        lo, hi = int(offsets[g]), int(offsets[g + 1])
        out[lo:hi] = gemm(
            np.asarray(a)[lo:hi], b[g], None if sfa is None else np.asarray(sfa)[lo:hi], sfb[g], alpha=_alpha(alpha, g)
        )
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def dual_gemm(a, b1, b2, sfa, sfb1, sfb2, *, alpha1=1.0, alpha2=1.0, scale_layout="plain") -> np.ndarray:
    """silu(alpha1 * A @ B1^T) * (alpha2 * A @ B2^T) in float64 (both products before the silu)."""
    g = gemm(a, b1, sfa, sfb1, alpha=alpha1, scale_layout=scale_layout)
    u = gemm(a, b2, sfa, sfb2, alpha=alpha2, scale_layout=scale_layout)
    return silu(g) * u


def gather_kv(pages: np.ndarray, block_table_row: np.ndarray, kv_len: int) -> np.ndarray:
    """[kv_len, kv_heads, head_dim] of one sequence from pages [num_pages, page_size, kv_heads, head_dim]."""
    page_size = pages.shape[1]
    n = -(-kv_len // page_size)
    rows = np.concatenate([pages[int(p)] for p in block_table_row[:n]], axis=0) if n else pages[:0, 0]
    return rows[:kv_len].astype(np.float64)


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, *, q_indptr=None, causal=True, softmax_scale=None):
    """softmax(Q K^T * scale) V per sequence over its paged keys, in float64.

    q [total_q, heads, head_dim]; k_pages/v_pages [num_pages, page_size, kv_heads, head_dim];
    block_table int [batch, max_pages]; kv_lens int [batch]; q_indptr int [batch + 1] (None: one
    query per sequence). Causal masks align to the bottom-right corner: query row i of a sequence with
    q_len queries sits at position kv_len - q_len + i and sees keys 0..that position. GQA: query head h
    reads kv head h // (heads // kv_heads). Returns (out [total_q, heads, head_dim], lse [total_q,
    heads]) with lse in natural log; a row that sees no key gives out 0 and lse -inf.
    """
    q = np.asarray(q).astype(np.float64)
    total_q, heads, d = q.shape
    kv_heads = k_pages.shape[2]
    group = heads // kv_heads
    kv_lens = np.asarray(kv_lens)
    batch = len(kv_lens)
    q_indptr = np.arange(batch + 1) if q_indptr is None else np.asarray(q_indptr)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    out = np.zeros_like(q)
    lse = np.full((total_q, heads), -np.inf)
    for b in range(batch):
        kv_len = int(kv_lens[b])
        q0, q1 = int(q_indptr[b]), int(q_indptr[b + 1])
        K = gather_kv(np.asarray(k_pages), np.asarray(block_table)[b], kv_len)
        Vv = gather_kv(np.asarray(v_pages), np.asarray(block_table)[b], kv_len)
        q_len = q1 - q0
        pos = kv_len - q_len + np.arange(q_len)  # each query's position among the keys
        visible = np.arange(kv_len)[None, :] <= pos[:, None] if causal else np.ones((q_len, kv_len), bool)
        for h in range(heads):
            s = (q[q0:q1, h] @ K[:, h // group].T) * scale
            s = np.where(visible, s, -np.inf)
            m = s.max(axis=1, initial=-np.inf)
            seen = np.isfinite(m)
            p = np.exp(s - np.where(seen, m, 0)[:, None])
            l = p.sum(axis=1)
            o = (p @ Vv[:, h // group]) / np.where(seen, l, 1)[:, None]
            out[q0:q1, h] = np.where(seen[:, None], o, 0.0)
            lse[q0:q1, h] = np.where(seen, m + np.log(np.where(seen, l, 1)), -np.inf)
    return out, lse
