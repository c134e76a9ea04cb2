"""cuflash.gemm: group_gemm, group_gemm_ragged, dual_gemm.

CPU tests (run in CI): validation errors, the host problem table and tile counts, the tile
heuristic, the dequantization bit recipes over every (code, scale) pair, and a thread-by-thread
numpy replay of the kernel (tests/gemm_emulator.py) against the float64 reference.
GPU tests (@pytest.mark.gpu): the kernels against the float64 reference, outputs poisoned first.

Tolerance (GPU tests): every product q*s is exact in fp16/bf16 and the tensor cores accumulate in
fp32, so the only visible error is the final rounding to the output type (half an ulp: 2^-11
relative for fp16, 2^-8 for bf16) plus fp32 accumulation error (~K * 2^-23 of the sum of |terms|,
below 1e-4 of the output's rms for the K used here). We allow rtol = 2 half-ulps of the output type
and atol = 1e-4 * rms(ref). One wrong scale block changes an output by about one block's share of
the sum, 1/sqrt(K/16) of its rms (>= 10% for K <= 4096), a hundred times over that budget.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cuflash import gemm, nvfp4, reference
import gemm_emulator as emu  # tests/ is on sys.path (pytest rootdir-relative import)

E4M3_NAN = (0x7F, 0xFF)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def rand_scales(rng, shape, lo=-3.0, hi=1.0) -> np.ndarray:
    """e4m3 bit patterns of +-2^U(lo, hi), about 1 in 16 zero: finite, never NaN."""
    mag = np.exp2(rng.uniform(lo, hi, size=shape)).astype(np.float32)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)
    val = np.where(rng.random(shape) < 1 / 16, 0.0, sign * mag).astype(np.float32)
    return val.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def rand_packed(rng, rows, k) -> np.ndarray:
    return rng.integers(0, 256, size=(rows, k // 2), dtype=np.uint8)


def rand_acts(rng, rows, k, dtype) -> np.ndarray:
    x = rng.standard_normal((rows, k)).astype(np.float32)
    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)


# ----------------------------------------------------------------------------------------------
# Dequantization bit recipes (common/dequant.cuh), exhaustively
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8_cvt", [True, False], ids=["sm89_e4m3_cvt", "sm80_fp16_bits"])
def test_dequant_recipe_exact_for_every_code_and_scale(fp8_cvt):
    # Words whose 8 nibbles run through all 16 codes in every position: (code + position) % 16.
    codes = (np.arange(16)[:, None] + np.arange(8)[None, :]) % 16  # [16 words, 8 positions]
    words = np.zeros(16, dtype=np.uint64)
    for pos in range(8):
        words |= codes[:, pos].astype(np.uint64) << np.uint64(4 * pos)
    for sbits in range(256):
        factor = emu.scale_factor(np.uint8(sbits), fp8_cvt)
        pairs = emu.dequant_e2m1x8(words, factor, fp8_cvt)
        got = np.zeros((16, 8), dtype=np.float64)
        for i, pw in enumerate(pairs):
            lo, hi = emu._halves(pw)
            got[:, 2 * i], got[:, 2 * i + 1] = lo, hi
        want = nvfp4.E2M1_VALUES[codes].astype(np.float64) * float(nvfp4.E4M3_VALUES[sbits])
        if sbits in E4M3_NAN:
            assert np.isnan(got).all()
        else:
            np.testing.assert_array_equal(got, want)
            # signed zeros too (the MMA does not care, but the recipe should be the plain product)
            assert np.array_equal(np.signbit(got[want == 0]), np.signbit(want[want == 0]))


# ----------------------------------------------------------------------------------------------
# Thread-by-thread replay of the kernel
# ----------------------------------------------------------------------------------------------


def _emulate(rng, *, m, n, k, tokens, blocked, block_m, warps_m, dual=False, fp8_cvt=True):
    a = rand_packed(rng, m, k) if tokens == "nvfp4" else rand_acts(rng, m, k, "float16")
    sfa = rand_scales(rng, (m, k // 16)) if tokens == "nvfp4" else None
    nb = 2 if dual else 1
    bs = [rand_packed(rng, n, k) for _ in range(nb)]
    sfbs = [rand_scales(rng, (n, k // 16)) for _ in range(nb)]
    alpha, alpha2 = 0.75, -1.25

    def flat(sf):
        if sf is None:
            return None
        return nvfp4.to_blocked(sf).reshape(-1) if blocked else sf.reshape(-1)

    got = emu.run_problem(a=a, b_list=bs, sfa=flat(sfa), sfb_list=[flat(s) for s in sfbs], m_rows=m, row_base=0,
                          n=n, k=k, blocked=blocked, block_m=block_m, warps_m=warps_m, tokens=tokens,
                          alpha=alpha, alpha2=alpha2, fp8_cvt=fp8_cvt)
    if dual:
        ref = reference.dual_gemm(a, bs[0], bs[1], sfa, sfbs[0], sfbs[1], alpha1=alpha, alpha2=alpha2)
    else:
        ref = reference.gemm(a, bs[0], sfa, sfbs[0], alpha=alpha)
    assert not np.isnan(got).any(), "the replay left outputs unwritten"
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


@pytest.mark.parametrize(
    "m,n,k,block_m,warps_m",
    [(5, 130, 64, 16, 1), (33, 40, 128, 32, 1), (17, 129, 128, 64, 1), (70, 9, 64, 128, 2)],
)
@pytest.mark.parametrize("tokens", ["nvfp4", "float16"])
@pytest.mark.parametrize("blocked", [False, True], ids=["plain", "blocked"])
def test_emulated_kernel_matches_reference(rng, m, n, k, block_m, warps_m, tokens, blocked):
    _emulate(rng, m=m, n=n, k=k, tokens=tokens, blocked=blocked, block_m=block_m, warps_m=warps_m)


def test_emulated_kernel_sm80_recipe(rng):
    _emulate(rng, m=9, n=20, k=64, tokens="nvfp4", blocked=False, block_m=16, warps_m=1, fp8_cvt=False)


@pytest.mark.parametrize("tokens", ["nvfp4", "float16"])
def test_emulated_dual_kernel(rng, tokens):
    _emulate(rng, m=20, n=36, k=64, tokens=tokens, blocked=True, block_m=64, warps_m=2, dual=True)


def test_emulated_ragged_rows(rng):
    # expert 1 of 3 is empty; rows are read at offsets[g] of the shared token matrix
    k, n = 64, 24
    offsets = [0, 3, 3, 11]
    a = rand_packed(rng, 11, k)
    sfa = rand_scales(rng, (11, k // 16))
    b = rng.integers(0, 256, size=(3, n, k // 2), dtype=np.uint8)
    sfb = rand_scales(rng, (3, n, k // 16))
    ref = reference.group_gemm_ragged(a, b, sfa, sfb, offsets)
    for g in range(3):
        lo, hi = offsets[g], offsets[g + 1]
        if hi == lo:
            continue
        got = emu.run_problem(a=a, b_list=[b[g]], sfa=sfa.reshape(-1), sfb_list=[sfb[g].reshape(-1)], m_rows=hi - lo,
                              row_base=lo, n=n, k=k, blocked=False, block_m=16, warps_m=1, tokens="nvfp4",
                              alpha=1.0, alpha2=1.0)
        np.testing.assert_allclose(got, ref[lo:hi], rtol=1e-9, atol=1e-9 * np.abs(ref).max())


# ----------------------------------------------------------------------------------------------
# Validation (numpy arrays: everything is checked before any GPU work)
# ----------------------------------------------------------------------------------------------


def _w4a4(rng, m=8, n=16, k=64):
    return rand_packed(rng, m, k), rand_packed(rng, n, k), rand_scales(rng, (m, k // 16)), rand_scales(rng, (n, k // 16))


def test_validate_accepts_good_call(rng):
    a, b, sfa, sfb = _w4a4(rng)
    prods, tokens, odt = gemm.validate_group_gemm([a], [b], [sfa], [sfb])
    assert (tokens, odt, prods[0].m, prods[0].n, prods[0].k) == ("nvfp4", "float16", 8, 16, 64)
    x = rand_acts(rng, 8, 64, "bfloat16")
    prods, tokens, _ = gemm.validate_group_gemm([x], [b], None, [sfb], out_dtype="float32")
    assert tokens == "bfloat16"


@pytest.mark.parametrize("k", [16, 32, 48, 80, 96])
def test_k_not_multiple_of_64_raises(rng, k):
    a, b, sfa, sfb = _w4a4(rng, k=k)
    with pytest.raises(ValueError, match="K must be a positive multiple of 64"):
        gemm.validate_group_gemm([a], [b], [sfa], [sfb])


def test_validation_errors(rng):
    a, b, sfa, sfb = _w4a4(rng)
    with pytest.raises(ValueError, match=r"b\[0\]: expected shape"):
        gemm.validate_group_gemm([a], [rand_packed(rng, 16, 128)], [sfa], [sfb])
    with pytest.raises(ValueError, match=r"sfb\[0\]: expected shape"):
        gemm.validate_group_gemm([a], [b], [sfa], [sfb[:, :2]])
    with pytest.raises(ValueError, match="sfa: expected 2 entries"):
        gemm.validate_group_gemm([a, a], [b, b], [sfa], [sfb, sfb])
    with pytest.raises(ValueError, match="need their scales sfa"):
        gemm.validate_group_gemm([a], [b], None, [sfb])
    with pytest.raises(ValueError, match="take no scales"):
        gemm.validate_group_gemm([rand_acts(rng, 8, 64, "float16")], [b], [sfa], [sfb])
    with pytest.raises(ValueError, match="scale_layout"):
        gemm.validate_group_gemm([a], [b], [sfa], [sfb], scale_layout="swizzled")
    with pytest.raises(ValueError, match="alpha: expected a scalar or 1 values"):
        gemm.validate_group_gemm([a], [b], [sfa], [sfb], alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"alpha\[0\]: expected a finite"):
        gemm.validate_group_gemm([a], [b], [sfa], [sfb], alpha=float("nan"))
    with pytest.raises(TypeError, match="out_dtype"):
        gemm.validate_group_gemm([a], [b], [sfa], [sfb], out_dtype="int8")
    with pytest.raises(TypeError, match=r"a\[0\]: expected dtype"):
        gemm.validate_group_gemm([a.astype(np.int32)], [b], [sfa], [sfb])
    with pytest.raises(ValueError, match="N >= 1"):
        gemm.validate_group_gemm([a], [b[:0]], [sfa], [sfb[:0]])
    with pytest.raises(ValueError, match=r"out\[0\]: expected shape"):
        gemm.validate_group_gemm([a], [b], [sfa], [sfb], out=[np.empty((8, 15), np.float16)])
    with pytest.raises(ValueError, match=r"out\[0\]: expected unit stride"):
        gemm.validate_group_gemm([a], [b], [sfa], [sfb], out=[np.empty((16, 8), np.float16).T])
    with pytest.raises(ValueError, match="same token kind"):
        gemm.validate_group_gemm([a, rand_acts(rng, 8, 64, "float16")], [b, b], [sfa, None], [sfb, sfb])


def test_blocked_scale_shape_checked(rng):
    a, b, sfa, sfb = _w4a4(rng, m=130, n=16, k=128)
    blk_a, blk_b = nvfp4.to_blocked(sfa), nvfp4.to_blocked(sfb)
    assert blk_a.shape == (2, 2, 32, 4, 4)
    gemm.validate_group_gemm([a], [b], [blk_a], [blk_b], scale_layout="blocked")
    with pytest.raises(ValueError, match=r"sfa\[0\]: expected shape"):
        gemm.validate_group_gemm([a], [b], [blk_a[:1]], [blk_b], scale_layout="blocked")


def test_batch_axis_L(rng):
    L = 3
    a = rng.integers(0, 256, size=(L, 8, 32), dtype=np.uint8).transpose(1, 2, 0)  # GPU MODE's [M, K/2, L] view
    b = rng.integers(0, 256, size=(L, 16, 32), dtype=np.uint8).transpose(1, 2, 0)
    sfa = rand_scales(rng, (L, 8, 4)).transpose(1, 2, 0)
    sfb = rand_scales(rng, (L, 16, 4)).transpose(1, 2, 0)
    prods, _, _ = gemm.validate_group_gemm([a], [b], [sfa], [sfb])
    p = prods[0]
    assert p.L == L and not p.a.needs_copy and p.a.l_stride == 8 * 32 and p.a.row_stride == 32
    table = gemm.build_table(prods, [(1 << 20, 16, 8 * 16 * 2)])
    assert len(table) == L
    np.testing.assert_array_equal(table["a"], p.a.ptr + np.arange(L) * 8 * 32)
    np.testing.assert_array_equal(table["sfb"], p.sfb[0].ptr + np.arange(L) * 16 * 4)
    np.testing.assert_array_equal(table["c"], (1 << 20) + np.arange(L) * 256)
    # a C-contiguous [M, K/2, L] array is not K-contiguous: the launch copies it
    prods, _, _ = gemm.validate_group_gemm([np.ascontiguousarray(a)], [b], [sfa], [sfb])
    assert prods[0].a.needs_copy


def test_ragged_validation(rng):
    k, n, G = 64, 32, 4
    a = rand_packed(rng, 10, k)
    sfa = rand_scales(rng, (10, k // 16))
    b = rng.integers(0, 256, size=(G, n, k // 2), dtype=np.uint8)
    sfb = rand_scales(rng, (G, n, k // 16))
    offsets = np.array([0, 0, 4, 4, 10], dtype=np.int32)
    rg, tokens, _ = gemm.validate_group_gemm_ragged(a, b, sfa, sfb, offsets, alpha=[1, 2, 3, 4])
    t = gemm.build_ragged_table(rg, 4096, n)
    assert list(t["m"]) == [-1] * G and list(t["group"]) == list(range(G)) and list(t["alpha"]) == [1, 2, 3, 4]
    np.testing.assert_array_equal(t["b"], rg.b.ptr + np.arange(G) * n * k // 2)
    np.testing.assert_array_equal(t["sfb"], rg.sfb.ptr + np.arange(G) * n * k // 16)
    assert set(t["rows_total"]) == {10}
    with pytest.raises(ValueError, match=r"offsets: expected shape \(5,\)"):
        gemm.validate_group_gemm_ragged(a, b, sfa, sfb, offsets[:4])
    with pytest.raises(TypeError, match="offsets: expected dtype int32"):
        gemm.validate_group_gemm_ragged(a, b, sfa, sfb, offsets.astype(np.int64))
    blk = gemm.validate_group_gemm_ragged(a, b, nvfp4.to_blocked(sfa),
                                          np.stack([nvfp4.to_blocked(s) for s in sfb]), offsets,
                                          scale_layout="blocked")[0]
    assert blk.sfb_group_stride == 512


def test_dequant_first_tables(rng):
    """W4A4 tokens dequantized first: a ragged call's shared token matrix is one dequant entry (each row
    once, a grid sized for the matrix, not one per expert); a group list keeps one entry per problem."""
    k, n, G = 128, 32, 64
    a = rand_packed(rng, 10, k)
    b = rng.integers(0, 256, size=(G, n, k // 2), dtype=np.uint8)
    offsets = np.sort(rng.integers(0, 11, G + 1)).astype(np.int32)
    offsets[0], offsets[-1] = 0, 10
    rg, _, _ = gemm.validate_group_gemm_ragged(a, b, rand_scales(rng, (10, k // 16)), rand_scales(rng, (G, n, k // 16)),
                                               offsets)
    t = gemm.build_ragged_table(rg, 4096, n)
    ws, nbytes = gemm.dequant_workspace(t)
    assert nbytes == 10 * k * 2 and not ws.any()
    deq, main = gemm.dequant_tables(t, (1 << 20) + ws)
    assert len(deq) == 1 and deq["m"][0] == 10 and deq["a"][0] == t["a"][0] and deq["c_row"][0] == k
    assert gemm.dequant_grid(deq) == (gemm.V.ceil_div(10 * k // 16, gemm._DEQUANT_THREADS), 1)
    assert len(main) == G and (main["m"] == -1).all() and (main["a"] == 1 << 20).all() and (main["a_row"] == 2 * k).all()
    prods, _, _ = gemm.validate_group_gemm(*[[x, y] for x, y in zip(_w4a4(rng, m=3), _w4a4(rng, m=5))])
    t = gemm.build_table(prods, [(0, 1, 0), (0, 1, 0)])
    ws, nbytes = gemm.dequant_workspace(t)
    deq, _ = gemm.dequant_tables(t, 4096 + ws)
    assert list(deq["m"]) == [3, 5] and list(deq["c"]) == [4096, 4096 + 3 * 64 * 2]  # _w4a4: K = 64
    # which configs dequantize first: every hopper W4A4 one, and the portable 16-token tiles (not dual)
    assert gemm.choose_config("nvfp4", False, 8).dequant_first
    assert not gemm.choose_config("nvfp4", False, 40).dequant_first
    assert not gemm.choose_config("float16", False, 8).dequant_first
    assert gemm.choose_config("nvfp4", False, 8).name_expression() == gemm.choose_config("float16", False, 8).name_expression()


def test_dual_validation(rng):
    a, b, sfa, sfb = _w4a4(rng)
    gemm.validate_dual_gemm(a, b, b, sfa, sfb, sfb, alpha1=2.0)
    with pytest.raises(ValueError, match="b2: expected shape"):
        gemm.validate_dual_gemm(a, b, rand_packed(rng, 24, 64), sfa, sfb, sfb)


# ----------------------------------------------------------------------------------------------
# Tile counts and the heuristic
# ----------------------------------------------------------------------------------------------


def test_tile_counts():
    assert gemm.tile_count([0, 1, 300], [4096, 129, 5], 128) == 0 + 1 * 2 + 3 * 1
    # ragged: 64 experts of 1..16 rows in 16-row tiles: at most one partial tile per expert
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 17, size=64)
    bound = gemm.ragged_tile_bound(int(rows.sum()), 64, 4096, 16)
    assert gemm.tile_count(list(rows), [4096] * 64, 16) <= bound
    assert gemm.ragged_tile_bound(0, 8, 256, 16) == 0


def test_choose_config_and_variants():
    assert gemm.choose_config("nvfp4", False, 1).block_m == 16
    assert gemm.choose_config("nvfp4", False, 33).block_m == 64
    assert gemm.choose_config("float16", False, 248).block_m == 64
    assert gemm.choose_config("float16", False, 513).block_m == 128
    assert gemm.choose_config("nvfp4", True, 512).dual
    variants = gemm.kernel_variants()
    for tok in ("nvfp4", "float16", "bfloat16"):
        for rows in (0, 1, 16, 17, 32, 64, 65, 10000):
            assert gemm.choose_config(tok, False, rows) in variants
        assert gemm.choose_config(tok, True, 256) in variants
    names = {v.kernel_name() for v in variants}
    assert len(names) == len(variants)


def test_hopper_row_blocks_choice():
    """The hopper kernel's 128- or 256-row tiles by the time model (gemm._HOPPER_TILE_US, fitted on
    the H100): 256 rows where they keep the SMs busy (GPU MODE case 2: 364 tiles of 256 rows), 128
    where halving the tiles would leave SMs idle or add a round (cases 1, 3, 4)."""
    cases = {  # (ms, N, K): row blocks
        ((80, 176, 128, 72, 64, 248, 96, 160), 4096, 7168): 1,
        ((40, 76, 168, 72, 164, 148, 196, 160), 7168, 2048): 2,
        ((192, 320), 3072, 4096): 1,
        ((128, 384), 4096, 1536): 1,
    }
    variants = gemm.kernel_variants()
    for (ms, n, k), rb in cases.items():
        cfg = gemm.choose_config("float16", False, max(ms), "hopper", shapes=[(m, n, k) for m in ms], sms=132)
        assert cfg.row_blocks == rb and cfg.block_n == 128 * rb and cfg in variants, (ms, cfg)
    # no shapes, dual, or small tiles: 128 rows
    assert gemm.choose_config("nvfp4", False, 200, "hopper").row_blocks == 1
    assert gemm.choose_config("nvfp4", True, 200, "hopper").row_blocks == 1
    with pytest.raises(ValueError, match="row_blocks"):
        gemm.GemmKernelConfig("float16", 128, 1, 6, dual=True, arch="hopper", row_blocks=2)


def test_stream_k_choice(monkeypatch):
    """Stream-K where whole tiles fill the last wave badly (GPU MODE case 1: 352 tiles = 2.67 waves of 132),
    data parallel where they do not (case 4: 128 tiles in one wave) and wherever stream-K is not allowed
    (ragged rows, mixed K, the portable kernel); CUFLASH_GEMM_STREAMK forces either way."""
    monkeypatch.delenv(gemm.STREAM_K_ENV, raising=False)
    cfg = gemm.GemmKernelConfig("float16", 128, 1, 8, arch="hopper")

    def table(ms, k, ks=None):
        t = np.zeros(len(ms), dtype=gemm.PROBLEM_DTYPE)
        t["m"], t["k"] = ms, ks if ks is not None else k
        return t

    case1 = table([80, 176, 128, 72, 64, 248, 96, 160], 7168)
    assert gemm.stream_k_grid(cfg, case1, 352, 132) == 132
    assert gemm.stream_k_grid(cfg, table([128, 384], 1536), 128, 132) == 0
    assert gemm.stream_k_grid(cfg, table([-1, -1], 7168), 352, 132) == 0  # ragged
    assert gemm.stream_k_grid(cfg, table([80, 176], 0, [7168, 2048]), 352, 132) == 0  # mixed K
    portable = gemm.GemmKernelConfig("float16", 128, 2)
    assert gemm.stream_k_grid(portable, case1, 352, 132) == 0
    monkeypatch.setenv(gemm.STREAM_K_ENV, "0")
    assert gemm.stream_k_grid(cfg, case1, 352, 132) == 0
    monkeypatch.setenv(gemm.STREAM_K_ENV, "1")
    assert gemm.stream_k_grid(cfg, table([1], 128), 1, 132) == 2  # at most one CTA per unit (1 tile x 2 stages)
    assert gemm.stream_k_slot_floats(cfg) == 64 * 256
    assert gemm.stream_k_slot_floats(gemm.GemmKernelConfig("float16", 64, 1, 8, dual=True, arch="hopper")) == 2 * 32 * 256


def test_smem_fits_hopper():
    # 227 KB is the opt-in limit per block on sm_80 / sm_90
    for v in gemm.kernel_variants():
        assert v.smem_bytes(256) <= 227 * 1024, v


def test_problem_struct_matches_cuda():
    """PROBLEM_DTYPE against struct GemmProblem as declared in tile_scheduler.cuh: the same fields
    in the same order at their natural (C) offsets."""
    import re

    from cuflash import _jit

    text = (_jit.source_dir() / "common" / "tile_scheduler.cuh").read_text()
    body = re.search(r"struct GemmProblem \{(.*?)\};", text, re.S).group(1)
    sizes = {"long long": 8, "int": 4, "float": 4}
    fields, off = [], 0
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        m = re.match(r"(long long|int|float)\s+(.*);", line)
        assert m, f"unexpected line in GemmProblem: {line!r}"
        size = sizes[m.group(1)]
        for name in (n.strip() for n in m.group(2).split(",")):
            off = -(-off // size) * size
            fields.append((name, off))
            off += size
    assert fields == [(name, o) for name, (_, o) in gemm.PROBLEM_DTYPE.fields.items()]
    assert off == gemm.PROBLEM_DTYPE.itemsize == 128


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

_RTOL = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 1e-5}
_OVERFLOW = {"float16": 65520.0, "bfloat16": 3.3961e38, "float32": np.inf}


def _check(out, ref, out_dtype):
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == ref.shape
    assert not np.isnan(out).any(), f"{int(np.isnan(out).sum())} output elements never written (still NaN)"
    # A product beyond the output type's range rounds to +-inf (fp16 overflows from 65520): such elements
    # must be inf of the right sign; a thin band around the threshold may go either way.
    over = _OVERFLOW[out_dtype]
    mag = np.abs(ref)
    must_inf, may_inf = mag > over * (1 + 1e-3), mag > over * (1 - 1e-3)
    assert (out[must_inf] == np.sign(ref[must_inf]) * np.inf).all(), "an overflowing element is not +-inf"
    finite = ~may_inf | np.isfinite(out)
    fin_ref = ref[~may_inf]
    rms = float(np.sqrt(np.mean(fin_ref**2))) if fin_ref.size else 0.0
    with np.errstate(invalid="ignore"):  # inf - inf in the elements masked out
        err = np.where(finite & ~must_inf, np.abs(out - ref), 0.0)
    bound = _RTOL[out_dtype] * mag + 1e-4 * rms
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.size} elements off; worst at {np.unravel_index(np.argmax(err - bound), err.shape)}: "
        f"got {out.reshape(-1)[np.argmax(err - bound)]}, want {ref.reshape(-1)[np.argmax(err - bound)]}"
    )


def _to_np(cp, x):
    x = cp.asnumpy(x)
    return x.astype(np.float64) if x.dtype != ml_dtypes.bfloat16 else x.astype(np.float32).astype(np.float64)


def _poisoned(cp, shape, dtype, L=None):
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    if L is None:
        y = cp.empty(shape, dtype=dt)
    else:
        y = cp.moveaxis(cp.empty((L,) + shape, dtype=dt), 0, 2)
    y[...] = cp.asarray(np.array(np.nan, dtype=np.float32)).astype(dt)
    return y


def _group_inputs(rng, ms, ns, ks, tokens, L=None, act_dtype="float16"):
    A, B, SA, SB = [], [], [], []
    for m, n, k in zip(ms, ns, ks):
        lshape = () if L is None else (L,)
        if tokens == "nvfp4":
            a = rng.integers(0, 256, size=lshape + (m, k // 2), dtype=np.uint8)
            sa = rand_scales(rng, lshape + (m, k // 16))
        else:
            a = rng.standard_normal(lshape + (m, k)).astype(np.float32)
            a = a.astype(ml_dtypes.bfloat16 if act_dtype == "bfloat16" else np.float16)
            sa = None
        b = rng.integers(0, 256, size=lshape + (n, k // 2), dtype=np.uint8)
        sb = rand_scales(rng, lshape + (n, k // 16))
        if L is not None:  # GPU MODE's [rows, cols, L] views of [L, rows, cols] storage
            a, b = np.moveaxis(a, 0, 2), np.moveaxis(b, 0, 2)
            sa = None if sa is None else np.moveaxis(sa, 0, 2)
            sb = np.moveaxis(sb, 0, 2)
        A.append(a), B.append(b), SA.append(sa), SB.append(sb)
    return A, B, (None if tokens != "nvfp4" else SA), SB


def _dev(cp, x, L=None):
    """numpy -> CuPy keeping GPU MODE's L-last view over L-major storage."""
    if x is None:
        return None
    if x.ndim == 3 and L is not None:
        return cp.moveaxis(cp.asarray(np.ascontiguousarray(np.moveaxis(x, 2, 0))), 0, 2)
    return cp.asarray(x)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", ["nvfp4", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["plain", "blocked"])
