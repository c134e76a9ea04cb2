"""cuflash.nvfp4: codes against ml_dtypes, the quantize recipe, error bounds, bad input, the blocked
scale layout against its offset formula; on the GPU, bit-identity with the CPU path."""

import ml_dtypes
import numpy as np
import pytest

from cuflash import nvfp4, reference
from cuflash.nvfp4 import E2M1_VALUES

F4 = ml_dtypes.float4_e2m1fn
F8 = ml_dtypes.float8_e4m3fn
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


# ---------------------------------------------------------------------------------------------
# e2m1 and e4m3 codes
# ---------------------------------------------------------------------------------------------


def test_e2m1_decode_every_code_matches_ml_dtypes():
    codes = np.arange(16, dtype=np.uint8)
    want = codes.view(F4).astype(np.float32)
    got = nvfp4.e2m1_decode(codes)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0 is code 8


def test_e2m1_encode_matches_ml_dtypes_including_ties_and_saturation(rng):
    grid = np.linspace(-9, 9, 7201, dtype=np.float32)
    ties = np.array(TIES, np.float32)
    x = np.concatenate([grid, ties, -ties, np.nextafter(ties, 0), np.nextafter(ties, 10),
                        rng.normal(0, 3, 4000).astype(np.float32), [0.0, -0.0, 1e-30, -1e-30, 6.0, 1e30, -1e30]])
    x = x.astype(np.float32)
    got = nvfp4.e2m1_encode(x)
    want = x.astype(F4).view(np.uint8)  # ml_dtypes rounds to nearest even and saturates at +-6
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, f"first mismatches: x={x[bad[:5]]} got={got[bad[:5]]} want={want[bad[:5]]}"


def test_e2m1_encode_rejects_non_finite_on_cpu():
    with pytest.raises(ValueError, match="finite"):
        nvfp4.e2m1_encode(np.array([1.0, np.nan], np.float32))
    with pytest.raises(TypeError, match="float32"):
        nvfp4.e2m1_encode(np.array([1.0]))  # float64


def test_pack_puts_lower_k_index_in_low_nibble():
    codes = np.array([[1, 2, 15, 8]], np.uint8)
    packed = nvfp4.pack_e2m1(codes)
    np.testing.assert_array_equal(packed, [[0x21, 0x8F]])
    np.testing.assert_array_equal(nvfp4.unpack_e2m1(packed), codes)
    # torch.float4_e2m1fn_x2 / ml_dtypes agree: element 2i is the low nibble
    np.testing.assert_array_equal(reference.unpack_fp4(packed), E2M1_VALUES[codes].astype(np.float64))
    with pytest.raises(ValueError, match="even"):
        nvfp4.pack_e2m1(np.zeros((1, 3), np.uint8))


def test_e4m3_decode_every_code_matches_ml_dtypes():
    bits = np.arange(256, dtype=np.uint8)
    want = bits.view(F8).astype(np.float32)
    got = nvfp4.e4m3_decode(bits)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)])
    np.testing.assert_array_equal(nvfp4.e4m3_decode(bits.view(F8))[:5], want[:5])


def test_e4m3_encode_round_trips_every_finite_value_and_saturates():
    bits = np.array([b for b in range(256) if b not in (0x7F, 0xFF)], np.uint8)
    vals = bits.view(F8).astype(np.float32)
    np.testing.assert_array_equal(nvfp4.e4m3_encode(vals).view(np.uint8), bits)
    sat = nvfp4.e4m3_encode(np.array([448.0, 460.0, 500.0, 1e30, -1e9], np.float32)).astype(np.float32)
    np.testing.assert_array_equal(sat, [448, 448, 448, 448, -448])
    # midpoints round to nearest even, as ml_dtypes does
    pos = np.sort(vals[vals > 0])
    mids = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)
    np.testing.assert_array_equal(nvfp4.e4m3_encode(mids).view(np.uint8), mids.astype(F8).view(np.uint8))


