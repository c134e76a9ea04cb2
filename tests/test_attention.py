"""Paged KV cache and paged attention: CPU tests (validation, bookkeeping, partition, a numpy
emulation of the kernel's tiling / online softmax / split-KV / combine) and GPU tests against the
float64 reference.

Tolerance (FlashAttention's rule): the kernel's error against the float64 reference must be at most
K_BASE times the error of a straightforward same-precision implementation (scores rounded to the
input dtype, softmax in fp32, probabilities rounded to the dtype, P @ V in fp32, output rounded) plus
a small atol. The kernel keeps scores in fp32 and rounds only P and the output, so it normally lands
below the baseline; K_BASE = 2 leaves room for the different summation order, and atol (a few ulps of
the dtype at the outputs' scale, ~1) covers cases where the baseline happens to be exact.
"""

import math

import ml_dtypes
import numpy as np
import pytest

from cuflash import attention as A, reference

K_BASE = 2.0
ATOL = {"float16": 2.0**-9, "bfloat16": 2.0**-6}
LSE_ATOL = 2e-3  # LSE comes from fp32 scores of exact inputs: only accumulation and ex2 error
NP_DTYPE = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# ----------------------------------------------------------------------------------------------
# Helpers: random paged caches with shuffled pages and NaN everywhere unused
# ----------------------------------------------------------------------------------------------