@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16", "float32"])
def test_group_gemm_random_shapes(cp, rng, tokens, layout, out_dtype):
    ms = [0, 1, 7, 33, 128, 300]
    ns = [200, 129, 64, 1000, 72, 136]
    ks = [64, 128, 192, 512, 256, 1024]
    A, B, SA, SB = _group_inputs(rng, ms, ns, ks, "nvfp4" if tokens == "nvfp4" else "act", act_dtype=tokens)
    alpha = list(rng.uniform(0.25, 2.0, size=len(ms)))
    refs = reference.group_gemm(A, B, SA, SB, alpha=alpha)
    dev = lambda xs: [cp.asarray(x) for x in xs]  # noqa: E731
    if layout == "blocked":
        sa = None if SA is None else [cp.asarray(nvfp4.to_blocked(s)) for s in SA]
        sb = [cp.asarray(nvfp4.to_blocked(s)) for s in SB]
    else:
        sa = None if SA is None else dev(SA)
        sb = dev(SB)
    outs = [_poisoned(cp, (m, n), out_dtype) for m, n in zip(ms, ns)]
    got = gemm.group_gemm(dev(A), dev(B), sa, sb, alpha=alpha, out=outs, scale_layout=layout)
    assert got is outs
    for o, r in zip(got, refs):
        _check(_to_np(cp, o), r, out_dtype)
    # and with freshly allocated outputs
    got2 = gemm.group_gemm(dev(A), dev(B), sa, sb, alpha=alpha, out_dtype=out_dtype, scale_layout=layout)
    for o, r in zip(got2, refs):
        _check(_to_np(cp, o), r, out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", ["nvfp4", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["plain", "blocked"])
def test_group_gemm_decode_shapes(cp, rng, tokens, layout):
    """At most 16 rows per group (decode): the 16-token tiles, 4 k-steps of 64 per pipeline stage; K = 576
    and 1152 end on a partial stage (9 = 4 + 4 + 1, 18 = 4 x 4 + 2); W4A4 tokens dequantized first."""
    ms, ns, ks = [1, 16, 7], [200, 130, 64], [576, 1152, 256]
    A, B, SA, SB = _group_inputs(rng, ms, ns, ks, "nvfp4" if tokens == "nvfp4" else "act", act_dtype=tokens)
    alpha = list(rng.uniform(0.25, 2.0, size=len(ms)))
    refs = reference.group_gemm(A, B, SA, SB, alpha=alpha)
    if layout == "blocked":
        sa = None if SA is None else [cp.asarray(nvfp4.to_blocked(s)) for s in SA]
        sb = [cp.asarray(nvfp4.to_blocked(s)) for s in SB]
    else:
        sa = None if SA is None else [cp.asarray(s) for s in SA]
        sb = [cp.asarray(s) for s in SB]
    outs = [_poisoned(cp, (m, n), "float32") for m, n in zip(ms, ns)]
    gemm.group_gemm([cp.asarray(a) for a in A], [cp.asarray(b) for b in B], sa, sb, alpha=alpha, out=outs,
                    scale_layout=layout)
    for o, r in zip(outs, refs):
        _check(_to_np(cp, o), r, "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["plain", "blocked"])
@pytest.mark.parametrize("tokens", ["nvfp4", "float16"])
def test_group_gemm_batch_L(cp, rng, layout, tokens):
    L = 3
    ms, ns, ks = [40, 130], [72, 256], [256, 128]
    A, B, SA, SB = _group_inputs(rng, ms, ns, ks, "nvfp4" if tokens == "nvfp4" else "act", L=L)
    refs = reference.group_gemm(A, B, SA, SB, alpha=1.5)
    if layout == "blocked":
        sa = None if SA is None else [cp.asarray(nvfp4.to_blocked(s)) for s in SA]
        sb = [cp.asarray(nvfp4.to_blocked(s)) for s in SB]
    else:
        sa = None if SA is None else [_dev(cp, s, L) for s in SA]
        sb = [_dev(cp, s, L) for s in SB]
    outs = [_poisoned(cp, (m, n), "float16", L=L) for m, n in zip(ms, ns)]
    gemm.group_gemm([_dev(cp, x, L) for x in A], [_dev(cp, x, L) for x in B], sa, sb, alpha=1.5, out=outs,
                    scale_layout=layout)
    for o, r in zip(outs, refs):
        _check(_to_np(cp, o), r, "float16")
    # C-contiguous [M, K/2, L] inputs are not K-contiguous: copied, same result
    got = gemm.group_gemm([cp.asarray(np.ascontiguousarray(x)) for x in A], [cp.asarray(np.ascontiguousarray(x)) for x in B],
                          sa, sb, alpha=1.5, scale_layout=layout)
    for o, r in zip(got, refs):
        assert o.shape == r.shape
        _check(_to_np(cp, o), r, "float16")


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", ["nvfp4", "float16"])
@pytest.mark.parametrize("layout", ["plain", "blocked"])
@pytest.mark.parametrize("rows", [[0, 5, 0, 16, 1, 0, 37, 3], [0] * 8, [64] * 4 + [0] * 4])
def test_group_gemm_ragged(cp, rng, tokens, layout, rows):
    # K = 704: 11 k-steps of 64, so 16-token tiles (4 steps per pipeline stage) wrap their ring and end on 3
    G, n, k = len(rows), 200, 704
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    total = int(offsets[-1])
    a = rand_packed(rng, total, k) if tokens == "nvfp4" else rand_acts(rng, total, k, "float16")
    sfa = rand_scales(rng, (total, k // 16)) if tokens == "nvfp4" else None
    b = rng.integers(0, 256, size=(G, n, k // 2), dtype=np.uint8)
    sfb = rand_scales(rng, (G, n, k // 16))
    alpha = list(rng.uniform(0.5, 2, size=G))
    ref = reference.group_gemm_ragged(a, b, sfa, sfb, offsets, alpha=alpha)
    if layout == "blocked":
        sa = None if sfa is None else cp.asarray(nvfp4.to_blocked(sfa))
        sb = cp.asarray(np.stack([nvfp4.to_blocked(s) for s in sfb]))
    else:
        sa = None if sfa is None else cp.asarray(sfa)
        sb = cp.asarray(sfb)
    out = _poisoned(cp, (total, n), "float16")
    gemm.group_gemm_ragged(cp.asarray(a), cp.asarray(b), sa, sb, cp.asarray(offsets), alpha=alpha, out=out,
                           scale_layout=layout)
    _check(_to_np(cp, out), ref, "float16")


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", ["nvfp4", "float16"])
@pytest.mark.parametrize("m,n,k", [(1, 72, 64), (33, 300, 256), (200, 129, 512)])
def test_dual_gemm(cp, rng, tokens, m, n, k):
    a = rand_packed(rng, m, k) if tokens == "nvfp4" else rand_acts(rng, m, k, "float16")
    sfa = rand_scales(rng, (m, k // 16)) if tokens == "nvfp4" else None
    b1, b2 = rand_packed(rng, n, k), rand_packed(rng, n, k)
    s1, s2 = rand_scales(rng, (n, k // 16)), rand_scales(rng, (n, k // 16))
    ref = reference.dual_gemm(a, b1, b2, sfa, s1, s2, alpha1=0.5, alpha2=1.5)
    out = _poisoned(cp, (m, n), "float16")
    gemm.dual_gemm(cp.asarray(a), cp.asarray(b1), cp.asarray(b2), None if sfa is None else cp.asarray(sfa),
                   cp.asarray(s1), cp.asarray(s2), alpha1=0.5, alpha2=1.5, out=out)
    _check(_to_np(cp, out), ref, "float16")
    blk = lambda s: cp.asarray(nvfp4.to_blocked(s))  # noqa: E731
    got = gemm.dual_gemm(cp.asarray(a), cp.asarray(b1), cp.asarray(b2), None if sfa is None else blk(sfa), blk(s1),
                         blk(s2), alpha1=0.5, alpha2=1.5, scale_layout="blocked", out_dtype="float32")
    _check(_to_np(cp, got), ref, "float32")


@pytest.mark.gpu
def test_quantized_end_to_end(cp, rng):
    """cuflash.quantize on both operands, alpha = 1/(gs_a gs_b): close to the float matmul."""
    x = cp.asarray(rng.standard_normal((37, 512)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((300, 512)).astype(np.float32))
    qx, qw = nvfp4.quantize(x), nvfp4.quantize(w)
    alpha = float(1.0 / (qx.global_scale * qw.global_scale))
    (y,) = gemm.group_gemm([qx.data], [qw.data], [qx.scales], [qw.scales], alpha=alpha, out_dtype="float32")
    ref = reference.gemm(cp.asnumpy(qx.data), cp.asnumpy(qw.data), cp.asnumpy(qx.scales), cp.asnumpy(qw.scales), alpha=alpha)
    _check(cp.asnumpy(y).astype(np.float64), ref, "float32")


@pytest.mark.gpu
def test_torch_in_torch_out(rng):
    torch = pytest.importorskip("torch")
    m, n, k = 20, 136, 128
    a, b = rand_packed(rng, m, k), rand_packed(rng, n, k)
    sa, sb = rand_scales(rng, (m, k // 16)), rand_scales(rng, (n, k // 16))
    ref = reference.gemm(a, b, sa, sb)
    ta = torch.from_numpy(a).cuda().view(torch.float4_e2m1fn_x2) if hasattr(torch, "float4_e2m1fn_x2") else torch.from_numpy(a).cuda()
    tb = torch.from_numpy(b).cuda().view(ta.dtype)
    tsa = torch.from_numpy(sa).cuda().view(torch.float8_e4m3fn)
    tsb = torch.from_numpy(sb).cuda().view(torch.float8_e4m3fn)
    (y,) = gemm.group_gemm([ta], [tb], [tsa], [tsb])
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float16 and y.is_cuda
    _check(y.float().cpu().numpy().astype(np.float64), ref, "float16")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = gemm.dual_gemm(x, tb, tb, None, tsb, tsb)
    assert isinstance(y, torch.Tensor) and y.shape == (m, n)
    ref2 = reference.dual_gemm(x.float().cpu().numpy(), b, b, None, sb, sb)
    _check(y.float().cpu().numpy().astype(np.float64), ref2, "float16")


def test_launch_cache_keys_only_gpu_arrays():
    a = [np.zeros((4, 32), np.uint8)]
    assert gemm._launch_key("group", (a, a, a, a, a), (None, None, "plain")) is None


@pytest.mark.gpu
def test_repeated_calls_replay_the_launch_and_read_new_contents(cp, rng):
    ms, ns, ks = [5, 40], [136, 72], [128, 256]
    A, B, SA, SB = _group_inputs(rng, ms, ns, ks, "nvfp4")
    dA, dB, dSA, dSB = ([cp.asarray(x) for x in xs] for xs in (A, B, SA, SB))
    outs = [_poisoned(cp, (m, n), "float16") for m, n in zip(ms, ns)]
    gemm.group_gemm(dA, dB, dSA, dSB, out=outs, alpha=0.5)
    key = gemm._launch_key("group", (dA, dB, dSA, dSB, outs), (0.5, None, "plain"))
    assert key in gemm._launch_cache
    A2, B2, SA2, SB2 = _group_inputs(rng, ms, ns, ks, "nvfp4")  # new contents in the same arrays
    for dev, host in zip(dA + dB + dSA + dSB, A2 + B2 + SA2 + SB2):
        dev.set(host)
    outs2 = [_poisoned(cp, (m, n), "float16") for m, n in zip(ms, ns)]
    for o, o2 in zip(outs, outs2):
        o[...] = o2
    gemm.group_gemm(dA, dB, dSA, dSB, out=outs, alpha=0.5)  # replayed
    for o, r in zip(outs, reference.group_gemm(A2, B2, SA2, SB2, alpha=0.5)):
        _check(_to_np(cp, o), r, "float16")


def test_empty_output_with_zero_strides_is_accepted(rng):
    # NumPy 2 gives empty arrays zero strides; an M = 0 group's output must still validate
    k, n = 64, 72
    a, b = [rand_packed(rng, 0, k)], [rand_packed(rng, n, k)]
    sa, sb = [rand_scales(rng, (0, k // 16))], [rand_scales(rng, (n, k // 16))]
    out = [np.empty((0, n), np.float16)]
    prods, _, _ = gemm.validate_group_gemm(a, b, sa, sb, out=out)
    assert prods[0].m == 0


def test_plans_need_out(rng):
    with pytest.raises(ValueError, match="`out`, which is required"):
        gemm.plan_group_gemm([rand_packed(rng, 2, 64)], [rand_packed(rng, 8, 64)], None, [rand_scales(rng, (8, 4))])


@pytest.mark.gpu
def test_plan_runs_and_replays_in_a_cuda_graph(cp, rng):
    ms, ns, ks = [3, 20], [72, 136], [64, 192]
    A, B, SA, SB = _group_inputs(rng, ms, ns, ks, "act")
    dA, dB, dSB = ([cp.asarray(x) for x in xs] for xs in (A, B, SB))
    outs = [_poisoned(cp, (m, n), "float16") for m, n in zip(ms, ns)]
    plan = gemm.plan_group_gemm(dA, dB, None, dSB, alpha=2.0, out=outs)
    assert all(cp.isnan(o).all() for o in outs)  # planning launches nothing
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        plan.run(stream)
        stream.synchronize()
        for o, r in zip(outs, reference.group_gemm(A, B, None, SB, alpha=2.0)):
            _check(_to_np(cp, o), r, "float16")
        A2 = [rand_acts(rng, m, k, "float16") for m, k in zip(ms, ks)]
        for d, h in zip(dA, A2):
            d.set(h)
        stream.begin_capture()
        plan.run(stream)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    for o, r in zip(outs, reference.group_gemm(A2, B, None, SB, alpha=2.0)):
        _check(_to_np(cp, o), r, "float16")


# ----------------------------------------------------------------------------------------------
# Hopper wgmma variant (forced with CUFLASH_GEMM_WGMMA=1 on a compute capability 9.0 device)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def wgmma(cp, monkeypatch):
    """Selects the wgmma kernel for the calls of the test; skips where the device is not sm_90."""
    from cuflash import _jit

    if _jit.device_cc(cp.cuda.Device().id) != (9, 0):
        pytest.skip("the wgmma GEMM needs a compute capability 9.0 GPU")
    monkeypatch.setenv(gemm.WGMMA_ENV, "1")
    assert gemm.launch_arch(cp.cuda.Device().id) == "hopper"


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", ["float16", "bfloat16", "nvfp4"])
@pytest.mark.parametrize("layout", ["plain", "blocked"])
def test_group_gemm_wgmma(cp, rng, wgmma, tokens, layout):
    # token tiles 16 / 32 / 64 / 128 (the wgmma N) and a multi-tile M; N % 128 != 0; long K
    ms = [0, 1, 17, 33, 128, 300]
    ns = [200, 72, 136, 1000, 129, 256]
    ks = [64, 192, 64, 512, 256, 1024]
    A, B, SA, SB = _group_inputs(rng, ms, ns, ks, "nvfp4" if tokens == "nvfp4" else "act", act_dtype=tokens)
    alpha = list(rng.uniform(0.25, 2.0, size=len(ms)))
    refs = reference.group_gemm(A, B, SA, SB, alpha=alpha)
    conv = (lambda s: cp.asarray(nvfp4.to_blocked(s))) if layout == "blocked" else cp.asarray
    sa = None if SA is None else [conv(s) for s in SA]
    for out_dtype in ("float16", "float32"):
        outs = [_poisoned(cp, (m, n), out_dtype) for m, n in zip(ms, ns)]
        gemm.group_gemm([cp.asarray(x) for x in A], [cp.asarray(x) for x in B], sa, [conv(s) for s in SB],
                        alpha=alpha, out=outs, scale_layout=layout)
        for o, r in zip(outs, refs):
            _check(_to_np(cp, o), r, out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", ["nvfp4", "float16"])
def test_ragged_and_dual_gemm_wgmma(cp, rng, wgmma, tokens):
    rows, n, k = [0, 5, 0, 16, 1, 0, 37, 3], 200, 256
    G = len(rows)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    total = int(offsets[-1])
    a = rand_packed(rng, total, k) if tokens == "nvfp4" else rand_acts(rng, total, k, "float16")
    sfa = rand_scales(rng, (total, k // 16)) if tokens == "nvfp4" else None
    b = rng.integers(0, 256, size=(G, n, k // 2), dtype=np.uint8)
    sfb = rand_scales(rng, (G, n, k // 16))
    ref = reference.group_gemm_ragged(a, b, sfa, sfb, offsets, alpha=0.75)
    out = _poisoned(cp, (total, n), "float16")
    gemm.group_gemm_ragged(cp.asarray(a), cp.asarray(b), None if sfa is None else cp.asarray(sfa), cp.asarray(sfb),
                           cp.asarray(offsets), alpha=0.75, out=out)
    _check(_to_np(cp, out), ref, "float16")
    b1, b2 = rand_packed(rng, n, k), rand_packed(rng, n, k)
    s1, s2 = rand_scales(rng, (n, k // 16)), rand_scales(rng, (n, k // 16))
    ref = reference.dual_gemm(a, b1, b2, sfa, s1, s2, alpha1=0.5, alpha2=1.5)
    got = gemm.dual_gemm(cp.asarray(a), cp.asarray(b1), cp.asarray(b2), None if sfa is None else cp.asarray(sfa),
                         cp.asarray(s1), cp.asarray(s2), alpha1=0.5, alpha2=1.5, out_dtype="bfloat16")
    _check(_to_np(cp, got), ref, "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["one_tile", "gpumode1"])
def test_group_gemm_wgmma_stream_k_is_deterministic(cp, rng, wgmma, monkeypatch, case):
    """Stream-K sums a tile's pieces in CTA order whichever piece finishes last: repeated calls give the same
    bits (fp32 output, so that no rounding to fp16 hides an ulp; 12 calls). One tile of K = 8192 is split over
    128 CTAs, one k-stage each, whose finishing order varies from call to call (three or more pieces summed
    in finishing order differ in the last bits); then GPU MODE case 1's shapes."""
    monkeypatch.setenv(gemm.STREAM_K_ENV, "1")
    ms, n, k = {"one_tile": ([100], 128, 8192), "gpumode1": ([80, 176, 128, 72, 64, 248, 96, 160], 4096, 7168)}[case]
    A, B, _, SB = _group_inputs(rng, ms, [n] * len(ms), [k] * len(ms), "act", act_dtype="float16")
    args = ([cp.asarray(x) for x in A], [cp.asarray(x) for x in B], None, [cp.asarray(s) for s in SB])
    outs = [cp.empty((m, n), dtype=cp.float32) for m in ms]
    first = None
    for _ in range(12):
        for o in outs:
            o.fill(np.nan)
        gemm.group_gemm(*args, out=outs)
        got = [o.get() for o in outs]
        if first is None:
            first = got
        for g, f in zip(got, first):
            np.testing.assert_array_equal(g.view(np.uint32), f.view(np.uint32))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", ["float16", "nvfp4"])
@pytest.mark.parametrize("case", ["gpumode1", "gpumode3", "odd"])
def test_group_gemm_wgmma_stream_k(cp, rng, wgmma, monkeypatch, tokens, case):
    """Stream-K forced (CUFLASH_GEMM_STREAMK=1): GPU MODE shapes (cases 1 and 3: 352 and 120 tiles on the
    SMs, tiles split into 2-3 pieces) and a small odd one (M = 1, N % 128 != 0, fewer units than SMs);
    run twice, so the second launch sees the tile counters the first put back to 0; then a dual GEMM."""
    monkeypatch.setenv(gemm.STREAM_K_ENV, "1")
    shapes = {"gpumode1": ([80, 176, 128, 72, 64, 248, 96, 160], 4096, 7168), "gpumode3": ([192, 320], 3072, 4096),
              "odd": ([1, 33, 0], 200, 192)}[case]
    ms, n, k = shapes
    A, B, SA, SB = _group_inputs(rng, ms, [n] * len(ms), [k] * len(ms), "nvfp4" if tokens == "nvfp4" else "act",
                                 act_dtype=tokens)
    alpha = list(rng.uniform(0.25, 2.0, size=len(ms)))
    refs = reference.group_gemm(A, B, SA, SB, alpha=alpha)
    args = ([cp.asarray(x) for x in A], [cp.asarray(x) for x in B], None if SA is None else [cp.asarray(s) for s in SA],
            [cp.asarray(s) for s in SB])
    for _ in range(2):
        outs = [_poisoned(cp, (m, n), "float16") for m in ms]
        gemm.group_gemm(*args, alpha=alpha, out=outs)
        for o, r in zip(outs, refs):
            _check(_to_np(cp, o), r, "float16")
    m, k = 40, 448
    a = rand_packed(rng, m, k) if tokens == "nvfp4" else rand_acts(rng, m, k, "float16")
    sfa = rand_scales(rng, (m, k // 16)) if tokens == "nvfp4" else None
    b1, b2 = rand_packed(rng, n, k), rand_packed(rng, n, k)
    s1, s2 = rand_scales(rng, (n, k // 16)), rand_scales(rng, (n, k // 16))
    ref = reference.dual_gemm(a, b1, b2, sfa, s1, s2, alpha1=0.5, alpha2=1.5)
    got = gemm.dual_gemm(cp.asarray(a), cp.asarray(b1), cp.asarray(b2), None if sfa is None else cp.asarray(sfa),
                         cp.asarray(s1), cp.asarray(s2), alpha1=0.5, alpha2=1.5)
    _check(_to_np(cp, got), ref, "float16")