# ---------------------------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------------------------

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _block_view(a, k):
    return a.reshape(-1, k // 16, 16)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 16), (5, 64), (3, 4, 128), (0, 32), (7, 7168 // 16 * 16)])
def test_quantize_follows_the_recipe(rng, dtype, shape):
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100)).astype(DTYPES[dtype])
    t = nvfp4.quantize(x)
    k = shape[-1]
    assert t.data.shape == shape[:-1] + (k // 2,) and t.data.dtype == np.uint8
    assert t.scales.shape == shape[:-1] + (k // 16,) and t.scales.dtype == F8
    assert t.shape == shape and t.global_scale.dtype == np.float32
    xf = x.astype(np.float32)
    if x.size == 0:
        assert float(t.global_scale) == 1.0
        return
    amax = np.float32(np.abs(xf).max())
    assert t.global_scale == np.float32(2688) / amax
    gs = np.float32(t.global_scale)
    # scale of each block: e4m3(gs * (amax_block / 6))
    amax_b = np.abs(_block_view(xf, k)).max(axis=-1)
    want_s = (gs * (amax_b / np.float32(6))).astype(np.float32).astype(F8)
    np.testing.assert_array_equal(t.scales.reshape(amax_b.shape).view(np.uint8), want_s.view(np.uint8))
    # each code is the e2m1 value nearest to y = x * (gs / s), clipped to +-6 (checked by brute force)
    s = _block_view(np.repeat(t.scales.astype(np.float32), 16, axis=-1), k)
    y = np.where(s != 0, _block_view(xf, k) * np.where(s != 0, gs / np.where(s != 0, s, 1), 0), 0).astype(np.float32)
    q = _block_view(nvfp4.dequantize(nvfp4.NVFP4Tensor(t.data, t.scales, np.array(1.0, np.float32))), k)
    q = np.where(s != 0, q / np.where(s != 0, s, 1), 0)  # recover the e2m1 value of each code
    dist = np.abs(np.clip(y, -6, 6)[..., None].astype(np.float64) - np.unique(E2M1_VALUES)[None, :])
    assert np.all(np.abs(np.clip(y, -6, 6) - q) <= dist.min(axis=-1) + 0)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_error_bound(rng, dtype):
    x = rng.standard_normal((64, 256)).astype(DTYPES[dtype])
    t = nvfp4.quantize(x)
    deq = nvfp4.dequantize(t)
    xf = x.astype(np.float64)
    gs = float(t.global_scale)
    s = np.repeat(t.scales.astype(np.float64), 16, axis=-1)
    amax_b = np.repeat(np.abs(xf).reshape(64, 16, 16).max(-1), 16, axis=-1)
    # Unsaturated: half the e2m1 spacing, at most 1 (between 4 and 6), times the block's step s/gs.
    # Saturated (s rounded down): the excess of the block's amax over 6 * s/gs.
    bound = s / gs * 1.0 + np.maximum(0, amax_b - 6 * s / gs) + 1e-6 * np.abs(xf)
    assert np.all(np.abs(deq - xf) <= bound)
    # and the whole tensor is close: NVFP4 keeps ~2.5 significant bits
    assert np.linalg.norm(deq - xf) / np.linalg.norm(xf) < 0.15


def test_quantize_round_trips_representable_values(rng):
    # Blocks whose largest magnitude is code 7 (6.0) with global scale 1 come back bit for bit.
    rows, k = 8, 64
    codes = rng.integers(0, 16, (rows, k), dtype=np.uint8)
    codes[:, ::16] = rng.choice([7, 15], (rows, k // 16))
    sbits = rng.integers(0x08, 0x7E, (rows, k // 16), dtype=np.uint8)  # normal e4m3 scales
    t0 = nvfp4.NVFP4Tensor(nvfp4.pack_e2m1(codes), sbits.view(F8), np.array(1.0, np.float32))
    t1 = nvfp4.quantize(nvfp4.dequantize(t0), global_scale=1.0)
    np.testing.assert_array_equal(t1.data, t0.data)
    np.testing.assert_array_equal(t1.scales.view(np.uint8), sbits)


def test_quantize_tensor_max_maps_to_448_and_6(rng):
    x = rng.standard_normal((4, 32)).astype(np.float32)
    x[2, 5] = 17.0  # the tensor's amax
    t = nvfp4.quantize(x)
    assert t.scales.view(np.uint8)[2, 0] == 0x7E  # 448
    assert nvfp4.unpack_e2m1(t.data)[2, 5] == 7  # 6.0
    assert nvfp4.dequantize(t)[2, 5] == pytest.approx(17.0, rel=1e-6)


def test_quantize_global_scale_argument_is_the_encode_form(rng):
    x = rng.standard_normal((2, 32)).astype(np.float32)
    t = nvfp4.quantize(x, global_scale=3.0)
    assert float(t.global_scale) == 3.0 and float(t.decode_scale) == np.float32(1 / 3)
    ref = reference.dequantize_fp4(t.data, t.scales, global_scale=3.0)
    np.testing.assert_allclose(nvfp4.dequantize(t), ref, rtol=1e-6)


def test_all_zero_input_uses_global_scale_one():
    t = nvfp4.quantize(np.zeros((2, 16), np.float32))
    assert float(t.global_scale) == 1.0
    assert not t.data.any() and not t.scales.view(np.uint8).any()


def test_non_finite_input_raises_or_gives_the_documented_nan_block(rng):
    x = rng.standard_normal((3, 48)).astype(np.float32)
    x[1, 20] = np.nan
    x[2, 47] = np.inf
    with pytest.raises(ValueError, match="finite"):
        nvfp4.quantize(x)
    t = nvfp4.quantize(x, check_finite=False)
    finite = np.isfinite(x)
    assert t.global_scale == np.float32(2688) / np.float32(np.abs(x[finite]).max())
    s = t.scales.view(np.uint8)
    assert s[1, 1] == 0x7F and s[2, 2] == 0x7F
    codes = nvfp4.unpack_e2m1(t.data)
    assert not codes[1, 16:32].any() and not codes[2, 32:48].any()
    deq = nvfp4.dequantize(t)
    assert np.isnan(deq[1, 16:32]).all() and np.isnan(deq[2, 32:48]).all()
    # the other blocks are quantized exactly as without the bad ones
    clean = nvfp4.quantize(np.where(finite, x, 0), global_scale=t.global_scale)
    np.testing.assert_array_equal(t.data[0], clean.data[0])
    np.testing.assert_array_equal(s[0], clean.scales.view(np.uint8)[0])


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (np.zeros((2, 16)), TypeError, "float32 or float16 or bfloat16, got float64"),
        (np.zeros((2, 16), np.int32), TypeError, "got int32"),
        (np.zeros((2, 24), np.float32), ValueError, "multiple of 16.*got 24"),
        (np.zeros((2, 33), np.float32), ValueError, "multiple of 16.*got 33"),
        (np.zeros((), np.float32), ValueError, "at least 1 dimension"),
        ([1.0] * 16, TypeError, "expected an array"),
    ],
)
def test_quantize_rejects_bad_input(x, exc, match):
    with pytest.raises(exc, match=match):
        nvfp4.quantize(x)


@pytest.mark.parametrize("gs, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                     (float("inf"), ValueError), ("2", TypeError)])
def test_quantize_rejects_bad_global_scale(gs, exc):
    with pytest.raises(exc, match="global_scale"):
        nvfp4.quantize(np.ones((1, 16), np.float32), global_scale=gs)


def test_nvfp4_tensor_and_dequantize_validate():
    with pytest.raises(ValueError, match=r"scales: expected shape \(2, 2\), got \(2, 1\)"):
        nvfp4.NVFP4Tensor(np.zeros((2, 16), np.uint8), np.zeros((2, 1), np.uint8), np.array(1, np.float32))
    with pytest.raises(TypeError, match="data: expected dtype uint8"):
        nvfp4.NVFP4Tensor(np.zeros((2, 16), np.int8), np.zeros((2, 2), np.uint8), np.array(1, np.float32))
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.NVFP4Tensor(np.zeros((2, 4), np.uint8), np.zeros((2, 0), np.uint8), np.array(1, np.float32))
    with pytest.raises(TypeError, match="global_scale"):
        nvfp4.NVFP4Tensor(np.zeros((2, 8), np.uint8), np.zeros((2, 1), np.uint8), 1.0)
    t = nvfp4.quantize(np.ones((1, 16), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        nvfp4.dequantize(t, "int8")
    with pytest.raises(TypeError, match="NVFP4Tensor"):
        nvfp4.dequantize(np.zeros(3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dequantize_to_half_types_rounds_the_float32_value(rng, dtype):
    t = nvfp4.quantize(rng.standard_normal((3, 64)).astype(np.float32))
    f32 = nvfp4.dequantize(t)
    got = nvfp4.dequantize(t, dtype)
    assert got.dtype == DTYPES[dtype]
    np.testing.assert_array_equal(got, f32.astype(DTYPES[dtype]))


# ---------------------------------------------------------------------------------------------
# Blocked scale layout
# ---------------------------------------------------------------------------------------------


def _blocked_by_loops(sf):
    """Independent implementation: write each scale at its byte offset, slice by slice."""
    sf3 = sf[..., None] if sf.ndim == 2 else sf
    rows, kb, L = sf3.shape
    rb, cb = -(-rows // 128), -(-kb // 4)
    out = np.zeros((L, rb * cb * 512), np.uint8)
    for l in range(L):
        for r in range(rows):
            for c in range(kb):
                off = ((r // 128) * cb + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)
                out[l, off] = sf3[r, c, l]
    return out


@pytest.mark.parametrize("rows", [1, 31, 128, 129, 300])
@pytest.mark.parametrize("kb", [1, 4, 7, 448 // 16])
@pytest.mark.parametrize("L", [None, 3])
def test_blocked_layout_matches_the_offset_formula(rng, rows, kb, L):
    shape = (rows, kb) if L is None else (rows, kb, L)
    sf = rng.integers(1, 255, shape, dtype=np.uint8)
    b = nvfp4.to_blocked(sf)
    assert b.shape == nvfp4.blocked_shape(rows, kb, L) and b.flags.c_contiguous
    flat = b.reshape(1, -1) if L is None else b.reshape(L, -1)
    np.testing.assert_array_equal(flat, _blocked_by_loops(sf))
    np.testing.assert_array_equal(nvfp4.from_blocked(b, rows, kb), sf)
    np.testing.assert_array_equal(reference.plain_scales_from_blocked(b, rows, kb), sf)


@pytest.mark.parametrize("rows, kb", [(5, 3), (130, 9)])
def test_blocked_offset_function(rows, kb):
    sf = np.arange(rows * kb, dtype=np.int64).reshape(rows, kb)
    flat = nvfp4.to_blocked((sf % 251 + 1).astype(np.uint8)).reshape(-1)
    for r in range(rows):
        for c in range(kb):
            assert flat[nvfp4.blocked_offset(r, c, kb)] == sf[r, c] % 251 + 1


def test_gpumode_view_indexing(rng):
    rows, kb, L = 200, 10, 2
    sf = rng.integers(1, 255, (rows, kb, L), dtype=np.uint8).view(F8)
    b = nvfp4.to_blocked(sf)
    v = nvfp4.blocked_to_gpumode(b)
    assert v.shape == (32, 4, 2, 4, 3, L)
    for r, c, l in [(0, 0, 0), (37, 5, 1), (199, 9, 1), (128, 4, 0)]:
        assert v[r % 32, (r % 128) // 32, r // 128, c % 4, c // 4, l] == sf[r, c, l]
    back = nvfp4.gpumode_to_blocked(v)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back.view(np.uint8), b.view(np.uint8))
    with pytest.raises(ValueError, match=r"\(32, 4, RB, 4, CB, L\)"):
        nvfp4.gpumode_to_blocked(np.zeros((4, 32, 1, 4, 1, 1), np.uint8))


def test_blocked_layout_rejects_bad_input():
    with pytest.raises(TypeError, match="sf: expected dtype"):
        nvfp4.to_blocked(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="sf: expected 2 or 3 dimensions"):
        nvfp4.to_blocked(np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="blocked: expected shape"):
        nvfp4.from_blocked(np.zeros((1, 1, 32, 4, 4), np.uint8), 129, 4)


# ---------------------------------------------------------------------------------------------
# GPU: bit-identical to the CPU path
# ---------------------------------------------------------------------------------------------


def _gpu_input(cp, x):
    return cp.asarray(x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 16), (33, 96), (4, 3, 7168), (0, 64)])
@pytest.mark.parametrize("gs", [None, 7.5, "device"])
def test_gpu_quantize_is_bit_identical_to_cpu(cp, rng, dtype, shape, gs):
    x = (rng.standard_normal(shape) * 10).astype(DTYPES[dtype])
    x.reshape(-1)[:: max(1, x.size // 7)] *= 1e-4  # some tiny blocks: subnormal e4m3 scales
    gs_cpu = None if gs is None else (7.5 if gs == 7.5 else 3.25)
    gs_gpu = cp.asarray(np.float32(3.25)) if gs == "device" else gs_cpu
    want = nvfp4.quantize(x, gs_cpu)
    got = nvfp4.quantize(_gpu_input(cp, x), gs_gpu)
    assert float(got.global_scale.get()) == float(want.global_scale)
    np.testing.assert_array_equal(got.data.get(), want.data)
    np.testing.assert_array_equal(got.scales.get(), want.scales.view(np.uint8))
    for out_dtype in DTYPES:
        d_gpu = nvfp4.dequantize(got, out_dtype).get()
        d_cpu = nvfp4.dequantize(want, out_dtype)
        np.testing.assert_array_equal(d_gpu.view(np.uint8), d_cpu.view(np.uint8))


@pytest.mark.gpu
def test_gpu_non_finite_handling_matches_cpu(cp, rng):
    x = rng.standard_normal((5, 64)).astype(np.float16)
    x[0, 3], x[4, 63], x[2, 17] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match="finite"):
        nvfp4.quantize(cp.asarray(x))
    want = nvfp4.quantize(x, check_finite=False)
    got = nvfp4.quantize(cp.asarray(x), check_finite=False)
    np.testing.assert_array_equal(got.data.get(), want.data)
    np.testing.assert_array_equal(got.scales.get(), want.scales.view(np.uint8))
    assert float(got.global_scale.get()) == float(want.global_scale)


@pytest.mark.gpu
def test_gpu_codes_and_layouts_match_cpu(cp, rng):
    x = np.concatenate([np.linspace(-8, 8, 3001), TIES, np.negative(TIES)]).astype(np.float32)
    np.testing.assert_array_equal(nvfp4.e2m1_encode(cp.asarray(x)).get(), nvfp4.e2m1_encode(x))
    codes = np.arange(16, dtype=np.uint8)
    np.testing.assert_array_equal(nvfp4.e2m1_decode(cp.asarray(codes)).get(), nvfp4.e2m1_decode(codes))
    bits = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(nvfp4.e4m3_decode(cp.asarray(bits)).get(), nvfp4.e4m3_decode(bits))
    sf = rng.integers(0, 255, (300, 9, 2), dtype=np.uint8)
    b = nvfp4.to_blocked(cp.asarray(sf))
    np.testing.assert_array_equal(b.get(), nvfp4.to_blocked(sf))
    np.testing.assert_array_equal(nvfp4.from_blocked(b, 300, 9).get(), sf)


@pytest.mark.gpu
def test_gpu_quantize_torch_in_torch_out(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((16, 128)).astype(np.float32)).to("cuda", torch.bfloat16)
    t = nvfp4.quantize(x)
    assert isinstance(t.data, torch.Tensor) and t.data.device == x.device and t.data.dtype == torch.uint8
    want = nvfp4.quantize(x.float().cpu().numpy().astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(t.data.cpu().numpy(), want.data)
    deq = nvfp4.dequantize(t, "bfloat16")
    assert isinstance(deq, torch.Tensor) and deq.dtype == torch.bfloat16
