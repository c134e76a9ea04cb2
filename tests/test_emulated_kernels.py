"""The real CUDA kernels (cuda_src/) compiled for the host by g++ and run on tiny shapes on the CPU
(tests/cuda_emu: CUDA's execution model in fibers, mma.sync / ldmatrix / cp.async written from the
PTX ISA), against the float64 references at the GPU tests' tolerances.

Launches are set up the way cuflash sets them up on the GPU: the GEMM problem table from
gemm.build_table / build_ragged_table and gemm.choose_config, attention work lists from
attention.partition, the same argument lists as the CuPy launches; only pointers are host addresses
and grids are kept small (a few CTAs, so persistent and grid-stride loops run more than once).
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest

import cuda_emu
import test_attention as TA  # tests/ is on sys.path
import test_gemm as TG
from cuflash import attention as A
from cuflash import gemm, nvfp4, reference

_REASON = cuda_emu.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"CPU kernel emulation unavailable: {_REASON}")

# ----------------------------------------------------------------------------------------------
# Kernel builds (one shared library per source, compiled once and cached)
# ----------------------------------------------------------------------------------------------

NVFP4_KERNELS = [k for d in ("float32", "float16", "bfloat16") for k in nvfp4.NVFP4KernelConfig(d).name_expressions()]
NVFP4_KERNELS = list(dict.fromkeys(NVFP4_KERNELS))

GEMM_CONFIGS = gemm.kernel_variants()  # every config choose_config can pick

ATTN_DTYPES = ("float16", "bfloat16")
ATTN_HEAD_DIM = 64
_ATTN_PICKS = [(dt, ATTN_HEAD_DIM) for dt in ATTN_DTYPES] + [("bfloat16", 128), ("float16", 256)]
ATTN_CONFIGS = list(dict.fromkeys(A.tile_config(dt, d, role, hopper=hopper) for dt, d in _ATTN_PICKS
                                   for role in A.ROLES for hopper in (False, True)))
ATTN_KERNELS = list(dict.fromkeys(
    [c.attention_kernel(split) for c in ATTN_CONFIGS for split in (True, False)] + [A.AttentionConfig.APPEND_KERNEL]
))


@pytest.fixture(scope="module")
def mods():
    nv, gm, at = cuda_emu.build_many([
        ("nvfp4.cu", NVFP4_KERNELS),
        ("gemm.cu", list(dict.fromkeys(k for c in GEMM_CONFIGS for k in c.name_expressions()))),
        ("attention.cu", ATTN_KERNELS),
    ])
    return {"nvfp4": nv, "gemm": gm, "attention": at}


@pytest.fixture(params=list(cuda_emu.SCHEDULES))
def schedule(request):
    """Thread resume order in the emulator: lockstep warps, or one warp far ahead of the others."""
    return request.param


def _f64(x):
    return np.asarray(x).astype(np.float32).astype(np.float64) if x.dtype == ml_dtypes.bfloat16 else x.astype(np.float64)


def _nan(shape, dtype):
    """NaN-poisoned array; a zero-size one keeps C strides (NumPy 2 gives empty arrays zero strides,
    which gemm's layout check rejects as not unit-stride)."""
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    full = np.full((max(shape[0], 1),) + tuple(shape[1:]), np.nan, dtype=np.float32).astype(dt)
    return full[: shape[0]]


# ----------------------------------------------------------------------------------------------
# NVFP4 quantize / dequantize: bit-identical to the numpy path
# ----------------------------------------------------------------------------------------------

_CT = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def _grid(nblocks):
    return max(1, min(-(-nblocks // 256), 2))  # at most 2 blocks of 256 threads: the grid-stride loop runs


def _quantize_emulated(nv, x, dt):
    nblocks = x.size // 16
    stats = np.zeros(2, np.uint32)
    gs = np.zeros((), np.float32)
    nv.launch(f"cuflash::nvfp4_amax<{_CT[dt]}>", _grid(nblocks), 256, [x, np.int64(nblocks), stats])
    nv.launch("cuflash::nvfp4_global_scale", 1, 1, [stats, gs])
    data = np.full(x.shape[:-1] + (x.shape[-1] // 2,), 0xAB, np.uint8)
    scales = np.full(x.shape[:-1] + (x.shape[-1] // 16,), 0xAB, np.uint8)
    nv.launch(f"cuflash::nvfp4_quantize<{_CT[dt]}>", _grid(nblocks), 256, [x, np.int64(nblocks), gs, data, scales])
    return stats, gs, data, scales


@pytest.mark.parametrize("dt", ["float32", "float16", "bfloat16"])
def test_nvfp4_quantize_dequantize_bit_identical(mods, rng, dt):
    nv = mods["nvfp4"]
    npdt = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
    x = (rng.standard_normal((24, 400)) * np.exp2(rng.uniform(-6, 6, size=(24, 1)))).astype(np.float32)
    x[3, :16] = 0.0  # an all-zero block
    x[5, 7] = 1e-30  # far below the block's other values
    x = x.astype(npdt)
    stats, gs, data, scales = _quantize_emulated(nv, x, dt)
    want = nvfp4.quantize(x)
    assert stats[1] == 0
    assert gs == np.float32(want.global_scale)
    np.testing.assert_array_equal(data, want.data)
    np.testing.assert_array_equal(scales, np.asarray(want.scales).view(np.uint8))
    t = nvfp4.NVFP4Tensor(data, scales.view(ml_dtypes.float8_e4m3fn), gs)
    for out_dt in ("float32", "float16", "bfloat16"):
        out = _nan(x.shape, out_dt)
        nv.launch(f"cuflash::nvfp4_dequantize<{_CT[out_dt]}>", _grid(scales.size), 256,
                  [data, scales, gs, np.int64(scales.size), out])
        ref = nvfp4.dequantize(t, out_dt)
        np.testing.assert_array_equal(out.view(np.uint8), ref.view(np.uint8))


def test_nvfp4_non_finite_blocks(mods, rng):
    nv = mods["nvfp4"]
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[1, 20], x[2, 63] = np.nan, -np.inf
    stats, gs, data, scales = _quantize_emulated(nv, x, "float32")
    want = nvfp4.quantize(x, check_finite=False)
    assert stats[1] == 1
    assert gs == np.float32(want.global_scale)
    np.testing.assert_array_equal(data, want.data)
    np.testing.assert_array_equal(scales, np.asarray(want.scales).view(np.uint8))
    codes = np.zeros(x.size, np.uint8)
    y = rng.uniform(-7, 7, size=x.size).astype(np.float32)
    y[:16] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0, -0.1, 6.5, -0.25, -0.75, 1e-9, -5.0, 2.0, 0.5]
    nv.launch("cuflash::e2m1_encode_kernel", 1, 256, [y, np.int64(y.size), codes])
    np.testing.assert_array_equal(codes, nvfp4.e2m1_encode(y))


# ----------------------------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------------------------

MAX_CTAS = 3  # persistent grid: fewer CTAs than tiles, so CTAs loop


def _launch_gemm(gm, cfg, table, tiles_bound, offsets, blocked, odt, schedule="round_robin", stream_k=0):
    """The launches gemm._prepare makes (W4A4 dequantized first: the token dequant into a workspace
    first), with host buffers and small grids; ``stream_k``: a stream-K launch of the wgmma kernel on that many CTAs."""
    if tiles_bound == 0 or len(table) == 0:
        return
    grid = stream_k or min(tiles_bound, MAX_CTAS)
    offs = offsets if offsets is not None else np.uint64(0)
    if cfg.dequant_first:
        offsets, nbytes = gemm.dequant_workspace(table)
        workspace = np.full(max(nbytes, 2) // 2, np.nan, dtype=np.float16)  # poisoned: every token row read must be written
        deq, table = gemm.dequant_tables(table, workspace.ctypes.data + offsets)
        gx, gy = gemm.dequant_grid(deq)
        gm.launch(cfg.DEQUANT_KERNEL, (min(gx, 2), gy), gemm._DEQUANT_THREADS, [deq, offs, np.int32(int(blocked))],
                  schedule=schedule)
    args = [table, np.int32(len(table)), offs, np.int32(int(blocked)), np.int32(gemm._OUT_CODES[odt])]
    counters = None
    if cfg.arch == "hopper" and stream_k:
        # parked pieces poisoned (a slot read before it is written shows); counters zero, as the plan keeps them
        partials = np.full(grid * 2 * gemm.stream_k_slot_floats(cfg), np.nan, dtype=np.float32)
        counters = np.zeros(tiles_bound, dtype=np.int32)
        args += [partials, counters]
    elif cfg.arch == "hopper":
        args += [np.uint64(0), np.uint64(0)]
    gm.launch(cfg.name_expression(), grid, cfg.threads, args, smem=cfg.smem_bytes(len(table)), schedule=schedule)
    if counters is not None:
        assert not counters.any(), "every stream-K tile counter must be back to 0 after the launch"


def _scales(sf, layout):
    if sf is None:
        return None
    return nvfp4.to_blocked(sf) if layout == "blocked" else sf


def _run_group_gemm(gm, rng, tokens, ms, ns, ks, layout, odt, arch="portable", schedule="round_robin", row_blocks=None,
                    stream_k=0):
    """One group_gemm launch set up as the GPU path does; returns (outputs, references, the validated
    problems, the token kind validation found)."""
    A_, B_, SA, SB = TG._group_inputs(rng, ms, ns, ks, "nvfp4" if tokens == "nvfp4" else "act", act_dtype=tokens)
    alpha = list(rng.uniform(0.25, 2.0, size=len(ms)))
    refs = reference.group_gemm(A_, B_, SA, SB, alpha=alpha)
    outs = [_nan((m, n), odt) for m, n in zip(ms, ns)]
    sa = None if SA is None else [_scales(s, layout) for s in SA]
    prods, tok, _ = gemm.validate_group_gemm(A_, B_, sa, [_scales(s, layout) for s in SB], alpha=alpha, out=outs,
                                             scale_layout=layout)
    itemsize = np.dtype(outs[0].dtype).itemsize
    table = gemm.build_table(prods, [(o.ctypes.data, o.strides[0] // itemsize, 0) for o in outs])
    cfg = gemm.choose_config(tok, False, max(ms), arch)
    if row_blocks is not None:  # the hopper kernel's 256-row tiles (chosen per call by a time model)
        cfg = dataclasses.replace(cfg, row_blocks=row_blocks, stages=gemm._HOPPER_STAGES_2RB)
    assert cfg in GEMM_CONFIGS and cfg.arch == arch
    _launch_gemm(gm, cfg, table, gemm.tile_count(ms, ns, cfg.block_m, cfg.block_n), None, layout == "blocked", odt,
                 schedule, stream_k)
    return outs, refs, prods, tok


@pytest.mark.parametrize(
    "tokens,ms,ns,ks,layout,odt",
    [
        ("nvfp4", [5, 1], [200, 130], [192, 64], "plain", "float16"),        # BM16, N % 128 != 0, M = 1
        ("nvfp4", [33, 0, 2], [72, 64, 300], [64, 128, 192], "blocked", "float32"),  # BM64, M = 33, empty group
        ("float16", [70, 3], [136, 40], [128, 64], "blocked", "bfloat16"),  # W4A16 BM128, 2 warps along M
        ("bfloat16", [33], [129], [192], "plain", "float32"),               # bf16 MMAs
        ("float16", [4, 1], [64, 250], [64, 64], "plain", "float16"),
        ("nvfp4", [17], [136], [512], "plain", "float16"),                  # 8 k-stages: the 4-stage ring wraps
        ("float16", [66], [130], [320], "blocked", "float32"),              # BM128, 5 k-stages
        ("float16", [9, 3], [136, 72], [704, 256], "blocked", "float16"),   # BM16: 4 sub-stages per stage, the
        ("nvfp4", [12], [130], [704], "plain", "float32"),                  # 2-stage ring wraps, 11 = 4 + 4 + 3
        ("bfloat16", [5], [130], [320], "blocked", "float32"),              # BM16 bf16 MMAs, 5 = 4 + 1 sub-stages
    ],
)
def test_group_gemm(mods, rng, schedule, tokens, ms, ns, ks, layout, odt):
    outs, refs, prods, tok = _run_group_gemm(mods["gemm"], rng, tokens, ms, ns, ks, layout, odt, schedule=schedule)
    # (no operand needs the copy gpu launches make; an empty group is never read)
    assert tok == tokens and not any(p.m and (p.a.needs_copy or p.b[0].needs_copy) for p in prods)
    for o, r in zip(outs, refs):
        TG._check(_f64(o), r, odt)


@pytest.mark.parametrize("layout", ["plain", "blocked"])
@pytest.mark.parametrize("tokens", ["nvfp4", "float16"])
def test_group_gemm_batch_L(mods, rng, schedule, tokens, layout):
    """GPU MODE's trailing L axis: [M, K/2, L] views of [L, M, K/2] storage, one table record per slice."""
    L, ms, ns, ks = 2, [9, 20], [72, 136], [128, 64]
    A_, B_, SA, SB = TG._group_inputs(rng, ms, ns, ks, "nvfp4" if tokens == "nvfp4" else "act", L=L)
    refs = reference.group_gemm(A_, B_, SA, SB, alpha=1.5)
    if layout == "blocked":
        sa = None if SA is None else [nvfp4.to_blocked(s) for s in SA]
        sb = [nvfp4.to_blocked(s) for s in SB]
    else:
        sa, sb = SA, SB
    bufs = [_nan((L * m, n), "float16").reshape(L, m, n) for m, n in zip(ms, ns)]
    outs = [np.moveaxis(b, 0, 2) for b in bufs]
    prods, tok, odt = gemm.validate_group_gemm(A_, B_, sa, sb, alpha=1.5, out=outs, scale_layout=layout)
    assert all(p.L == L and not p.a.needs_copy for p in prods)
    table = gemm.build_table(prods, [(b.ctypes.data, n, m * n * 2) for b, m, n in zip(bufs, ms, ns)])
    cfg = gemm.choose_config(tok, False, max(ms))
    assert cfg in GEMM_CONFIGS
    tiles = gemm.tile_count([m for m in ms for _ in range(L)], [n for n in ns for _ in range(L)], cfg.block_m)
    _launch_gemm(mods["gemm"], cfg, table, tiles, None, layout == "blocked", odt, schedule)
    for o, r in zip(outs, refs):
        TG._check(_f64(o), r, "float16")


def _run_dual_gemm(mods, rng, tokens, m, n, k, layout, out_dtype, arch_args=(), schedule="round_robin", stream_k=0):
    """One emulated dual GEMM (portable, or wgmma with arch_args=("hopper",)) against the reference."""
    a = TG.rand_packed(rng, m, k) if tokens == "nvfp4" else TG.rand_acts(rng, m, k, "float16")
    sfa = TG.rand_scales(rng, (m, k // 16)) if tokens == "nvfp4" else None
    b1, b2 = TG.rand_packed(rng, n, k), TG.rand_packed(rng, n, k)
    s1, s2 = TG.rand_scales(rng, (n, k // 16)), TG.rand_scales(rng, (n, k // 16))
    ref = reference.dual_gemm(a, b1, b2, sfa, s1, s2, alpha1=0.5, alpha2=1.5)
    out = _nan((m, n), out_dtype)
    prod, tok, odt = gemm.validate_dual_gemm(a, b1, b2, _scales(sfa, layout), _scales(s1, layout), _scales(s2, layout),
                                             alpha1=0.5, alpha2=1.5, out=out, scale_layout=layout)
    table = gemm.build_table([prod], [(out.ctypes.data, n, 0)])
    cfg = gemm.choose_config(tok, True, m, *arch_args)
    assert cfg in GEMM_CONFIGS
    _launch_gemm(mods["gemm"], cfg, table, gemm.tile_count([m], [n], cfg.block_m), None, layout == "blocked", odt, schedule,
                 stream_k)
    TG._check(_f64(out), ref, out_dtype)


@pytest.mark.parametrize("tokens,m,n,k,layout", [("nvfp4", 20, 150, 128, "blocked"), ("float16", 1, 72, 192, "plain")])
def test_dual_gemm(mods, rng, schedule, tokens, m, n, k, layout):
    _run_dual_gemm(mods, rng, tokens, m, n, k, layout, "float16", schedule=schedule)


# ----------------------------------------------------------------------------------------------
# GEMM, Hopper wgmma variant (group_gemm_wgmma_kernel: wgmma.mma_async emulated from the PTX ISA)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens,ms,ns,ks,layout,odt",
    [
        ("float16", [1, 33], [72, 136], [64, 192], "plain", "float16"),      # N 16 and 64, M = 1
        ("bfloat16", [33, 1], [136, 72], [192, 64], "blocked", "float32"),   # bf16 wgmma
        ("float16", [3, 17], [136, 72], [192, 64], "blocked", "bfloat16"),   # N 32
        ("bfloat16", [70], [136], [320], "plain", "float16"),                # N 128, 5 k-stages: the ring wraps
        ("nvfp4", [5, 33, 0], [200, 72, 64], [192, 64, 128], "plain", "float16"),  # W4A4, an empty group
        ("nvfp4", [17], [136], [512], "blocked", "float32"),                 # W4A4, 8 k-stages
        ("float16", [20, 9], [72, 40], [1280, 64], "plain", "float16"),     # 20 k-stages: the producer waits for the ring
    ],
)
def test_group_gemm_wgmma(mods, rng, schedule, tokens, ms, ns, ks, layout, odt):
    outs, refs, _, _ = _run_group_gemm(mods["gemm"], rng, tokens, ms, ns, ks, layout, odt, "hopper", schedule)
    for o, r in zip(outs, refs):
        TG._check(_f64(o), r, odt)


@pytest.mark.parametrize(
    "tokens,ms,ns,ks,layout,odt",
    [
        ("float16", [70, 3], [300, 40], [448, 64], "plain", "float16"),    # 256-row tiles, N % 256 != 0, 7 k-stages
        ("nvfp4", [130, 0], [264, 72], [128, 192], "blocked", "float32"),  # W4A4, two token tiles, an empty group
        ("bfloat16", [65], [520], [256], "plain", "bfloat16"),             # bf16, three weight tiles
    ],
)
def test_group_gemm_wgmma_two_row_blocks(mods, rng, schedule, tokens, ms, ns, ks, layout, odt):
    outs, refs, _, _ = _run_group_gemm(mods["gemm"], rng, tokens, ms, ns, ks, layout, odt, "hopper", schedule,
                                       row_blocks=2)
    for o, r in zip(outs, refs):
        TG._check(_f64(o), r, odt)


@pytest.mark.parametrize("tokens,m,n,k,layout", [("float16", 33, 136, 192, "blocked"), ("nvfp4", 1, 72, 64, "plain")])
def test_dual_gemm_wgmma(mods, rng, tokens, m, n, k, layout):
    _run_dual_gemm(mods, rng, tokens, m, n, k, layout, "bfloat16", arch_args=("hopper",))


@pytest.mark.parametrize(
    "tokens,ms,ns,ks,grid,row_blocks",
    [
        # 3 tiles x 5 stages on 4 CTAs: CTA 1 ends tile 0 and starts tile 1 (two pieces, slots 0 and 1)
        ("float16", [70, 3], [136, 40], [320, 320], 4, None),
        # 2 tiles x 8 stages on 5 CTAs: every tile in three pieces, CTA 1 and 3 inside one tile
        ("bfloat16", [33], [129], [512], 5, None),
        ("nvfp4", [5, 17, 0], [72, 200, 64], [192, 192, 192], 4, None),  # W4A4, an empty group
        ("float16", [70], [300], [448], 4, 2),  # 256-row tiles (two accumulator sets)
        ("float16", [20, 9], [72, 40], [1280, 1280], 3, None),  # pieces of 6-14 stages: the 8-stage ring wraps in one
    ],
)
def test_group_gemm_wgmma_stream_k(mods, rng, schedule, tokens, ms, ns, ks, grid, row_blocks):
    """Stream-K: the k-stages of all tiles split evenly over the CTAs; split tiles summed by their last piece."""
    outs, refs, _, _ = _run_group_gemm(mods["gemm"], rng, tokens, ms, ns, ks, "plain", "float16", "hopper", schedule,
                                       row_blocks=row_blocks, stream_k=grid)
    for o, r in zip(outs, refs):
        TG._check(_f64(o), r, "float16")


def test_dual_gemm_wgmma_stream_k(mods, rng, schedule):
    _run_dual_gemm(mods, rng, "float16", 33, 136, 448, "plain", "float16", arch_args=("hopper",), schedule=schedule,
                   stream_k=3)


def test_group_gemm_ragged_wgmma(mods, rng):
    rows, n, k = [3, 0, 17, 1], 136, 128
    G = len(rows)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    total = int(offsets[-1])
    a = TG.rand_acts(rng, total, k, "bfloat16")
    b = rng.integers(0, 256, size=(G, n, k // 2), dtype=np.uint8)
    sfb = TG.rand_scales(rng, (G, n, k // 16))
    ref = reference.group_gemm_ragged(a, b, None, sfb, offsets, alpha=1.25)
    out = _nan((total, n), "float16")
    rg, tok, odt = gemm.validate_group_gemm_ragged(a, b, None, sfb, offsets, alpha=1.25, out=out)
    table = gemm.build_ragged_table(rg, out.ctypes.data, n)
    cfg = gemm.choose_config(tok, False, -(-total // G), "hopper")
    _launch_gemm(mods["gemm"], cfg, table, gemm.ragged_tile_bound(total, G, n, cfg.block_m, cfg.block_n), offsets,
                 False, odt)
    TG._check(_f64(out), ref, "float16")


def test_wgmma_selection(monkeypatch):
    """The wgmma kernel runs only on a compute capability 9.0 device: forced by CUFLASH_GEMM_WGMMA=1,
    never with =0, else for the dual GEMM and group lists of more than 32 rows (gemm.hopper_is_faster)."""
    from cuflash import _jit

    calls = [((False, 128), "hopper"), ((True, 16), "hopper"), ((True, 256), "hopper"), ((False, 16), "portable"),
             ((False, 4096), "hopper"), ((False, 32), "portable"), ((False, 33), "hopper")]
    for cc, env in [((9, 0), "1"), ((9, 0), None), ((9, 0), "0"), ((8, 9), "1"), ((8, 0), None), ((10, 0), "1")]:
        monkeypatch.setattr(_jit, "device_cc", lambda device_id, cc=cc: cc)
        if env is None:
            monkeypatch.delenv(gemm.WGMMA_ENV, raising=False)
        else:
            monkeypatch.setenv(gemm.WGMMA_ENV, env)
        for args, auto in calls:
            want = "portable" if cc != (9, 0) or env == "0" else "hopper" if env == "1" else auto
            assert gemm.launch_arch(0, *args) == want, (cc, env, args)
            assert gemm.launch_arch(0, *args, ragged=True) == ("hopper" if cc == (9, 0) and env == "1" else "portable")
    hopper = [c for c in GEMM_CONFIGS if c.arch == "hopper"]
    assert hopper and all(c.family == _jit.ARCH_HOPPER and c.threads == 384 for c in hopper)
    for tok in ("nvfp4", "float16", "bfloat16"):
        for rows in (0, 1, 16, 17, 33, 64, 65, 10000):
            assert gemm.choose_config(tok, False, rows, "hopper") in hopper
            assert gemm.choose_config(tok, False, rows).arch == "portable"
        assert gemm.choose_config(tok, True, 256, "hopper") in hopper


_RAGGED_40 = [0] * 40
_RAGGED_40[2], _RAGGED_40[33], _RAGGED_40[39] = 2, 5, 1  # 40 problems: the tile prefix scan needs two passes


@pytest.mark.parametrize(
    "tokens,layout,rows,n",
    [("nvfp4", "plain", [3, 0, 17, 1], 136), ("float16", "blocked", [3, 0, 17, 1], 136),  # expert 1 is empty
     ("nvfp4", "blocked", _RAGGED_40, 24)],
)
def test_group_gemm_ragged(mods, rng, schedule, tokens, layout, rows, n):
    G, k = len(rows), 128
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    total = int(offsets[-1])
    a = TG.rand_packed(rng, total, k) if tokens == "nvfp4" else TG.rand_acts(rng, total, k, "float16")
    sfa = TG.rand_scales(rng, (total, k // 16)) if tokens == "nvfp4" else None
    b = rng.integers(0, 256, size=(G, n, k // 2), dtype=np.uint8)
    sfb = TG.rand_scales(rng, (G, n, k // 16))
    alpha = list(rng.uniform(0.5, 2, size=G))
    ref = reference.group_gemm_ragged(a, b, sfa, sfb, offsets, alpha=alpha)
    sb = np.stack([nvfp4.to_blocked(s) for s in sfb]) if layout == "blocked" else sfb
    out = _nan((total, n), "float16")
    rg, tok, odt = gemm.validate_group_gemm_ragged(a, b, _scales(sfa, layout), sb, offsets, alpha=alpha, out=out,
                                                   scale_layout=layout)
    table = gemm.build_ragged_table(rg, out.ctypes.data, n)
    cfg = gemm.choose_config(tok, False, -(-total // G))
    assert cfg in GEMM_CONFIGS
    bound = gemm.ragged_tile_bound(total, G, n, cfg.block_m)
    _launch_gemm(mods["gemm"], cfg, table, bound, offsets, layout == "blocked", odt, schedule)
    TG._check(_f64(out), ref, "float16")


# ----------------------------------------------------------------------------------------------
# Paged attention
# ----------------------------------------------------------------------------------------------


def _attention_inputs(rng, q_lens, kv_lens, heads, kv_heads, d, page, dtype):
    """A shuffled paged cache, its queries and lengths: (k_pages, v_pages, table, q_indptr, q, kv_lens)."""
    kp, vp, table = TA.make_cache(rng, kv_lens, page_size=page, kv_heads=kv_heads, head_dim=d, dtype=dtype)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = TA.make_q(rng, int(q_indptr[-1]), heads, d, dtype)
    return kp, vp, table, q_indptr, q, np.array(kv_lens, np.int32)


def _run_attention(at, q, kp, vp, table, kv_lens, q_indptr, *, dtype, slots, schedule, causal=True, hopper=False,
                   decode_only=False):
    """AttentionPlan's launches on the host: partition() gives them; ``slots`` stands in for the GPU's
    resident-CTA count (a large value makes partition split the keys, merged by the last split CTA of
    each item, which puts its counter back to 0); ``hopper`` picks the wgmma prefill kernel;
    ``decode_only``: a launch whose work list is the identity goes without it (a null pointer), as a
    decode-only AttentionPlan launches it, and gets a poisoned q_indptr (the kernel must read neither)."""
    total_q, heads, d = q.shape
    kv_heads, page_size = kp.shape[2], kp.shape[1]
    group = heads // kv_heads
    q_lens = np.diff(q_indptr)
    specs = A.partition(q_lens, kv_lens, group=group, num_kv_heads=kv_heads, dtype=dtype, head_dim=d, causal=causal,
                        slots_of=lambda cfg: slots, hopper=hopper)
    out = _nan(q.shape, dtype)
    lse = np.full((total_q, heads), np.nan, np.float32)
    scale_log2 = np.float32(1.0 / math.sqrt(d) * math.log2(math.e))
    for spec in specs:
        cfg = spec.config
        n = spec.n_part_rows if spec.num_splits > 1 else 0
        o_part = np.full(max(1, spec.num_splits * n * heads * d), np.nan, np.float32)
        lse_part = np.full(max(1, spec.num_splits * n * heads), np.nan, np.float32)
        counters = np.zeros(spec.work.shape[0] * kv_heads, np.int32)
        null_work = decode_only and A.identity_work(spec, len(kv_lens))
        work = np.uint64(0) if null_work else np.ascontiguousarray(spec.work)
        indptr = np.full_like(q_indptr, -(1 << 30)) if null_work else q_indptr
        at.launch(cfg.attention_kernel(spec.num_splits > 1), (spec.work.shape[0], kv_heads, spec.num_splits), cfg.threads,
                  [q, kp, vp, table, np.int32(table.shape[1]), kv_lens, indptr, work,
                   np.int32(heads), np.int32(group), np.int32(page_size), scale_log2, np.int32(causal), out, lse,
                   o_part, lse_part, np.int32(spec.n_part_rows), counters], smem=cfg.smem_bytes, schedule=schedule)
        assert not counters.any(), "a split merge left its counter armed"
    return out, lse, specs


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("split", [False, True], ids=["one_split", "split_kv"])
def test_paged_attention_mixed_batch(mods, rng, schedule, dtype, split):
    # decode (q_len 1, 4 rows: split-keys decode role), a row that sees no key (kv_len 0), short chunked
    # prefill (narrow role: 9 * 4 rows fit one 64-row tile), a long prefill over two 128-row tiles, and a
    # chunk whose queries all sit past the first key tile (3 * 4 rows: decode role)
    q_lens = [1, 1, 9, 40, 3]
    kv_lens = [100, 0, 23, 97, 70]
    heads, kv_heads, d, page = 8, 2, ATTN_HEAD_DIM, 5
    kp, vp, table, q_indptr, q, lens = _attention_inputs(rng, q_lens, kv_lens, heads, kv_heads, d, page, dtype)
    out, lse, specs = _run_attention(mods["attention"], q, kp, vp, table, lens, q_indptr, dtype=dtype,
                                     slots=100000 if split else 1, schedule=schedule)
    assert {s.role for s in specs} == {"decode", "narrow", "prefill"}
    assert any(s.num_splits > 1 for s in specs) == split
    TA.check_close(out, lse, q, kp, vp, table, lens, q_indptr, dtype)


@pytest.mark.parametrize("dtype,d,page", [("bfloat16", 128, 16), ("float16", 256, 1)])
def test_paged_attention_larger_heads(mods, rng, schedule, dtype, d, page):
    # head_dim 128 / 256 variants (d256: 32-key tiles), longer caches: the 2-stage K/V ring wraps
    q_lens, kv_lens = [1, 20, 2], [150, 131, 64]
    heads, kv_heads = 4, 1
    kp, vp, table, q_indptr, q, lens = _attention_inputs(rng, q_lens, kv_lens, heads, kv_heads, d, page, dtype)
    for slots in (1, 100000):
        out, lse, specs = _run_attention(mods["attention"], q, kp, vp, table, lens, q_indptr, dtype=dtype, slots=slots,
                                         schedule=schedule)
        assert all(s.config in ATTN_CONFIGS for s in specs)
        TA.check_close(out, lse, q, kp, vp, table, lens, q_indptr, dtype)


@pytest.mark.parametrize("dtype,d,page", [("float16", 64, 5), ("bfloat16", 128, 16)])
@pytest.mark.parametrize("split", [False, True], ids=["one_split", "split_kv"])
def test_paged_attention_wgmma_prefill(mods, rng, schedule, dtype, d, page, split):
    # the sm_90a prefill kernel: 128-row tiles over 128-key tiles, the 3- or 4-slot K/V ring wrapping
    # (600 keys: 5 tiles), a chunk whose queries start past the first key tile, rows past the sequence
    # end, and a decode row beside it (mma.sync decode kernel)
    q_lens, kv_lens = [40, 1, 70], [600, 50, 70]
    heads, kv_heads = 8, 2
    kp, vp, table, q_indptr, q, lens = _attention_inputs(rng, q_lens, kv_lens, heads, kv_heads, d, page, dtype)
    out, lse, specs = _run_attention(mods["attention"], q, kp, vp, table, lens, q_indptr, dtype=dtype,
                                     slots=100000 if split else 1, schedule=schedule, hopper=True)
    assert any(s.config.wgmma for s in specs)
    assert any(s.num_splits > 1 for s in specs) == split
    TA.check_close(out, lse, q, kp, vp, table, lens, q_indptr, dtype)


def test_paged_attention_non_causal_decode_split(mods, rng, schedule):
    dtype, heads, kv_heads, d, page = "float16", 8, 2, ATTN_HEAD_DIM, 5
    kv_lens = [77, 130, 4]
    kp, vp, table, q_indptr, q, lens = _attention_inputs(rng, [1] * len(kv_lens), kv_lens, heads, kv_heads, d, page,
                                                         dtype)
    out, lse, specs = _run_attention(mods["attention"], q, kp, vp, table, lens, q_indptr, dtype=dtype,
                                     slots=100000, schedule=schedule, causal=False)
    assert specs[0].num_splits > 1
    TA.check_close(out, lse, q, kp, vp, table, lens, q_indptr, dtype, causal=False)


@pytest.mark.parametrize("slots,splits", [(1, 1), (30, 3), (100000, 18)], ids=["one_split", "3_splits", "18_splits"])
def test_paged_attention_decode_without_work_list(mods, rng, schedule, slots, splits):
    # a decode-only launch reads no work list and no q_indptr (_run_attention poisons it): sequence =
    # item = partial row = blockIdx.x; lengths across page boundaries, one empty sequence, and one long
    # enough for more than 16 splits (the merge folds them 16 per round trip); with 3 splits, splits of
    # several tiles, sized per sequence from its own length.
    dtype, heads, kv_heads, d, page = "bfloat16", 8, 2, ATTN_HEAD_DIM, 5
    kv_lens = [77, 0, 1100, 4, 16]
    kp, vp, table, q_indptr, q, lens = _attention_inputs(rng, [1] * len(kv_lens), kv_lens, heads, kv_heads, d, page,
                                                         dtype)
    # the long sequence's last keys point along its queries: its highest-scoring splits come last, so
    # the merge's running maximum must rescale what it folded before
    group = heads // kv_heads
    for key in range(1050, 1100):
        for h in range(kv_heads):
            qsum = q[2, h * group:(h + 1) * group].astype(np.float32).sum(axis=0)
            kp[table[2, key // page], key % page, h] = (0.5 * qsum / np.linalg.norm(qsum) * np.sqrt(d)).astype(kp.dtype)
    out, lse, specs = _run_attention(mods["attention"], q, kp, vp, table, lens, q_indptr, dtype=dtype, slots=slots,
                                     schedule=schedule, decode_only=True)
    assert [s.role for s in specs] == ["decode"] and A.identity_work(specs[0], len(kv_lens))
    assert specs[0].num_splits == splits
    TA.check_close(out, lse, q, kp, vp, table, lens, q_indptr, dtype)


def test_paged_kv_append(mods, rng):
    dtype, kv_heads, d, page = "bfloat16", 2, ATTN_HEAD_DIM, 5
    kv_after = np.array([12, 1, 30], np.int32)
    new = np.array([3, 1, 11], np.int32)  # sequence 1 is a new one; the others cross page boundaries
    kp, vp, table = TA.make_cache(rng, list(kv_after), page_size=page, kv_heads=kv_heads, head_dim=d, dtype=dtype)
    indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    pos = [(b, p) for b in range(len(new)) for p in range(int(kv_after[b] - new[b]), int(kv_after[b]))]
    k_new = np.stack([kp[table[b, p // page], p % page] for b, p in pos])
    v_new = np.stack([vp[table[b, p // page], p % page] for b, p in pos])
    kp2, vp2 = kp.copy(), vp.copy()
    for b, p in pos:  # erase the new tokens' slots: the kernel must write them back exactly
        kp2[table[b, p // page], p % page] = np.nan
        vp2[table[b, p // page], p % page] = np.nan
    token_vecs = kv_heads * d * 2 // 16
    mods["attention"].launch(A.AttentionConfig.APPEND_KERNEL, len(pos), A.APPEND_THREADS,
                             [k_new, v_new, kp2, vp2, table, np.int32(table.shape[1]), kv_after, indptr,
                              np.int32(len(new)), np.int32(page), np.int32(token_vecs)])
    np.testing.assert_array_equal(kp2.view(np.uint16), kp.view(np.uint16))
    np.testing.assert_array_equal(vp2.view(np.uint16), vp.view(np.uint16))


# ----------------------------------------------------------------------------------------------
# The emulator's own checks
# ----------------------------------------------------------------------------------------------


def test_emulator_reports_shared_memory_overflow(mods, rng):
    # The GEMM launched with 8 bytes too few of dynamic shared memory: its tile prefix (the last 8
    # bytes) lands past the end, in the emulator's guard zone.
    cfg = GEMM_CONFIGS[0]
    a, b = TG.rand_packed(rng, 4, 64), TG.rand_packed(rng, 8, 64)
    sa, sb = TG.rand_scales(rng, (4, 4)), TG.rand_scales(rng, (8, 4))
    out = _nan((4, 8), "float16")
    prods, _, _ = gemm.validate_group_gemm([a], [b], [sa], [sb], out=[out])
    table = gemm.build_table(prods, [(out.ctypes.data, 8, 0)])
    with pytest.raises(cuda_emu.EmulatorError, match="wrote past its"):
        mods["gemm"].launch(cfg.name_expression(), 1, cfg.threads,
                            [table, np.int32(1), np.uint64(0), np.int32(0), np.int32(0)],
                            smem=cfg.smem_bytes(1) - 8)


def test_inline_ptx_only_in_overlaid_headers():
    """The emulator replaces exactly the files of cuda_emu.OVERLAYS: inline PTX anywhere else would run
    unemulated."""
    import re

    from cuflash import _jit

    root = _jit.source_dir()
    offenders = [str(p.relative_to(root)) for p in sorted(root.rglob("*.cu*"))
                 if p.relative_to(root).as_posix() not in cuda_emu.OVERLAYS and re.search(r"\basm\b", p.read_text())]
    assert offenders == []
    assert all((root / rel).is_file() for rel in cuda_emu.OVERLAYS)
