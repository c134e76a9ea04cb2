"""The float64 references against brute-force loops on small cases."""

import math

import ml_dtypes
import numpy as np
import pytest

from cuflash import nvfp4, reference

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _fp4_value(byte_array, row, k):
    byte = int(byte_array[row, k // 2])
    code = byte & 0xF if k % 2 == 0 else byte >> 4
    v = E2M1[code & 7]
    return -v if code & 8 else v


def _scale(sf, row, k):
    return float(np.array([sf[row, k // 16]], np.uint8).view(ml_dtypes.float8_e4m3fn)[0])


def _random_operand(rng, rows, k):
    data = rng.integers(0, 256, (rows, k // 2), dtype=np.uint8)
    sf = rng.integers(0x20, 0x60, (rows, k // 16), dtype=np.uint8)  # scales 2^-3 .. 2^5
    return data, sf


def _gemm_loops(a, sfa, b, sfb, alpha):
    m, n, k = a.shape[0], b.shape[0], a.shape[1] * 2
    c = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            acc = 0.0
            for kk in range(k):
                acc += _fp4_value(a, i, kk) * _scale(sfa, i, kk) * _fp4_value(b, j, kk) * _scale(sfb, j, kk)
            c[i, j] = alpha * acc
    return c


@pytest.mark.parametrize("m, n, k", [(3, 5, 32), (1, 2, 64), (0, 3, 16)])
def test_gemm_reference_matches_loops_in_both_layouts(rng, m, n, k):
    a, sfa = _random_operand(rng, m, k)
    b, sfb = _random_operand(rng, n, k)
    want = _gemm_loops(a, sfa, b, sfb, 0.75)
    np.testing.assert_allclose(reference.gemm(a, b, sfa, sfb, alpha=0.75), want, rtol=1e-12, atol=1e-12)
    got = reference.gemm(a, b, nvfp4.to_blocked(sfa), nvfp4.to_blocked(sfb), alpha=0.75, scale_layout="blocked")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gemm_reference_with_trailing_l_and_w4a16(rng):
    m, n, k, L = 4, 3, 32, 2
    ops = [(_random_operand(rng, m, k), _random_operand(rng, n, k)) for _ in range(L)]
    a = np.stack([o[0][0] for o in ops], -1)
    sfa = np.stack([o[0][1] for o in ops], -1)
    b = np.stack([o[1][0] for o in ops], -1)
    sfb = np.stack([o[1][1] for o in ops], -1)
    got = reference.gemm(a, b, sfa, sfb)
    got_blocked = reference.gemm(a, b, nvfp4.to_blocked(sfa), nvfp4.to_blocked(sfb), scale_layout="blocked")
    for l in range(L):
        want = _gemm_loops(a[..., l], sfa[..., l], b[..., l], sfb[..., l], 1.0)
        np.testing.assert_allclose(got[..., l], want, rtol=1e-12)
        np.testing.assert_allclose(got_blocked[..., l], want, rtol=1e-12)
    # W4A16: a plain activation matrix with no scales
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = np.array([[_fp4_value(b[..., 0], j, kk) * _scale(sfb[..., 0], j, kk) for kk in range(k)] for j in range(n)])
    np.testing.assert_allclose(reference.gemm(x, b[..., 0], None, sfb[..., 0]), x.astype(np.float64) @ w.T, rtol=1e-12)


def test_group_and_ragged_and_dual_references(rng):
    k, n = 32, 3
    ms = [2, 0, 3]
    groups = [(_random_operand(rng, m, k), _random_operand(rng, n, k)) for m in ms]
    outs = reference.group_gemm([g[0][0] for g in groups], [g[1][0] for g in groups],
                                [g[0][1] for g in groups], [g[1][1] for g in groups], alpha=[1.0, 2.0, 0.5])
    for g, (m, out, al) in enumerate(zip(ms, outs, [1.0, 2.0, 0.5])):
        np.testing.assert_allclose(out, _gemm_loops(groups[g][0][0], groups[g][0][1], groups[g][1][0], groups[g][1][1], al), rtol=1e-12)
    offsets = np.array([0, 2, 2, 5], np.int32)
    a = np.concatenate([g[0][0] for g in groups])
    sfa = np.concatenate([g[0][1] for g in groups])
    rag = reference.group_gemm_ragged(a, np.stack([g[1][0] for g in groups]), sfa, np.stack([g[1][1] for g in groups]),
                                      offsets, alpha=[1.0, 2.0, 0.5])
    np.testing.assert_allclose(rag, np.concatenate(outs), rtol=1e-12)
    (a1, sfa1), (b1, sfb1) = groups[0]
    b2, sfb2 = _random_operand(rng, n, k)
    g1 = _gemm_loops(a1, sfa1, b1, sfb1, 0.5)
    u = _gemm_loops(a1, sfa1, b2, sfb2, 2.0)
    want = np.array([[g / (1 + math.exp(-g)) * uu for g, uu in zip(gr, ur)] for gr, ur in zip(g1, u)])
    np.testing.assert_allclose(reference.dual_gemm(a1, b1, b2, sfa1, sfb1, sfb2, alpha1=0.5, alpha2=2.0), want, rtol=1e-12)


def _attention_loops(q, k_pages, v_pages, table, kv_lens, q_indptr, causal, scale):
    total_q, heads, d = q.shape
    kv_heads = k_pages.shape[2]
    page = k_pages.shape[1]
    out = np.zeros((total_q, heads, d))
    lse = np.full((total_q, heads), -math.inf)
    for b in range(len(kv_lens)):
        q_len = q_indptr[b + 1] - q_indptr[b]
        for i in range(q_len):
            row = q_indptr[b] + i
            last = kv_lens[b] - q_len + i if causal else kv_lens[b] - 1
            for h in range(heads):
                hk = h * kv_heads // heads
                scores, values = [], []
                for j in range(kv_lens[b]):
                    if j > last:
                        continue
                    p, slot = table[b][j // page], j % page
                    kvec = k_pages[p, slot, hk].astype(np.float64)
                    scores.append(scale * float(np.dot(q[row, h].astype(np.float64), kvec)))
                    values.append(v_pages[p, slot, hk].astype(np.float64))
                if not scores:
                    continue
                mx = max(scores)
                w = [math.exp(s - mx) for s in scores]
                tot = sum(w)
                out[row, h] = sum(wi * vi for wi, vi in zip(w, values)) / tot
                lse[row, h] = mx + math.log(tot)
    return out, lse


@pytest.mark.parametrize("causal", [True, False])
def test_paged_attention_reference_matches_loops(rng, causal):
    page, kv_heads, heads, d = 3, 2, 4, 8
    kv_lens = np.array([7, 1, 5, 2], np.int32)
    q_lens = np.array([3, 1, 5, 4], np.int32)  # the last sequence has rows that see no key
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_pages = 12
    perm = rng.permutation(num_pages)
    table = np.full((4, 3), -1, np.int32)
    used = 0
    for b, L in enumerate(kv_lens):
        n = -(-L // page)
        table[b, :n] = perm[used:used + n]
        used += n
    k_pages = rng.standard_normal((num_pages, page, kv_heads, d)).astype(np.float16)
    v_pages = rng.standard_normal((num_pages, page, kv_heads, d)).astype(np.float16)
    q = rng.standard_normal((q_indptr[-1], heads, d)).astype(np.float16)
    out, lse = reference.paged_attention(q, k_pages, v_pages, table, kv_lens, q_indptr=q_indptr, causal=causal, softmax_scale=0.3)
    want_out, want_lse = _attention_loops(q, k_pages, v_pages, table, kv_lens, q_indptr, causal, 0.3)
    np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)], rtol=1e-12)
    if causal:  # kv_len 2, q_len 4: rows 0 and 1 sit at positions -2 and -1 and see nothing
        assert np.all(out[q_indptr[3]:q_indptr[3] + 2] == 0) and np.all(np.isneginf(lse[q_indptr[3]:q_indptr[3] + 2]))
        assert np.all(np.isfinite(lse[q_indptr[3] + 2:q_indptr[4]]))


def test_paged_attention_reference_decode_default(rng):
    k_pages = rng.standard_normal((4, 2, 1, 4))
    v_pages = rng.standard_normal((4, 2, 1, 4))
    q = rng.standard_normal((2, 2, 4))
    table = np.array([[3, 0], [1, 2]], np.int32)
    kv_lens = np.array([3, 4], np.int32)
    out, lse = reference.paged_attention(q, k_pages, v_pages, table, kv_lens)
    want, want_lse = _attention_loops(q, k_pages, v_pages, table, kv_lens, [0, 1, 2], True, 0.5)
    np.testing.assert_allclose(out, want, rtol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
