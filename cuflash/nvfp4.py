"""The NVFP4 format, for numpy (CPU) and CuPy / torch CUDA (GPU) arrays alike.

NVFP4 stores a tensor ``x [..., K]`` as

- ``data   [..., K/2]  uint8``: e2m1 codes, two per byte, the lower K index in the low nibble
  (torch.float4_e2m1fn_x2 and CUTLASS order);
- ``scales [..., K/16]``: one e4m3 (float8_e4m3fn) block scale per 16 consecutive values along K,
  as ``ml_dtypes.float8_e4m3fn`` on the CPU and as uint8 bit patterns on the GPU (CuPy has no float8);
- ``global_scale``: one float32 per tensor, in **encode form** ``gs`` (``x * gs`` maps the tensor's
  amax to 448 * 6). Checkpoints often store the **decode form** ``1 / gs``
  (:attr:`NVFP4Tensor.decode_scale`). A GEMM of two quantized tensors multiplies by
  ``alpha = 1 / (gs_a * gs_b)``.

The recipe (every step one correctly rounded float32 operation, so CPU and GPU agree bit for bit):

1. ``amax = max |x|`` over the finite values; ``gs = 2688 / amax`` (clamped to the largest float32;
   1 when amax is 0), unless ``global_scale`` is given;
2. per block of 16: ``s = e4m3(gs * (amax_block / 6))`` rounded to nearest even and saturated at 448;
3. ``q = e2m1(x * (gs / s))`` rounded to nearest even and saturated at +-6 (``q = 0`` where s is 0).

Dequantization is ``x ~ (q * s) / gs`` in float32.

The blocked scale layout is cuBLAS's (and GPU MODE's): rows padded to 128 and scale columns to 4 (with
zeros); each 128 x 4 tile of scales is a contiguous 512-byte atom, and scale ``(r, c)`` of a slice sits
at byte ``((r // 128) * ceil(Kb / 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4``
with ``Kb = K / 16``. :func:`to_blocked` returns it as a contiguous array ``[RB, CB, 32, 4, 4]`` (or
``[L, RB, CB, 32, 4, 4]``), ``RB = ceil(rows / 128)``, ``CB = ceil(Kb / 4)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from . import _jit, _validate as V
from . import interop

SCALE_BLOCK = 16  # values per e4m3 block scale
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_SCALE_NUMERATOR = np.float32(E4M3_MAX * E2M1_MAX)  # 2688
BLOCKED_ROWS = 128  # rows per blocked-layout atom
BLOCKED_COLS = 4  # scale columns per blocked-layout atom
_FLT_MAX = np.float32(np.finfo(np.float32).max)
_E4M3_NAN_BITS = 0x7F

#: Value of each e2m1 code 0..15 (code & 8 is the sign).
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
#: Value of each e4m3 bit pattern 0..255 (0x7F and 0xFF are NaN).
E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)

_INPUT_DTYPES = ("float32", "float16", "bfloat16")
_SCALE_DTYPES = ("float8_e4m3fn", "uint8")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

_CUDA_TYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_THREADS = 256


@dataclass(frozen=True)
class NVFP4KernelConfig(_jit.KernelConfig):
    """Quantize/dequantize kernels for one element type (float32, float16 or bfloat16)."""

    dtype: str = "float16"
    source = "nvfp4.cu"
    family = _jit.ARCH_PORTABLE

    def name_expressions(self) -> tuple[str, ...]:
        t = _CUDA_TYPE[self.dtype]
        return (
            f"cuflash::nvfp4_amax<{t}>",
            f"cuflash::nvfp4_quantize<{t}>",
            f"cuflash::nvfp4_dequantize<{t}>",
            "cuflash::nvfp4_global_scale",
            "cuflash::e2m1_encode_kernel",
        )

    def kernel_name(self) -> str:
        return f"nvfp4_{self.dtype}"


def kernel_variants():
    """Every kernel config of this module (CI compiles them all)."""
    return [NVFP4KernelConfig(d) for d in _INPUT_DTYPES]


def _grid(n: int, device_id: int) -> int:
    # grid-stride kernels: enough blocks to fill every SM several times over, no more
    return max(1, min(V.ceil_div(n, _THREADS), _jit.sm_count(device_id) * 16))


# ----------------------------------------------------------------------------------------------
# e2m1 and e4m3 codes
# ----------------------------------------------------------------------------------------------


def _xp(x):
    if interop.is_cupy_array(x):
        return _jit.require_cupy()
    return np


def e2m1_decode(codes):
    """float32 values of e2m1 codes (uint8, one code per element in its low nibble)."""
    V.check_dtype("codes", codes, ("uint8",))
    xp = _xp(codes)
    return xp.asarray(E2M1_VALUES)[codes & 0xF]


def _e2m1_encode_np(y: np.ndarray) -> np.ndarray:
    mag = np.abs(y)
    # Thresholds with ties to the even code (0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0,
    # 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0); above 5 saturates to 6. Same as cuda_src/common/fp4.cuh.
    m = (
        (mag > 0.25).astype(np.uint8)
        + (mag >= 0.75)
        + (mag > 1.25)
        + (mag >= 1.75)
        + (mag > 2.5)
        + (mag >= 3.5)
        + (mag > 5.0)
    )
    return (m | (np.signbit(y).astype(np.uint8) << 3)).astype(np.uint8)


def e2m1_encode(x):
    """e2m1 codes (uint8, one per element) of finite float32 values: round to nearest even,
    saturating at +-6, keeping the sign of zero. Non-finite input raises ValueError on the CPU;
    on the GPU (no host sync) NaN gives code 0 and +-inf saturates to +-6."""
    V.check_dtype("x", x, ("float32",))
    if interop.is_gpu_array(x):
        ctx = interop.call_context(x=x)
        cp = _jit.require_gpu()
        with ctx.device(), ctx.stream:
            xc = cp.ascontiguousarray(ctx.cupy(x))
            out = cp.empty(xc.shape, dtype=cp.uint8)
            k = _jit.get_kernel(NVFP4KernelConfig("float32"), "cuflash::e2m1_encode_kernel", ctx.device_id)
            k.launch(_grid(xc.size, ctx.device_id), _THREADS, (xc, np.int64(xc.size), out), stream=ctx.stream)
            return ctx.to_caller(out)
    V.check_finite_numpy("x", x)
    return _e2m1_encode_np(x)


def pack_e2m1(codes):
    """Pack e2m1 codes [..., K] (uint8, K even) into bytes [..., K/2], lower K index in the low nibble."""
    V.check_dtype("codes", codes, ("uint8",))
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: the last dimension must be even to pack two codes per byte, got {codes.shape[-1]}")
    lo, hi = codes[..., 0::2] & 0xF, codes[..., 1::2] & 0xF
    return (lo | (hi << 4)).astype(np.uint8)


def unpack_e2m1(packed):
    """Inverse of :func:`pack_e2m1`: bytes [..., K/2] -> codes [..., K]."""
    V.check_dtype("packed", packed, ("uint8",))
    xp = _xp(packed)
    out = xp.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


def e4m3_encode(x):
    """e4m3 (float8_e4m3fn) of float32 values, round to nearest even, saturating at +-448 (NaN stays
    NaN). Returns ml_dtypes.float8_e4m3fn on the CPU."""
    V.check_dtype("x", x, ("float32",))
    if interop.is_cupy_array(x):
        raise TypeError("e4m3_encode: expected a numpy array (the GPU encodes scales inside quantize), got a CuPy array")
    return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def e4m3_decode(bits):
    """float32 values of e4m3 scales: ml_dtypes.float8_e4m3fn arrays, or uint8 bit patterns (CPU or GPU)."""
    V.check_dtype("bits", bits, _SCALE_DTYPES)
    xp = _xp(bits)
    return xp.asarray(E4M3_VALUES)[_scale_bits(bits)]


def _scale_bits(scales):
    """uint8 bit patterns of e4m3 scales given as uint8 or ml_dtypes.float8_e4m3fn."""
    return scales if V.dtype_name(scales) == "uint8" else scales.view(np.uint8)


# ----------------------------------------------------------------------------------------------
# Quantized tensors
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NVFP4Tensor:
    """An NVFP4 tensor of logical shape ``[..., K]``.

    Attributes
    ----------
    data : uint8 [..., K/2]
        Packed e2m1 codes, lower K index in the low nibble.
    scales : [..., K/16]
        e4m3 block scales: ml_dtypes.float8_e4m3fn (numpy) or uint8 bit patterns (CuPy / torch).
    global_scale : float32 0-d array (numpy or CuPy, on the data's device)
        Encode form ``gs``: dequantized values are ``(q * s) / gs``.
    """

    data: Any
    scales: Any
    global_scale: Any

    def __post_init__(self):
        V.check_dtype("data", self.data, ("uint8",))
        V.check_dtype("scales", self.scales, _SCALE_DTYPES)
        if len(self.data.shape) < 1:
            raise ValueError(f"data: expected at least 1 dimension, got shape {V.shape_of(self.data)}")
        k = int(self.data.shape[-1]) * 2
        V.check_multiple("data", "the logical K (2 * last dimension)", k, SCALE_BLOCK, "one e4m3 scale per 16 values")
        V.check_shape("scales", self.scales, V.shape_of(self.data)[:-1] + (k // SCALE_BLOCK,))
        gs = self.global_scale
        if not (hasattr(gs, "dtype") and V.dtype_name(gs) == "float32" and V.shape_of(gs) in ((), (1,))):
            raise TypeError(f"global_scale: expected a float32 array of shape () , got {V.dtype_name(gs)} {getattr(gs, 'shape', '')}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape [..., K]."""
        s = V.shape_of(self.data)
        return s[:-1] + (s[-1] * 2,)

    @property
    def decode_scale(self):
        """``1 / global_scale`` (float32), the form checkpoints usually store."""
        return (1 / self.global_scale).astype(np.float32)

    def dequantize(self, dtype="float32"):
        return dequantize(self, dtype)

    def scales_blocked(self):
        """The block scales in the cuBLAS blocked layout (see :func:`to_blocked`); needs 2-D data."""
        return to_blocked(self.scales)


def _as_global_scale_np(global_scale) -> np.ndarray:
    return np.array(V.check_positive_finite("global_scale", global_scale), dtype=np.float32)


def _global_scale_from_amax_np(amax: np.float32) -> np.ndarray:
    if amax == 0:
        return np.array(1.0, np.float32)
    with np.errstate(over="ignore"):
        gs = GLOBAL_SCALE_NUMERATOR / np.float32(amax)
    return np.array(min(gs, _FLT_MAX), dtype=np.float32)


def _quantize_np(x: np.ndarray, gs: np.ndarray):
    xf = x.astype(np.float32).reshape(-1, SCALE_BLOCK)
    a = np.abs(xf)
    finite = np.isfinite(a).all(axis=1)
    amax = np.where(finite, np.max(np.where(np.isfinite(a), a, 0), axis=1, initial=0), 0).astype(np.float32)
    g = np.float32(gs)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        sf = g * (amax / np.float32(E2M1_MAX))
        sbits = e4m3_encode(sf.astype(np.float32)).view(np.uint8).copy()
        s = E4M3_VALUES[sbits]
        inv = np.where(s != 0, g / np.where(s != 0, s, 1), np.float32(0)).astype(np.float32)
        y = xf * inv[:, None]
    codes = _e2m1_encode_np(np.where(finite[:, None], y, 0))
    sbits[~finite] = _E4M3_NAN_BITS
    codes[~finite] = 0
    data = pack_e2m1(codes).reshape(x.shape[:-1] + (x.shape[-1] // 2,))
    scales = sbits.reshape(x.shape[:-1] + (x.shape[-1] // SCALE_BLOCK,)).view(ml_dtypes.float8_e4m3fn)
    return data, scales


def _check_quantize_input(x) -> str:
    dt = V.check_dtype("x", x, _INPUT_DTYPES)
    if len(x.shape) < 1:
        raise ValueError(f"x: expected at least 1 dimension [..., K], got shape {V.shape_of(x)}")
    V.check_multiple("x", "the last dimension K", int(x.shape[-1]), SCALE_BLOCK, "one e4m3 scale per 16 values")
    return dt


def quantize(x, global_scale=None, *, check_finite: bool = True) -> NVFP4Tensor:
    """Quantize ``x [..., K]`` (float32, float16 or bfloat16; K a multiple of 16) to NVFP4.

    Parameters
    ----------
    x : numpy, CuPy or torch CUDA array [..., K]
    global_scale : optional, **encode form** ``gs`` (``x * gs`` maps amax to 448 * 6, as FlashInfer's
        and TensorRT-LLM's ``fp4_quantize`` take it). A number, or a 0-d float32 array on x's device.
        Default: ``2688 / amax(|x|)`` computed from x.
    check_finite : if True (default) NaN or inf in ``x`` raises ValueError (on the GPU this costs one
        host sync). If False they give a documented result: a block holding a non-finite value gets
        scale NaN (0x7F) and codes 0, so it dequantizes to NaN, and the default global scale is taken
        over the finite values only.

    Returns
    -------
    NVFP4Tensor with data [..., K/2] uint8, scales [..., K/16], global_scale float32 (encode form).
    GPU input gives GPU output (torch in, torch out; the global scale stays a CuPy 0-d array).

    Example
    -------
    >>> t = quantize(np.random.randn(4, 64).astype(np.float32))
    >>> t.data.shape, t.scales.shape
    ((4, 32), (4, 4))
    """
    _check_quantize_input(x)
    if interop.is_gpu_array(x):
        return _quantize_gpu(x, global_scale, check_finite)
    if check_finite:
        V.check_finite_numpy("x", np.asarray(x, dtype=np.float32))
    if global_scale is None:
        a = np.abs(x.astype(np.float32))
        a = a[np.isfinite(a)]
        gs = _global_scale_from_amax_np(np.float32(a.max()) if a.size else np.float32(0))
    else:
        gs = _as_global_scale_np(global_scale)
    data, scales = _quantize_np(x, gs)
    return NVFP4Tensor(data, scales, gs)


def _quantize_gpu(x, global_scale, check_finite):
    ctx = interop.call_context(x=x)
    cp = _jit.require_gpu()
    with ctx.device(), ctx.stream:
        xc = ctx.cupy(x)
        dt = V.dtype_name(xc)
        if not xc.flags.c_contiguous or xc.data.ptr % 16:
            xc = cp.ascontiguousarray(xc) if not xc.flags.c_contiguous else xc.copy()
        cfg = NVFP4KernelConfig(dt)
        t = _CUDA_TYPE[dt]
        nblocks = xc.size // SCALE_BLOCK
        grid = _grid(nblocks, ctx.device_id)
        if global_scale is None or check_finite:
            stats = cp.zeros(2, dtype=cp.uint32)  # [amax bits, any non-finite]
            _jit.get_kernel(cfg, f"cuflash::nvfp4_amax<{t}>", ctx.device_id).launch(
                grid, _THREADS, (xc, np.int64(nblocks), stats), stream=ctx.stream
            )
            if check_finite and int(stats[1].get()):  # the one host sync, asked for by check_finite
                raise ValueError("x: expected finite values, got NaN or inf; pass check_finite=False for the documented NaN-block result")
        if global_scale is None:
            gs = cp.empty((), dtype=cp.float32)
            _jit.get_kernel(cfg, "cuflash::nvfp4_global_scale", ctx.device_id).launch(1, 1, (stats, gs), stream=ctx.stream)
        elif interop.is_cupy_array(global_scale):
            if global_scale.dtype != cp.float32 or global_scale.size != 1:
                raise TypeError(f"global_scale: expected a float32 array of one element, got {global_scale.dtype} {global_scale.shape}")
            gs = global_scale.reshape(())
        else:
            gs = cp.asarray(_as_global_scale_np(global_scale))
        data = cp.empty(xc.shape[:-1] + (xc.shape[-1] // 2,), dtype=cp.uint8)
        scales = cp.empty(xc.shape[:-1] + (xc.shape[-1] // SCALE_BLOCK,), dtype=cp.uint8)
        _jit.get_kernel(cfg, f"cuflash::nvfp4_quantize<{t}>", ctx.device_id).launch(
            grid, _THREADS, (xc, np.int64(nblocks), gs, data, scales), stream=ctx.stream
        )
        return NVFP4Tensor(ctx.to_caller(data), ctx.to_caller(scales), gs)


def dequantize(t: NVFP4Tensor, dtype: str = "float32"):
    """``(q * s) / gs`` as ``dtype`` (float32, float16 or bfloat16), shape [..., K], on t's device."""
    if not isinstance(t, NVFP4Tensor):
        raise TypeError(f"t: expected an NVFP4Tensor, got {type(t).__name__}")
    dtype = str(np.dtype(dtype)) if dtype != "bfloat16" else "bfloat16"
    if dtype not in _INPUT_DTYPES:
        raise TypeError(f"dtype: expected one of {_INPUT_DTYPES}, got {dtype}")
    if interop.is_gpu_array(t.data):
        return _dequantize_gpu(t, dtype)
    codes = unpack_e2m1(t.data)
    q = E2M1_VALUES[codes]
    s = E4M3_VALUES[_scale_bits(np.asarray(t.scales))]
    gs = np.float32(t.global_scale)
    with np.errstate(invalid="ignore"):
        val = (q * np.repeat(s, SCALE_BLOCK, axis=-1)) / gs
    out_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return val.astype(np.float32).astype(out_dtype)


def _dequantize_gpu(t: NVFP4Tensor, dtype: str):
    ctx = interop.call_context(data=t.data, scales=t.scales, global_scale=t.global_scale)
    cp = _jit.require_gpu()
    with ctx.device(), ctx.stream:
        data = cp.ascontiguousarray(ctx.cupy(t.data))
        scales = cp.ascontiguousarray(_scale_bits(ctx.cupy(t.scales)))
        gs = ctx.cupy(t.global_scale)
        if V.dtype_name(gs) != "float32":
            raise TypeError(f"global_scale: expected float32, got {V.dtype_name(gs)}")
        out_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else cp.dtype(dtype)
        out = cp.empty(data.shape[:-1] + (data.shape[-1] * 2,), dtype=out_dtype)
        nblocks = scales.size
        _jit.get_kernel(NVFP4KernelConfig(dtype), f"cuflash::nvfp4_dequantize<{_CUDA_TYPE[dtype]}>", ctx.device_id).launch(
            _grid(nblocks, ctx.device_id), _THREADS, (data, scales, gs, np.int64(nblocks), out), stream=ctx.stream
        )
        return ctx.to_caller(out)


# ----------------------------------------------------------------------------------------------
# Scale layouts
# ----------------------------------------------------------------------------------------------


def blocked_offset(r: int, c: int, kb: int) -> int:
    """Byte offset of scale (row r, scale column c) inside one slice of the blocked layout."""
    return ((r // 128) * V.ceil_div(kb, 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)


def blocked_shape(rows: int, kb: int, L: int | None = None) -> tuple[int, ...]:
    """Shape :func:`to_blocked` returns for ``rows`` x ``kb`` scales (and L slices)."""
    core = (V.ceil_div(rows, BLOCKED_ROWS), V.ceil_div(kb, BLOCKED_COLS), 32, 4, 4)
    return core if L is None else (L,) + core


def to_blocked(sf):
    """Plain scales ``[rows, Kb]`` (or ``[rows, Kb, L]``, L last as GPU MODE passes it) to the
    blocked layout ``[RB, CB, 32, 4, 4]`` (or ``[L, RB, CB, 32, 4, 4]``), contiguous, padding with
    zeros. Works on numpy and CuPy arrays; dtype is kept."""
    V.check_dtype("sf", sf, _SCALE_DTYPES)
    V.check_ndim("sf", sf, (2, 3))
    xp = _xp(sf)
    sf3 = sf[None] if sf.ndim == 2 else xp.moveaxis(sf, 2, 0)  # [L, rows, kb]
    L, rows, kb = sf3.shape
    rb, cb = V.ceil_div(rows, BLOCKED_ROWS), V.ceil_div(kb, BLOCKED_COLS)
    padded = xp.zeros((L, rb * BLOCKED_ROWS, cb * BLOCKED_COLS), dtype=sf.dtype)
    padded[:, :rows, :kb] = sf3
    # row r = rb*128 + j*32 + i, column c = cb*4 + k  ->  [L, rb, cb, i, j, k]
    out = xp.ascontiguousarray(padded.reshape(L, rb, 4, 32, cb, 4).transpose(0, 1, 4, 3, 2, 5))
    return out[0] if sf.ndim == 2 else out


def from_blocked(blocked, rows: int, kb: int):
    """Inverse of :func:`to_blocked`: ``[RB, CB, 32, 4, 4]`` -> ``[rows, kb]`` (``[L, ...]`` -> ``[rows, kb, L]``)."""
    V.check_dtype("blocked", blocked, _SCALE_DTYPES)
    V.check_ndim("blocked", blocked, (5, 6))
    want = blocked_shape(rows, kb)
    has_l = blocked.ndim == 6
    V.check_shape("blocked", blocked, ((None,) if has_l else ()) + want)
    xp = _xp(blocked)
    b6 = blocked if has_l else blocked[None]
    L, rb, cb = b6.shape[:3]
    plain = b6.transpose(0, 1, 4, 3, 2, 5).reshape(L, rb * BLOCKED_ROWS, cb * BLOCKED_COLS)[:, :rows, :kb]
    return xp.ascontiguousarray(plain[0]) if not has_l else xp.ascontiguousarray(xp.moveaxis(plain, 0, 2))


_GPUMODE_PERMUTE = (3, 4, 1, 5, 2, 0)  # [L, RB, CB, 32, 4, 4] -> (32, 4, RB, 4, CB, L)
_GPUMODE_INVERSE = (5, 2, 4, 0, 1, 3)


def blocked_to_gpumode(blocked):
    """The 6-D permuted view GPU MODE passes, ``(32, 4, RB, 4, CB, L)``, of blocked scales
    ``[L, RB, CB, 32, 4, 4]`` (no copy)."""
    V.check_ndim("blocked", blocked, (6,))
    if interop.is_torch_tensor(blocked):
        return blocked.permute(*_GPUMODE_PERMUTE)
    return blocked.transpose(_GPUMODE_PERMUTE)


def gpumode_to_blocked(view):
    """Blocked scales ``[L, RB, CB, 32, 4, 4]`` behind GPU MODE's view ``(32, 4, RB, 4, CB, L)``
    (no copy when the view is over contiguous storage, as GPU MODE's is)."""
    V.check_ndim("view", view, (6,))
    s = V.shape_of(view)
    if s[0] != 32 or s[1] != 4 or s[3] != 4:
        raise ValueError(f"view: expected shape (32, 4, RB, 4, CB, L), got {s}")
    if interop.is_torch_tensor(view):
        return view.permute(*_GPUMODE_INVERSE)
    return view.transpose(_GPUMODE_INVERSE)