def make_cache(rng, kv_lens, *, page_size, kv_heads, head_dim, dtype, spare_pages=3, extra_cols=1):
    """Host pools [num_pages, page_size, kv_heads, head_dim] filled with NaN, each sequence's pages taken
    from a shuffled permutation, its keys/values random; block table padded with -1 (never read)."""
    need = [-(-int(n) // page_size) for n in kv_lens]
    num_pages = sum(need) + spare_pages
    perm = rng.permutation(num_pages)
    width = max(need + [1]) + extra_cols
    table = np.full((len(kv_lens), width), -1, np.int32)
    shape = (num_pages, page_size, kv_heads, head_dim)
    kp = np.full(shape, np.nan, dtype=np.float32)
    vp = np.full(shape, np.nan, dtype=np.float32)
    at = 0
    for b, n in enumerate(kv_lens):
        table[b, : need[b]] = perm[at : at + need[b]]
        at += need[b]
        for pos in range(int(n)):
            p, s = table[b, pos // page_size], pos % page_size
            kp[p, s] = rng.standard_normal((kv_heads, head_dim))
            vp[p, s] = rng.standard_normal((kv_heads, head_dim))
    dt = NP_DTYPE[dtype]
    return kp.astype(dt), vp.astype(dt), table


def make_q(rng, total_q, heads, head_dim, dtype):
    return rng.standard_normal((total_q, heads, head_dim)).astype(NP_DTYPE[dtype])


def baseline(q, k_pages, v_pages, table, kv_lens, q_indptr, dtype, causal=True):
    """Straightforward same-precision attention (the tolerance yardstick)."""
    dt = NP_DTYPE[dtype]
    total_q, heads, d = q.shape
    group = heads // k_pages.shape[2]
    scale = 1.0 / math.sqrt(d)
    out = np.zeros(q.shape, np.float64)
    indptr = np.arange(len(kv_lens) + 1) if q_indptr is None else q_indptr
    for b, n in enumerate(kv_lens):
        q0, q1 = int(indptr[b]), int(indptr[b + 1])
        K = reference.gather_kv(k_pages, table[b], int(n)).astype(np.float32)
        Vv = reference.gather_kv(v_pages, table[b], int(n)).astype(np.float32)
        pos = int(n) - (q1 - q0) + np.arange(q1 - q0)
        vis = np.arange(int(n))[None, :] <= pos[:, None] if causal else np.ones((q1 - q0, int(n)), bool)
        for h in range(heads):
            s = (q[q0:q1, h].astype(np.float32) @ K[:, h // group].T * np.float32(scale)).astype(dt).astype(np.float32)
            s = np.where(vis, s, -np.inf)
            m = s.max(axis=1, initial=-np.inf)
            p = np.exp(s - np.where(np.isfinite(m), m, 0)[:, None])
            l = p.sum(axis=1)
            p = (p / np.where(l > 0, l, 1)[:, None]).astype(dt).astype(np.float32)
            out[q0:q1, h] = (p @ Vv[:, h // group]).astype(dt).astype(np.float64)
    return out


def check_close(out, lse, q, kp, vp, table, kv_lens, q_indptr, dtype, causal=True):
    ref_out, ref_lse = reference.paged_attention(q, kp, vp, table, kv_lens, q_indptr=q_indptr, causal=causal)
    out = np.asarray(out).astype(np.float64)
    assert not np.isnan(out).any(), "NaN in the output (an unwritten or poisoned element, or a NaN slot read)"
    base_err = np.abs(baseline(q, kp, vp, table, kv_lens, q_indptr, dtype, causal) - ref_out).max(initial=0)
    err = np.abs(out - ref_out).max(initial=0)
    assert err <= K_BASE * base_err + ATOL[dtype], f"max error {err:.3g} vs baseline {base_err:.3g}"
    if lse is not None:
        lse = np.asarray(lse, dtype=np.float64)
        assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "rows seeing no key must have LSE -inf"
        fin = np.isfinite(ref_lse)
        assert np.abs(lse[fin] - ref_lse[fin]).max(initial=0) <= LSE_ATOL


# ----------------------------------------------------------------------------------------------
# CPU: validation
# ----------------------------------------------------------------------------------------------


def _args(rng, dtype="float16", heads=8, kv_heads=2, d=64, page_size=4, kv_lens=(5, 9)):
    kp, vp, table = make_cache(rng, list(kv_lens), page_size=page_size, kv_heads=kv_heads, head_dim=d, dtype=dtype)
    q = make_q(rng, len(kv_lens), heads, d, dtype)
    return q, kp, vp, table, np.array(kv_lens, np.int32)


def test_validation_dtypes(rng):
    q, kp, vp, table, lens = _args(rng)
    with pytest.raises(TypeError, match="q: expected dtype float16 or bfloat16, got float32"):
        A.paged_attention(q.astype(np.float32), kp, vp, table, lens)
    with pytest.raises(TypeError, match="v_pages: expected dtype float16"):
        A.paged_attention(q, kp, vp.astype(ml_dtypes.bfloat16), table, lens)
    with pytest.raises(TypeError, match="block_table: expected dtype int32, got int64"):
        A.paged_attention(q, kp, vp, table.astype(np.int64), lens)
    with pytest.raises(TypeError, match="kv_lens: expected dtype int32"):
        A.paged_attention(q, kp, vp, table, lens.astype(np.int64))


def test_validation_shapes(rng):
    q, kp, vp, table, lens = _args(rng)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        A.paged_attention(q[:, :7], kp, vp, table, lens)
    with pytest.raises(ValueError, match="q: expected head_dim 64"):
        A.paged_attention(q[..., :32], kp, vp, table, lens)
    with pytest.raises(ValueError, match="v_pages: expected shape"):
        A.paged_attention(q, kp, vp[:, :2], table, lens)
    with pytest.raises(ValueError, match="head_dim in"):
        A.paged_attention(q[..., :48], kp[..., :48], vp[..., :48], table, lens)
    with pytest.raises(ValueError, match="block_table: expected shape"):
        A.paged_attention(q, kp, vp, table[:1], lens)
    with pytest.raises(ValueError, match="one query per sequence"):
        A.paged_attention(q[:1], kp, vp, table, lens)
    with pytest.raises(ValueError, match="last offset"):
        A.paged_attention(q, kp, vp, table, lens, q_indptr=np.array([0, 1, 3], np.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        A.paged_attention(q, kp, vp, table, lens, q_indptr=np.array([0, 3, 2], np.int32))


def test_validation_lengths(rng):
    q, kp, vp, table, lens = _args(rng, page_size=4, kv_lens=(5, 9))
    too_long = np.array([5, table.shape[1] * 4 + 1], np.int32)
    with pytest.raises(ValueError, match=r"kv_lens\[1\]: .* do not fit the sequence's pages"):
        A.paged_attention(q, kp, vp, table, too_long)
    with pytest.raises(ValueError, match=r"kv_lens\[0\]: expected a length >= 0"):
        A.paged_attention(q, kp, vp, table, np.array([-1, 3], np.int32))


def test_append_validation(rng):
    q, kp, vp, table, lens = _args(rng, heads=2, kv_heads=2)
    k = make_q(rng, 2, 2, 64, "float16")
    with pytest.raises(ValueError, match="k: expected shape"):
        A.append_paged_kv(k[:, :1], k[:, :1], kp, vp, table, lens)
    with pytest.raises(ValueError, match="include the appended tokens"):
        k6 = np.concatenate([k, k, k])
        A.append_paged_kv(k6, k6, kp, vp, table, np.array([1, 9], np.int32), append_indptr=np.array([0, 4, 6], np.int32))
    with pytest.raises(TypeError, match="k: expected dtype float16"):
        A.append_paged_kv(k.astype(ml_dtypes.bfloat16), k, kp, vp, table, lens)


def test_plan_validation():
    common = dict(num_heads=8, num_kv_heads=3, head_dim=64, page_size=16)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        A.AttentionPlan(None, np.array([4], np.int32), **common)
    with pytest.raises(ValueError, match="head_dim: expected one of"):
        A.AttentionPlan(None, np.array([4], np.int32), num_heads=8, num_kv_heads=2, head_dim=80, page_size=16)
    with pytest.raises(ValueError, match="expected the lengths, or max_kv_len and batch"):
        A.AttentionPlan(None, None, num_heads=8, num_kv_heads=2, head_dim=64, page_size=16)


# ----------------------------------------------------------------------------------------------
# CPU: page bookkeeping
# ----------------------------------------------------------------------------------------------


def test_page_table_bookkeeping():
    t = A.KVPageTable(num_pages=6, page_size=4, max_pages_per_seq=4)
    a, b = t.add_sequence(), t.add_sequence()
    assert (a, b) == (0, 1)
    np.testing.assert_array_equal(t.advance([a, b], [5, 4]), [5, 4])  # a: 2 pages, b: 1
    assert t.free_pages == 3 and len(t.pages(a)) == 2 and len(t.pages(b)) == 1
    t.advance([a], [3])  # 8 tokens: still 2 pages
    assert t.length(a) == 8 and t.reserved(a) == 8 and len(t.pages(a)) == 2
    t.advance([a], [1])  # 9th token opens page 3
    assert len(t.pages(a)) == 3 and t.free_pages == 2
    table = t.block_table([b, a])
    assert table.shape == (2, 4) and table.dtype == np.int32
    assert list(table[1, :3]) == t.pages(a) and table[1, 3] == -1 and list(table[0, 1:]) == [-1] * 3
    used = set(t.pages(a)) | set(t.pages(b))
    assert len(used) == 4 and used.isdisjoint(t._free)
    t.free_sequence(a)
    assert t.free_pages == 5
    with pytest.raises(ValueError, match="no sequence 0"):
        t.length(a)
    with pytest.raises(ValueError, match="already exists"):
        t.add_sequence(b)


def _state(t):
    """Everything a KVPageTable holds, to check that a failed call changed nothing."""
    return (list(t._free), {s: list(p) for s, p in t._pages.items()}, dict(t._reserved),
            {s: w.tolist() for s, w in t._written.items()})


def test_page_table_capacity_all_or_nothing():
    t = A.KVPageTable(num_pages=3, page_size=2, max_pages_per_seq=3)
    a, b = t.add_sequence(), t.add_sequence()
    t.advance([a], [3])  # 2 pages
    before = _state(t)
    with pytest.raises(ValueError, match="cache is full.*nothing was written"):
        t.advance([a, b], [1, 3])  # a needs 0 new pages, b needs 2; 1 free
    assert _state(t) == before
    with pytest.raises(ValueError, match="cache is full.*nothing was written"):
        t.reserve([a, b], [1, 3])
    assert _state(t) == before
    with pytest.raises(ValueError, match="over max_pages_per_seq"):
        t.advance([a], [4])
    with pytest.raises(ValueError, match="distinct"):
        t.advance([a, a], [1, 1])
    with pytest.raises(ValueError, match="one count per sequence"):
        t.advance([a, b], [1])
    with pytest.raises(ValueError, match="counts >= 0"):
        t.advance([a], [-1])
    with pytest.raises(ValueError, match="no sequence 7"):
        t.advance([a, 7], [1, 1])
    assert _state(t) == before


@pytest.mark.parametrize("pattern", ["appends", "reserve_then_appends", "all_layers"])
def test_multi_layer_step_reserves_once(pattern):
    """Three ways to run a step over 3 layers: each reserves the step's pages once and counts each
    layer's tokens once; lengths follow each layer's own count."""
    L, ps = 3, 4
    t = A.KVPageTable(num_pages=12, page_size=ps, num_layers=L)
    a, b = t.add_sequence(), t.add_sequence()
    lens = np.zeros(2, np.int64)
    for new in ([5, 3], [1, 1], [4, 0], [1, 6]):
        if pattern == "all_layers":
            got = t.advance([a, b], new, layer=None)
            np.testing.assert_array_equal(got, lens + new)
        else:
            if pattern == "reserve_then_appends":
                np.testing.assert_array_equal(t.reserve([a, b], new), lens + new)
            for layer in range(L):
                free = t.free_pages
                got = t.advance([a, b], new, layer=layer)
                np.testing.assert_array_equal(got, lens + new)
                if layer > 0 or pattern == "reserve_then_appends":
                    assert t.free_pages == free, "a later layer (or appends after reserve) reserved again"
                if layer < L - 1:  # mid-step: the layers disagree, all-layer reads refuse
                    assert t.length(a, layer) == lens[0] + new[0] and t.length(a, L - 1) == lens[0]
                    with pytest.raises(ValueError, match="different token counts"):
                        t.length(a, None)
                    before = _state(t)
                    with pytest.raises(ValueError, match="different token counts"):
                        t.advance([a, b], [1, 1], layer=None)
                    assert _state(t) == before
        lens = lens + new
        for s, n in zip((a, b), lens):
            assert t.reserved(s) == n and t.length(s, None) == n
            assert [t.length(s, layer) for layer in range(L)] == [n] * L
            assert len(t.pages(s)) == -(-int(n) // ps)  # pages for one copy of the tokens, shared by all layers
        np.testing.assert_array_equal(t.lengths([b, a], None), lens[::-1])
    assert t.free_pages == 12 - sum(-(-int(n) // ps) for n in lens)


def test_multi_layer_capacity_error_in_a_later_layer_changes_nothing():
    t = A.KVPageTable(num_pages=3, page_size=2, max_pages_per_seq=8, num_layers=2)
    a = t.add_sequence()
    t.advance([a], [4], layer=0)  # 2 pages
    t.advance([a], [2], layer=1)  # within what layer 0 reserved
    before = _state(t)
    with pytest.raises(ValueError, match="cache is full"):
        t.advance([a], [5], layer=1)  # positions 2..6: 4 pages, 1 more than free
    assert _state(t) == before
    with pytest.raises(ValueError, match=r"expected 0 <= layer < 2 \(num_layers\), got 2"):
        t.advance([a], [1], layer=2)
    with pytest.raises(TypeError, match="layer: expected an int"):
        t.length(a, 1.0)
    assert _state(t) == before
    t.advance([a], [3], layer=1)  # positions 2..4: one more page (5 positions)
    assert t.reserved(a) == 5 and [t.length(a, i) for i in range(2)] == [4, 5] and t.free_pages == 0


def test_batch_state_steps_and_tables():
    """BatchState (PagedBatch's host side) keeps its host tables current in place, step by step."""
    ps = 4
    t = A.KVPageTable(num_pages=20, page_size=ps, max_pages_per_seq=6, num_layers=2)
    seqs = [t.add_sequence() for _ in range(3)]
    t.advance(seqs, [3, 0, 8], layer=None)
    prefill = A.BatchState(t, seqs, [2, 1, 5])
    np.testing.assert_array_equal(prefill.q_indptr_host, [0, 2, 3, 8])
    assert not prefill.decode_only and prefill.total_q == 8
    np.testing.assert_array_equal(prefill.kv_lens_host, [3, 0, 8])  # before the first step
    np.testing.assert_array_equal(prefill.step(), [5, 1, 13])
    np.testing.assert_array_equal(prefill.block_table_host, t.block_table(seqs))
    dec = A.BatchState(t, seqs)
    assert dec.decode_only and dec.total_q == 3
    table_buf, lens_buf = dec.block_table_host, dec.kv_lens_host
    for step in range(1, 9):
        lens = dec.step()
        np.testing.assert_array_equal(lens, [5 + step, 1 + step, 13 + step])
        assert dec.block_table_host is table_buf and dec.kv_lens_host is lens_buf  # rewritten in place
        np.testing.assert_array_equal(table_buf, t.block_table(seqs))
        np.testing.assert_array_equal(lens_buf, lens)
        for s, n in zip(seqs, lens):
            assert [t.length(s, i) for i in range(2)] == [n, n] and t.reserved(s) == n
    # appends through the cache (here: its bookkeeping), then update() re-reads without counting
    t.advance(seqs[:1], [2], layer=0)
    with pytest.raises(ValueError, match="different token counts"):
        dec.update()
    t.advance(seqs[:1], [2], layer=1)
    np.testing.assert_array_equal(dec.update(), [15, 9, 21])
    np.testing.assert_array_equal(dec.block_table_host, t.block_table(seqs))
    # a step past max_pages_per_seq (6 pages = 24 tokens) changes nothing, host arrays included
    t.advance(seqs[2:], [3], layer=None)  # 24 tokens
    dec.update()
    before, arrays = _state(t), (dec.block_table_host.copy(), dec.kv_lens_host.copy())
    with pytest.raises(ValueError, match="over max_pages_per_seq"):
        dec.step()
    assert _state(t) == before
    np.testing.assert_array_equal(dec.block_table_host, arrays[0])
    np.testing.assert_array_equal(dec.kv_lens_host, arrays[1])


def test_batch_state_validation():
    t = A.KVPageTable(num_pages=4, page_size=4, num_layers=2)
    a = t.add_sequence()
    with pytest.raises(ValueError, match="at least one sequence"):
        A.BatchState(t, [])
    with pytest.raises(ValueError, match="no sequence 5"):
        A.BatchState(t, [a, 5])
    with pytest.raises(ValueError, match="distinct"):
        A.BatchState(t, [a, a])
    with pytest.raises(ValueError, match="one count per sequence"):
        A.BatchState(t, [a], [1, 2])
    t.advance([a], [1], layer=1)
    with pytest.raises(ValueError, match="different token counts"):
        A.BatchState(t, [a])
    t.advance([a], [1], layer=0)
    b = A.BatchState(t, [a])
    t.free_sequence(a)
    with pytest.raises(ValueError, match="no sequence 0"):
        b.step()


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_slot_positions_round_trip(rng, page_size):
    """Appending through the kernel's addressing rule, then gathering through the table, gives the tokens back."""
    t = A.KVPageTable(num_pages=40, page_size=page_size)
    seqs = [t.add_sequence() for _ in range(3)]
    tokens = {s: [] for s in seqs}
    pool = np.full((40, page_size, 1, 2), np.nan)
    for new in ([3, 0, 17], [1, 6, 1], [page_size, 1, 2]):
        after = t.advance(seqs, new)
        table = t.block_table(seqs)
        slots = A.slot_positions(after, np.array(new), table, page_size)
        vals = rng.standard_normal((sum(new), 1, 2))
        pool.reshape(-1, 1, 2)[slots] = vals
        at = 0
        for s, n in zip(seqs, new):
            tokens[s].extend(vals[at : at + n])
            at += n
    table = t.block_table(seqs)
    for i, s in enumerate(seqs):
        got = reference.gather_kv(pool, table[i], t.length(s))
        np.testing.assert_array_equal(got, np.array(tokens[s]).reshape(-1, 1, 2))


# ----------------------------------------------------------------------------------------------
# CPU: heuristics and partition
# ----------------------------------------------------------------------------------------------


def test_tile_config_fits_smem():
    for c in A.kernel_variants():
        assert c.smem_bytes <= A.H100_SMEM_PER_BLOCK
        assert c.block_n % 16 == 0 and c.head_dim in A.HEAD_DIMS
        copy_threads = 128 if c.wgmma else c.threads  # the wgmma kernel's producer warpgroup copies
        assert (copy_threads // (c.head_dim // 8)) and c.block_n % (copy_threads // (c.head_dim // 8)) == 0
    for d in A.HEAD_DIMS:
        for role in A.ROLES:
            assert A.tile_config("float16", d, role, A.SM86_SMEM_PER_BLOCK).smem_bytes <= A.SM86_SMEM_PER_BLOCK
    assert A.tile_config("float16", 128, "decode").block_m == 16
    assert A.tile_config("float16", 128, "decode").split_keys
    assert A.tile_config("float16", 128, "narrow").block_m == 64
    names = {c.kernel_name() for c in A.kernel_variants()}
    assert len(names) == len(A.kernel_variants())
    with pytest.raises(ValueError, match="role"):
        A.tile_config("float16", 128, "mixed")


def test_num_splits_cost_model():
    assert A.choose_num_splits(8, 512, 264) == 32  # B=1, 8 kv heads, 32k keys: 256 CTAs, one wave
    assert A.choose_num_splits(128, 128, 264) == 2  # B=16 S=8192: a third split would start a 2nd wave
    assert A.choose_num_splits(512, 64, 264) == 1
    assert A.choose_num_splits(8, 1, 264) == 1
    assert 1 <= A.choose_num_splits(1, 10**6, 264) <= A.MAX_SPLITS


@pytest.mark.parametrize("group", [1, 4, 8, 32])
def test_partition_covers_every_row_once(group):
    q_lens = np.array([1, 7, 0, 128, 1, 300, 16])
    kv_lens = np.array([50, 7, 10, 128, 1000, 300, 4096])
    specs = A.partition(q_lens, kv_lens, group=group, num_kv_heads=2, dtype="float16", head_dim=128, causal=True,
                        slots_of=lambda c: 264)
    seen = np.zeros(int(q_lens.sum()) * group, int)
    q_starts = np.concatenate([[0], np.cumsum(q_lens)])
    for s in specs:
        bm = s.config.block_m
        assert s.work.dtype == np.int32 and s.work.shape[1] == A.WORK_FIELDS
        for seq, m, base in s.work:
            rows = q_lens[seq] * group
            assert m * bm < rows
            r = np.arange(m * bm, min((m + 1) * bm, rows))
            seen[q_starts[seq] * group + r] += 1
            # partial rows of this sequence map back to its own queries
            assert list(s.part_qrow[base : base + q_lens[seq]]) == list(range(q_starts[seq], q_starts[seq + 1]))
        if s.role in ("decode", "narrow"):
            assert all(q_lens[seq] * group <= bm for seq, _, _ in s.work)
    assert (seen == 1).all()


# ----------------------------------------------------------------------------------------------
# CPU: numpy emulation of the kernel's algorithm (tiles, packed GQA rows, mask, online softmax with
# exp2 and the -inf guard, P rounded to the dtype, split-KV partials, combine) against the reference
# ----------------------------------------------------------------------------------------------


def emulate(q, kp, vp, table, kv_lens, q_indptr, *, dtype, causal=True, slots=264, splits=None):
    total_q, heads, d = q.shape
    kvh = kp.shape[2]
    group = heads // kvh
    page_size = kp.shape[1]
    indptr = np.arange(len(kv_lens) + 1) if q_indptr is None else np.asarray(q_indptr)
    q_lens = np.diff(indptr)
    scale_log2 = np.float32(1 / math.sqrt(d) * math.log2(math.e))
    dt = NP_DTYPE[dtype]
    out = np.full((total_q, heads, d), np.nan)
    lse = np.full((total_q, heads), np.nan)
    specs = A.partition(q_lens, kv_lens, group=group, num_kv_heads=kvh, dtype=dtype, head_dim=d, causal=causal,
                        slots_of=lambda c: slots)
    for spec in specs:
        S = spec.num_splits if splits is None else splits
        bm, bn = spec.config.block_m, spec.config.block_n
        o_part = np.full((S, spec.n_part_rows, heads, d), np.nan)
        lse_part = np.full((S, spec.n_part_rows, heads), np.nan)
        for seq, mt, base in spec.work:
            q0, ql, kl = int(indptr[seq]), int(q_lens[seq]), int(kv_lens[seq])
            rows = np.arange(mt * bm, min((mt + 1) * bm, ql * group))
            qi, hg = rows // group, rows % group
            last = np.minimum(kl - ql + qi if causal else np.full_like(qi, kl - 1), kl - 1)
            n_keys = int(last.max()) + 1
            n_tiles_all = -(-n_keys // bn) if n_keys > 0 else 0
            tps = -(-n_tiles_all // S)
            for h in range(kvh):
                Q = q[q0 + qi, h * group + hg].astype(np.float32)
                for s in range(S):
                    m = np.full(len(rows), -np.inf, np.float32)
                    l = np.zeros(len(rows), np.float32)
                    o = np.zeros((len(rows), d), np.float32)
                    for t in range(s * tps, min(n_tiles_all, (s + 1) * tps)):
                        keys = np.arange(t * bn, (t + 1) * bn)
                        valid = keys < n_keys
                        K = np.zeros((bn, d), np.float32)
                        Vt = np.zeros((bn, d), np.float32)
                        for j in np.flatnonzero(valid):  # page gather, as paged.cuh addresses it
                            page = table[seq, keys[j] // page_size]
                            K[j] = kp[page, keys[j] % page_size, h]
                            Vt[j] = vp[page, keys[j] % page_size, h]
                        sc = (Q @ K.T) * scale_log2
                        sc = np.where(keys[None, :] > last[:, None], -np.inf, sc)
                        mx = np.maximum(m, sc.max(axis=1))
                        m_use = np.where(mx == -np.inf, 0, mx)
                        alpha = np.exp2(m - m_use)
                        p = np.exp2(sc - m_use[:, None])
                        l = l * alpha + p.sum(axis=1)
                        o = o * alpha[:, None] + p.astype(dt).astype(np.float32) @ Vt
                        m = mx
                    seen = l > 0
                    on = np.where(seen[:, None], o / np.where(seen, l, 1)[:, None], 0)
                    ls = np.where(seen, (m + np.log2(np.where(seen, l, 1))) * np.log(2), -np.inf)
                    if S == 1:
                        out[q0 + qi, h * group + hg] = on.astype(dt)
                        lse[q0 + qi, h * group + hg] = ls
                    else:
                        o_part[s, base + qi, h * group + hg] = on
                        lse_part[s, base + qi, h * group + hg] = ls
        if S > 1:  # combine_splits_kernel
            mx = lse_part.max(axis=0)
            w = np.where(np.isneginf(lse_part), 0, np.exp(lse_part - np.where(np.isneginf(mx), 0, mx)))
            wsum = w.sum(axis=0)
            acc = np.einsum("sph,sphd->phd", w, np.where(np.isneginf(lse_part)[..., None], 0, o_part))
            out[spec.part_qrow] = np.where(wsum[..., None] > 0, acc / np.where(wsum > 0, wsum, 1)[..., None], 0).astype(dt)
            lse[spec.part_qrow] = np.where(wsum > 0, mx + np.log(np.where(wsum > 0, wsum, 1)), -np.inf)
    return out, lse


EMULATION_CASES = [
    # (q_lens or None for decode, kv_lens, heads, kv_heads, page_size, causal, splits)
    (None, [1, 17, 97, 64, 65], 8, 2, 5, True, None),
    (None, [300, 63], 4, 1, 16, True, 3),  # forced splits: partials and combine
    ([7, 1, 0, 40], [7, 50, 3, 40], 4, 4, 1, True, 2),  # q_len = kv_len, decode row, no-query sequence
    ([5, 3], [2, 0], 2, 1, 4, True, 2),  # q_len > kv_len and kv_len 0: rows seeing nothing
    ([20, 1], [45, 9], 8, 8, 16, False, None),
    ([70], [200], 2, 1, 16, True, 4),  # prefill role (70 * 2 rows > 64) with splits
]


@pytest.mark.parametrize("case", EMULATION_CASES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_emulated_kernel_matches_reference(rng, case, dtype):
    q_lens, kv_lens, heads, kvh, ps, causal, splits = case
    d = 64
    kp, vp, table = make_cache(rng, kv_lens, page_size=ps, kv_heads=kvh, head_dim=d, dtype=dtype)
    q_indptr = None if q_lens is None else np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = make_q(rng, len(kv_lens) if q_lens is None else sum(q_lens), heads, d, dtype)
    out, lse = emulate(q, kp, vp, table, np.array(kv_lens), q_indptr, dtype=dtype, causal=causal, splits=splits)
    check_close(out, lse, q, kp, vp, table, kv_lens, q_indptr, dtype, causal)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


def _to_gpu(cp, *xs):
    return [cp.asarray(x) for x in xs]


def run_case(cp, rng, kv_lens, q_lens, *, heads, kv_heads, d, page_size, dtype, causal=True, plan_kw=None):
    kp, vp, table = make_cache(rng, kv_lens, page_size=page_size, kv_heads=kv_heads, head_dim=d, dtype=dtype)
    q_indptr = None if q_lens is None else np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = make_q(rng, len(kv_lens) if q_lens is None else int(sum(q_lens)), heads, d, dtype)
    lens = np.array(kv_lens, np.int32)
    gq, gk, gv, gt, gl = _to_gpu(cp, q, kp, vp, table, lens)
    out = cp.full(q.shape, np.nan, dtype=gq.dtype)  # poisoned: every element must be written
    lse = cp.full(q.shape[:2], np.nan, dtype=cp.float32)
    A.paged_attention(gq, gk, gv, gt, gl, q_indptr=None if q_indptr is None else cp.asarray(q_indptr), causal=causal,
                      out=out, lse=lse)
    check_close(out.get(), lse.get(), q, kp, vp, table, lens, q_indptr, dtype, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 5, 16, 128])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decode_page_sizes(cp, rng, page_size, dtype):
    kv_lens = [1, 17, 97, page_size - 1 or 1, page_size, page_size + 1, 2 * page_size + 1, 1000]
    run_case(cp, rng, kv_lens, None, heads=8, kv_heads=2, d=128, page_size=page_size, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (16, 2), (8, 1), (32, 1)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode_gqa_head_dims(cp, rng, heads, kv_heads, d):
    run_case(cp, rng, [33, 130, 2049], None, heads=heads, kv_heads=kv_heads, d=d, page_size=16, dtype="float16")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_prefill_and_chunked(cp, rng, d, dtype, heads, kv_heads):
    # q_len = kv_len (full prefill), 128 new of 300 (chunked), 7 of 97, 1 of 17 (a decode row in a mixed batch)
    q_lens, kv_lens = [128, 128, 7, 1, 97], [128, 300, 97, 17, 97]
    run_case(cp, rng, kv_lens, q_lens, heads=heads, kv_heads=kv_heads, d=d, page_size=16, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 5, 128])
def test_mixed_batch_odd_pages(cp, rng, page_size):
    q_lens, kv_lens = [1, 40, 1, 3, 200], [1, 40, 500, 64, 257]
    run_case(cp, rng, kv_lens, q_lens, heads=8, kv_heads=1, d=128, page_size=page_size, dtype="bfloat16")


@pytest.mark.gpu
def test_non_causal_and_empty_rows(cp, rng):
    run_case(cp, rng, [50, 7], [20, 3], heads=4, kv_heads=2, d=64, page_size=16, dtype="float16", causal=False)
    # more queries than keys (rows before the first key see nothing) and a zero-length sequence
    run_case(cp, rng, [3, 0, 9], [5, 2, 9], heads=4, kv_heads=2, d=64, page_size=4, dtype="float16")


@pytest.mark.gpu
def test_long_sequences(cp, rng):
    run_case(cp, rng, [16384], None, heads=8, kv_heads=2, d=128, page_size=16, dtype="float16")  # split-KV
    run_case(cp, rng, [16384], [128], heads=8, kv_heads=2, d=128, page_size=128, dtype="bfloat16")  # chunked
    run_case(cp, rng, [4096], [4096], heads=4, kv_heads=1, d=128, page_size=64, dtype="float16")  # long prefill


@pytest.mark.gpu
def test_graph_replay_with_new_lengths(cp, rng):
    heads, kvh, d, ps, batch, max_len = 8, 2, 128, 16, 3, 700
    kp, vp, table = make_cache(rng, [max_len] * batch, page_size=ps, kv_heads=kvh, head_dim=d, dtype="float16")
    q = make_q(rng, batch, heads, d, "float16")
    gq, gk, gv, gt = _to_gpu(cp, q, kp, vp, table)
    lens = cp.asarray(np.array([5, 100, 300], np.int32))
    plan = A.AttentionPlan(None, None, max_kv_len=max_len, batch=batch, num_heads=heads, num_kv_heads=kvh, head_dim=d,
                           page_size=ps, dtype="float16", max_pages_per_seq=table.shape[1])
    out = cp.full(q.shape, np.nan, dtype=gq.dtype)
    lse = cp.full((batch, heads), np.nan, dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        plan.run(gq, gk, gv, gt, lens, out=out, lse=lse)  # warm-up: compiles and loads outside the capture
        stream.begin_capture()
        plan.run(gq, gk, gv, gt, lens, out=out, lse=lse)
        graph = stream.end_capture()
        for new in ([1, 17, 97], [700, 16, 17], [64, 65, 699]):
            lens.set(np.array(new, np.int32))
            out.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            check_close(out.get(), lse.get(), q, kp, vp, table, np.array(new), None, "float16")


@pytest.mark.gpu
def test_plan_replays_same_arrays(cp, rng):
    # A run with the arrays of the plan's previous run skips validation and only launches: new q
    # values and lengths written in place must show, the split merge's counters must be re-armed
    # (splits > 1 here), and other arrays (a new `out`, a bad one) go through the full path.
    heads, kvh, d, ps, max_len = 8, 2, 128, 16, 3000
    kp, vp, table = make_cache(rng, [max_len, max_len], page_size=ps, kv_heads=kvh, head_dim=d, dtype="float16")
    gk, gv, gt = _to_gpu(cp, kp, vp, table)
    plan = A.AttentionPlan(None, None, max_kv_len=max_len, batch=2, num_heads=heads, num_kv_heads=kvh, head_dim=d,
                           page_size=ps, dtype="float16", max_pages_per_seq=table.shape[1])
    assert plan.launches[0].num_splits > 1
    gq = cp.empty((2, heads, d), cp.float16)
    lens = cp.empty(2, cp.int32)
    out = cp.empty((2, heads, d), cp.float16)
    lse = cp.empty((2, heads), cp.float32)
    for new_lens in ([3000, 17], [1, 2999], [1500, 1501]):
        q = make_q(rng, 2, heads, d, "float16")
        gq.set(q)
        lens.set(np.array(new_lens, np.int32))
        out.fill(np.nan)
        lse.fill(np.nan)
        res = plan.run(gq, gk, gv, gt, lens, out=out, lse=lse, return_lse=True)
        assert res[0] is out and res[1] is lse
        check_close(out.get(), lse.get(), q, kp, vp, table, np.array(new_lens), None, "float16")
    other = cp.full_like(out, np.nan)
    plan.run(gq, gk, gv, gt, lens, out=other)
    check_close(other.get(), None, q, kp, vp, table, np.array(new_lens), None, "float16")
    with pytest.raises(TypeError, match="out"):
        plan.run(gq, gk, gv, gt, lens, out=cp.empty((2, heads, d), cp.float32))


@pytest.mark.gpu
def test_plan_reuse_and_lse_return(cp, rng):
    kv_lens, q_lens = [60, 9], [4, 9]
    kp, vp, table = make_cache(rng, kv_lens, page_size=8, kv_heads=2, head_dim=64, dtype="float16")
    indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = make_q(rng, int(indptr[-1]), 4, 64, "float16")
    gq, gk, gv, gt, gl = _to_gpu(cp, q, kp, vp, table, np.array(kv_lens, np.int32))
    plan = A.AttentionPlan(indptr, np.array(kv_lens), num_heads=4, num_kv_heads=2, head_dim=64, page_size=8)
    for _ in range(2):
        out, lse = A.paged_attention(gq, gk, gv, gt, gl, plan=plan, return_lse=True)
        check_close(out.get(), lse.get(), q, kp, vp, table, kv_lens, indptr, "float16")
    with pytest.raises(ValueError, match="pass q_indptr to AttentionPlan"):
        A.paged_attention(gq, gk, gv, gt, gl, plan=plan, q_indptr=cp.asarray(indptr))


@pytest.mark.gpu
def test_check_tables_on_device(cp, rng):
    kp, vp, table = make_cache(rng, [20, 9], page_size=4, kv_heads=1, head_dim=64, dtype="float16")
    bad = table.copy()
    bad[1, 2] = kp.shape[0]  # out of range, within the 3 pages sequence 1 uses
    gq, gk, gv, gt, gl = _to_gpu(cp, make_q(rng, 2, 1, 64, "float16"), kp, vp, bad, np.array([20, 9], np.int32))
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]: expected a page id in"):
        A.paged_attention(gq, gk, gv, gt, gl, check_tables=True)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_append_kernel(cp, rng, page_size):
    kvh, d = 2, 128
    kp, vp, table = make_cache(rng, [10, 0, 33], page_size=page_size, kv_heads=kvh, head_dim=d, dtype="bfloat16",
                               spare_pages=0, extra_cols=3)
    # the new tokens' pages must already be in the table: extend each row with free pages we add
    num_new_pages = 3 * 3
    kp = np.concatenate([kp, np.full((num_new_pages,) + kp.shape[1:], np.nan, kp.dtype)])
    vp = np.concatenate([vp, np.full((num_new_pages,) + vp.shape[1:], np.nan, vp.dtype)])
    old, new = np.array([10, 0, 33]), np.array([5, 1, page_size + 2])
    after = old + new
    nxt = kp.shape[0] - num_new_pages
    for b in range(3):
        for p in range(-(-int(old[b]) // page_size), -(-int(after[b]) // page_size)):
            table[b, p] = nxt
            nxt += 1
    k_new = rng.standard_normal((int(new.sum()), kvh, d)).astype(ml_dtypes.bfloat16)
    v_new = rng.standard_normal((int(new.sum()), kvh, d)).astype(ml_dtypes.bfloat16)
    gk, gv = _to_gpu(cp, kp, vp)
    A.append_paged_kv(cp.asarray(k_new), cp.asarray(v_new), gk, gv, cp.asarray(table), cp.asarray(after.astype(np.int32)),
                      append_indptr=cp.asarray(np.concatenate([[0], np.cumsum(new)]).astype(np.int32)))
    want_k, want_v = kp.copy(), vp.copy()
    slots = A.slot_positions(after, new, table, page_size)
    want_k.reshape(-1, kvh, d)[slots] = k_new
    want_v.reshape(-1, kvh, d)[slots] = v_new
    np.testing.assert_array_equal(gk.get().view(np.uint16), want_k.view(np.uint16))  # bit-exact, NaN slots untouched
    np.testing.assert_array_equal(gv.get().view(np.uint16), want_v.view(np.uint16))


@pytest.mark.gpu
def test_paged_kv_cache_end_to_end(cp, rng):
    heads, kvh, d, ps = 8, 2, 64, 5
    cache = A.PagedKVCache(num_pages=30, page_size=ps, num_kv_heads=kvh, head_dim=d, dtype="float16",
                           max_pages_per_seq=20)
    cache.k_pages.fill(np.nan)
    cache.v_pages.fill(np.nan)
    a, b = cache.add_sequence(), cache.add_sequence()
    full = {a: [], b: []}

    def append(seq_ids, counts):
        k = rng.standard_normal((sum(counts), kvh, d)).astype(np.float16)
        v = rng.standard_normal((sum(counts), kvh, d)).astype(np.float16)
        cache.append(seq_ids, cp.asarray(k), cp.asarray(v), counts)
        at = 0
        for s, n in zip(seq_ids, counts):
            full[s].append((k[at : at + n], v[at : at + n]))
            at += n

    append([a, b], [12, 3])  # prefill chunk
    q = make_q(rng, 15, heads, d, "float16")
    out = cache.attention([a, b], cp.asarray(q), [12, 3]).get()
    table, lens = (x.get() for x in cache.tables([a, b]))
    kp, vp = cache.k_pages[0].get(), cache.v_pages[0].get()
    check_close(out, None, q, kp, vp, table, lens, np.array([0, 12, 15], np.int32), "float16")
    for _ in range(3):  # decode steps
        append([a, b], [1, 1])
        q = make_q(rng, 2, heads, d, "float16")
        out = cache.attention([a, b], cp.asarray(q)).get()
        table, lens = (x.get() for x in cache.tables([a, b]))
        check_close(out, None, q, cache.k_pages[0].get(), cache.v_pages[0].get(), table, lens, None, "float16")
    for s in (a, b):  # the cache holds exactly what was appended
        k = reference.gather_kv(cache.k_pages[0].get(), cache.pages.block_table([s])[0], cache.length(s))
        np.testing.assert_array_equal(k, np.concatenate([kk for kk, _ in full[s]]).astype(np.float64))
    before = cache.k_pages.get()
    big = cp.asarray(rng.standard_normal((200, kvh, d)).astype(np.float16))
    with pytest.raises(ValueError, match="nothing was written"):
        cache.append([a], big, big, [200])
    np.testing.assert_array_equal(cache.k_pages.get().view(np.uint16), before.view(np.uint16))
    assert cache.length(a) == 15


@pytest.mark.gpu
def test_paged_kv_cache_multi_layer(cp, rng):
    """Two layers sharing one page table: per-layer appends (the first reserves, the second reuses its pages),
    per-layer attention against the reference over that layer's pool."""
    L, heads, kvh, d, ps = 2, 8, 2, 64, 4
    cache = A.PagedKVCache(num_pages=40, page_size=ps, num_kv_heads=kvh, head_dim=d, dtype="bfloat16", num_layers=L,
                           max_pages_per_seq=16)
    assert cache.k_pages.shape == (L, 40, ps, kvh, d) and cache.layer(1)[0].shape == (40, ps, kvh, d)
    cache.k_pages.fill(np.nan)
    cache.v_pages.fill(np.nan)
    seqs = [cache.add_sequence() for _ in range(3)]
    for new in ([7, 1, 13], [1, 1, 1], [4, 9, 1]):
        free = None
        for layer in range(L):
            k = rng.standard_normal((sum(new), kvh, d)).astype(ml_dtypes.bfloat16)
            v = rng.standard_normal((sum(new), kvh, d)).astype(ml_dtypes.bfloat16)
            cache.append(seqs, cp.asarray(k), cp.asarray(v), new, layer=layer)
            if layer:
                assert cache.pages.free_pages == free, "the second layer reserved pages again"
            free = cache.pages.free_pages
            q = make_q(rng, sum(new), heads, d, "bfloat16")
            out = cache.attention(seqs, cp.asarray(q), new, layer=layer).get()
            table, lens = (x.get() for x in cache.tables(seqs, layer))
            kp, vp = (x.get() for x in cache.layer(layer))
            check_close(out, None, q, kp, vp, table, lens, np.concatenate([[0], np.cumsum(new)]).astype(np.int32),
                        "bfloat16")
    assert [cache.length(s, None) for s in seqs] == [12, 11, 15]


@pytest.mark.gpu
def test_paged_batch_graph_two_layer_decode(cp, rng):
    """A two-layer decode step (append + attention per layer) captured once from a PagedBatch and replayed
    after batch.step() with new lengths gives the uncaptured run's outputs bit for bit (a twin cache with
    the same page allocation runs the same batch calls eagerly), and both match the reference."""
    L, heads, kvh, d, ps, B = 2, 8, 2, 128, 16, 3
    prompt = [5, 17, 33]

    def make_cache():
        c = A.PagedKVCache(num_pages=64, page_size=ps, num_kv_heads=kvh, head_dim=d, dtype="float16", num_layers=L,
                           max_pages_per_seq=8)
        c.k_pages.fill(np.nan)
        c.v_pages.fill(np.nan)
        return c, [c.add_sequence() for _ in range(B)]

    graph_cache, seqs = make_cache()
    eager_cache, eager_seqs = make_cache()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for layer in range(L):  # prefill through the eager API
            k = rng.standard_normal((sum(prompt), kvh, d)).astype(np.float16)
            v = rng.standard_normal((sum(prompt), kvh, d)).astype(np.float16)
            for c, ss in ((graph_cache, seqs), (eager_cache, eager_seqs)):
                c.append(ss, cp.asarray(k), cp.asarray(v), prompt, layer=layer)
        gb = graph_cache.batch(seqs, num_heads=heads, max_kv_len=100)
        eb = eager_cache.batch(eager_seqs, num_heads=heads, max_kv_len=100)
        qb = [cp.empty((B, heads, d), cp.float16) for _ in range(L)]
        kb = [cp.empty((B, kvh, d), cp.float16) for _ in range(L)]
        vb = [cp.empty((B, kvh, d), cp.float16) for _ in range(L)]
        go = [cp.empty((B, heads, d), cp.float16) for _ in range(L)]
        eo = [cp.empty((B, heads, d), cp.float16) for _ in range(L)]

        def step(batch, outs):
            for layer in range(L):
                batch.append(layer, kb[layer], vb[layer])
                batch.attention(layer, qb[layer], out=outs[layer])

        graph = None
        for i in range(6):
            lens = gb.step()
            np.testing.assert_array_equal(eb.step(), lens)
            np.testing.assert_array_equal(lens, np.array(prompt) + i + 1)
            host = {}
            for layer in range(L):
                host[layer] = (make_q(rng, B, heads, d, "float16"), rng.standard_normal((B, kvh, d)).astype(np.float16),
                               rng.standard_normal((B, kvh, d)).astype(np.float16))
                for buf, x in zip((qb[layer], kb[layer], vb[layer]), host[layer]):
                    buf.set(x, stream=stream)
                go[layer].fill(np.nan)
            if graph is None:
                step(gb, go)  # compiles and loads the kernels outside the capture
                # this step ran eagerly; capture it now (nothing executes during capture)
                stream.begin_capture()
                step(gb, go)
                graph = stream.end_capture()
                with pytest.raises(ValueError, match="outside graph capture"):
                    stream.begin_capture()
                    try:
                        gb.step()
                    finally:
                        stream.end_capture()
            else:
                graph.launch(stream)
            step(eb, eo)
            stream.synchronize()
            for layer in range(L):
                np.testing.assert_array_equal(go[layer].get().view(np.uint16), eo[layer].get().view(np.uint16))
                kp, vp = (x.get() for x in graph_cache.layer(layer))
                q = host[layer][0]
                check_close(go[layer].get(), None, q, kp, vp, gb.block_table.get(), lens, None, "float16")
            np.testing.assert_array_equal(graph_cache.k_pages.get().view(np.uint16),
                                          eager_cache.k_pages.get().view(np.uint16))
    assert [graph_cache.length(s, None) for s in seqs] == [p + 6 for p in prompt]


@pytest.mark.gpu
def test_torch_in_torch_out(cp, rng):
    torch = pytest.importorskip("torch")
    kv_lens = [40, 3]
    kp, vp, table = make_cache(rng, kv_lens, page_size=16, kv_heads=2, head_dim=128, dtype="bfloat16")
    q = make_q(rng, 2, 4, 128, "bfloat16")
    t = lambda x: torch.from_numpy(np.asarray(x).view(np.int16) if x.dtype == ml_dtypes.bfloat16 else x).cuda()
    tq, tk, tv = (t(x).view(torch.bfloat16) for x in (q, kp, vp))
    out, lse = A.paged_attention(tq, tk, tv, t(table), t(np.array(kv_lens, np.int32)), return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and isinstance(lse, torch.Tensor)
    torch.cuda.synchronize()
    got = out.float().cpu().numpy()
    check_close(got, lse.cpu().numpy(), q, kp, vp, table, kv_lens, None, "bfloat16")
