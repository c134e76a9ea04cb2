"""NVFP4 block-scaled grouped GEMMs: a list of groups, the ragged MoE layout and the fused dual GEMM.

Every product is ``C = alpha * (A * sfa) @ (B * sfb)^T`` with fp32 accumulation:

- **B** (weights) is NVFP4: packed e2m1 codes ``uint8 [N, K/2]`` (torch ``float4_e2m1fn_x2`` too),
  K-major, lower K index in the low nibble, with e4m3 block scales ``sfb`` (one per 16 values);
- **A** (tokens) is either NVFP4 as well, ``uint8 [M, K/2]`` with ``sfa`` (**W4A4**, the GPU MODE
  contract), or plain ``float16`` / ``bfloat16 [M, K]`` activations with ``sfa=None`` (**W4A16**,
  how NVFP4 checkpoints are served on Hopper);
- scales come in the **plain** layout (``[rows, K/16]``, e4m3 or their uint8 bit patterns) or the
  cuBLAS **blocked** layout (``[ceil(rows/128), ceil(K/64), 32, 4, 4]``, see :mod:`cuflash.nvfp4`),
  read by the kernel in place;
- an optional trailing batch axis L, as GPU MODE passes it: ``a [M, K/2, L]``, ``b [N, K/2, L]``,
  plain scales ``[rows, K/16, L]``, blocked scales ``[L, RB, CB, 32, 4, 4]``, output ``[M, N, L]``.

Shape rules: M >= 0 (0 gives an empty output), N >= 1, and **K a positive multiple of 64** (one
pipeline stage of the kernel holds 64 K values, i.e. four e4m3 scale blocks, and reads each row's
four scale bytes as one aligned word); other K raise ValueError.

All groups run in ONE launch: the host writes a table of problems (pointers, strides, sizes,
alpha), cached on the device per distinct table, and a persistent grid walks the tiles of every
problem (``cuda_src/common/tile_scheduler.cuh``). Ragged MoE row counts are read from ``offsets``
on the device: no host sync anywhere.
"""

from __future__ import annotations

import collections
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import _jit, _validate as V
from . import interop

# ----------------------------------------------------------------------------------------------
# Constants shared with cuda_src/gemm.cu
# ----------------------------------------------------------------------------------------------

STAGE_K = 64  # K values per pipeline stage: K must be a multiple of it
SCALE_BLOCK = 16
BLOCK_N = 128  # weight rows per CTA of the portable kernel (4 warps x 32 rows); see GemmKernelConfig.block_n
_WARPS_N = 4
_TOKEN_PITCH = (STAGE_K + 8) * 2  # bytes per fp16 token row in shared memory (padded)
_STAGE_PACKED = STAGE_K // 2
_STAGE_SCALES = STAGE_K // SCALE_BLOCK
_ALIGN_DATA = 16  # cp.async 16-byte copies of data rows
_ALIGN_SCALES = 4  # cp.async 4-byte copies of one stage's scales
MAX_PROBLEMS = 8192  # groups x L: the tile prefix lives in shared memory (4 bytes each)

_TOKEN_KINDS = {"nvfp4": 0, "float16": 1, "bfloat16": 2}
_OUT_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}
_PACKED_DTYPES = ("uint8", "float4_e2m1fn_x2")
_SCALE_DTYPES = ("float8_e4m3fn", "uint8")
_ACT_DTYPES = ("float16", "bfloat16")

#: The device problem record, field for field ``struct GemmProblem`` in tile_scheduler.cuh.
PROBLEM_DTYPE = np.dtype(
    [
        ("a", "<i8"), ("b", "<i8"), ("b2", "<i8"), ("sfa", "<i8"), ("sfb", "<i8"), ("sfb2", "<i8"), ("c", "<i8"),
        ("a_row", "<i8"), ("b_row", "<i8"), ("sfa_row", "<i8"), ("sfb_row", "<i8"), ("c_row", "<i8"),
        ("m", "<i4"), ("n", "<i4"), ("k", "<i4"), ("group", "<i4"),
        ("alpha", "<f4"), ("alpha2", "<f4"), ("rows_total", "<i4"), ("pad", "<i4"),
    ]
)
assert PROBLEM_DTYPE.itemsize == 128  # noqa: S101 (a module invariant, not user input)


# ----------------------------------------------------------------------------------------------
# Kernel config and tile heuristic
# ----------------------------------------------------------------------------------------------


ARCH_CHOICES = ("portable", "hopper")
_WGMMA_THREADS = 384  # a producer warpgroup and two consumer warpgroups of 64 weight rows each
_WGMMA_CONSUMER_THREADS = 256
_WGMMA_TOKEN_TILE = STAGE_K * 2  # bytes per token per stage in the wgmma kernel's swizzled layout (no padding)
_SWIZZLE_ATOM = 1024  # the wgmma kernel's stages and their token tiles are 1024-byte aligned
_MBARRIER_BYTES = 8
# the wgmma kernel's epilogue buffer: per consumer warpgroup, block_m token rows of 64 16-bit outputs plus
# 16 bytes of padding (WgmmaTraits::kEpiBytes)
_WGMMA_EPI_PITCH = 64 * 2 + 16
_DEQUANT_THREADS = 256  # dequant_tokens_kernel: one thread per scale block of 16 token values
_SK_FLAG_BYTES = 4  # the wgmma kernel's stream-K fixup flag, after the tile prefix


@dataclass(frozen=True)
class GemmKernelConfig(_jit.KernelConfig):
    """One instantiation of ``cuflash::group_gemm_kernel`` (arch "portable", mma.sync, sm_80+) or of
    ``cuflash::group_gemm_wgmma_kernel`` (arch "hopper", wgmma, warp-specialized, sm_90a only) in
    cuda_src/gemm.cu. W4A4 on the hopper kernel and in the portable kernel's 16-token tiles runs
    ``cuflash::dequant_tokens_kernel`` first (the tokens once to fp16), then the fp16 GEMM kernel.

    tokens: "nvfp4" (W4A4), "float16" or "bfloat16" (W4A16); block_m: tokens per CTA tile (16, 32,
    64 or 128; the wgmma N); warps_m: warps splitting those tokens (4 * warps_m warps in all;
    portable only, 1 for hopper, whose two consumer warpgroups split the weight rows); stages:
    pipeline depth (cp.async groups, or the hopper ring of shared-memory stages); dual: two weight
    operands and the silu-gated epilogue; row_blocks (hopper): 64-row wgmma blocks per consumer
    warpgroup, 1 (128 weight rows per tile) or 2 (256; one weight operand, block_m <= 128);
    sub_stages (portable): 64-value K steps per pipeline stage, 1, 2 or 4 (each weight row read 32,
    64 or 128 contiguous bytes at a time; see the pipeline note in gemm.cu); more than 1 only where
    the kernel's tokens are fp16/bf16 (W4A4: 16-token tiles, whose tokens are dequantized first).
    """

    tokens: str = "nvfp4"
    block_m: int = 64
    warps_m: int = 1
    stages: int = 4
    dual: bool = False
    arch: str = "portable"
    row_blocks: int = 1
    sub_stages: int = 1
    source = "gemm.cu"

    def __post_init__(self):
        if self.tokens not in _TOKEN_KINDS:
            raise ValueError(f"tokens: expected one of {tuple(_TOKEN_KINDS)}, got {self.tokens!r}")
        if self.arch not in ARCH_CHOICES:
            raise ValueError(f"arch: expected one of {ARCH_CHOICES}, got {self.arch!r}")
        if self.block_m % (8 * self.warps_m):
            raise ValueError(f"block_m {self.block_m} must split into whole 8-token MMA tiles over {self.warps_m} warps")
        if self.arch == "hopper" and (self.warps_m != 1 or self.block_m % 16 or not 16 <= self.block_m <= 256):
            raise ValueError(f"hopper: expected warps_m 1 and block_m a multiple of 16 in [16, 256], got "
                             f"warps_m {self.warps_m}, block_m {self.block_m}")
        if self.stages < 2:
            raise ValueError(f"stages: expected >= 2, got {self.stages}")
        if self.row_blocks not in (1, 2) or (self.row_blocks == 2 and (self.arch != "hopper" or self.dual
                                                                       or self.block_m > 128)):
            raise ValueError(f"row_blocks: expected 1, or 2 for the single-operand hopper kernel with block_m <= 128, "
                             f"got {self.row_blocks} ({self.arch}, dual={self.dual}, block_m={self.block_m})")
        if self.sub_stages not in (1, 2, 4) or (self.sub_stages > 1 and (
                self.arch != "portable" or (self.tokens == "nvfp4" and not self.dequant_first))):
            raise ValueError(f"sub_stages: expected 1, or 2 or 4 for the portable kernel with fp16/bf16 tokens "
                             f"(W4A4: 16-token tiles, dequantized first), got {self.sub_stages} ({self.arch}, "
                             f"{self.tokens}, block_m={self.block_m})")

    @property
    def family(self) -> str:
        return _jit.ARCH_HOPPER if self.arch == "hopper" else _jit.ARCH_PORTABLE

    @property
    def threads(self) -> int:
        return _WGMMA_THREADS if self.arch == "hopper" else 32 * _WARPS_N * self.warps_m

    @property
    def block_n(self) -> int:
        """Weight rows per CTA tile: 128, or 256 with two row blocks (WgmmaTraits::kBlockRows)."""
        return BLOCK_N * self.row_blocks

    @property
    def dequant_first(self) -> bool:
        """W4A4 on the hopper kernel, and on the portable kernel's 16-token tiles (decode, MoE: every
        weight tile of a problem would dequantize the same few tokens again, inside its main loop): the
        tokens go through dequant_tokens_kernel into an fp16 workspace first, and the GEMM reads them
        as W4A16 tokens."""
        return self.tokens == "nvfp4" and (self.arch == "hopper" or (self.block_m == 16 and not self.dual))

    def name_expression(self) -> str:
        tok, dual = _TOKEN_KINDS[self.tokens], "true" if self.dual else "false"
        tok = _TOKEN_KINDS["float16"] if self.dequant_first else tok
        if self.arch == "hopper":
            return f"cuflash::group_gemm_wgmma_kernel<{self.block_m}, {self.row_blocks}, {self.stages}, {tok}, {dual}>"
        return (f"cuflash::group_gemm_kernel<{self.block_m}, {self.warps_m}, {self.stages}, {tok}, {dual}, "
                f"{self.sub_stages}>")

    DEQUANT_KERNEL = "cuflash::dequant_tokens_kernel"

    def name_expressions(self) -> tuple[str, ...]:
        return (self.name_expression(),) + ((self.DEQUANT_KERNEL,) if self.dequant_first else ())

    def kernel_name(self) -> str:
        kind = "group_gemm_wgmma" if self.arch == "hopper" else "group_gemm"
        rb = f"_rb{self.row_blocks}" if self.arch == "hopper" else ""
        sub = f"x{self.sub_stages}" if self.sub_stages > 1 else ""
        return (f"{kind}_{'dual_' if self.dual else ''}{self.tokens}_bm{self.block_m}{rb}_wm{self.warps_m}"
                f"_s{self.stages}{sub}")

    def smem_bytes(self, num_problems: int) -> int:
        """Dynamic shared memory of a launch over ``num_problems`` problems (GemmTraits /
        WgmmaTraits in gemm.cu)."""
        weights = 2 if self.dual else 1
        stage = weights * self.block_n * (_STAGE_PACKED + _STAGE_SCALES)
        prefix = 4 * (num_problems + 1)
        if self.arch == "hopper":
            prefix += _SK_FLAG_BYTES
            # fp16/bf16 tokens only (W4A4 arrives dequantized), stages rounded up to whole swizzle
            # atoms after up to 1024 bytes of alignment slack; the two consumer warpgroups' epilogue
            # buffers; a full and an empty mbarrier per stage
            stage = V.ceil_div(stage + self.block_m * _WGMMA_TOKEN_TILE, _SWIZZLE_ATOM) * _SWIZZLE_ATOM
            epilogue = 2 * self.block_m * _WGMMA_EPI_PITCH
            return _SWIZZLE_ATOM + self.stages * (stage + 2 * _MBARRIER_BYTES) + epilogue + prefix
        if self.tokens == "nvfp4" and not self.dequant_first:
            stage += self.block_m * (_STAGE_PACKED + _STAGE_SCALES)
            f16_buffer = self.block_m * _TOKEN_PITCH  # the stage's tokens, dequantized
        else:
            stage += self.block_m * _TOKEN_PITCH
            f16_buffer = 0
        return self.stages * self.sub_stages * stage + f16_buffer + prefix


_BLOCK_M_CHOICES = ((16, 1), (32, 1), (64, 1), (128, 2))  # (block_m, warps_m)
_DUAL_TILE = (64, 2)
# portable kernel, 16-token tiles: (pipeline stages, sub-stages per stage)
_DECODE_STAGES = (2, 4)
# wgmma ring depth: up to 8 stages in flight (8 stages of 128 tokens and 128 weight rows are 168 KB
# of shared memory); 256 weight rows: 6 stages (faster than 8 in both GPU MODE cases measured)
_HOPPER_STAGES = 8
_HOPPER_STAGES_2RB = 6
# Time model of the hopper group GEMM for choosing 128 or 256 weight rows per tile and stream-K: the
# persistent grid runs ceil(tiles / SMs) rounds of tiles, a round of k_stages stages takes
# k_stages * c + e_round us, and a launch e0 more. Refitted in session 11 on the H100 after the epilogue
# went through shared memory (scratch sweep: one 128-token group, 1-3 rounds of 132 tiles, K 512-8192,
# data parallel, GPU time; residuals within 2 us at 128 rows, 5 us at 256): 128 tokens x 128 rows
# c = 0.624, e_round = 1.3, e0 = 8.2 (an empty launch alone measures 3.6 there); x 256 rows (6 stages)
# c = 1.02, e_round = 2.65, e0 = 11.1 (~18% cheaper per MMA, but half the tiles).
_HOPPER_TILE_US = {1: (0.624, 1.3, 8.2), 2: (1.02, 2.65, 11.1)}


def _hopper_round_estimate(shapes, block_m: int, row_blocks: int, sms: int) -> float:
    c, e_round, e0 = _HOPPER_TILE_US[row_blocks]
    per_problem = [(tile_count([m], [n], block_m, BLOCK_N * row_blocks), k // STAGE_K) for m, n, k in shapes]
    tiles = sum(t for t, _ in per_problem)
    if tiles == 0:
        return 0.0
    stages = sum(t * ks for t, ks in per_problem) / tiles
    return V.ceil_div(tiles, sms) * (stages * c + e_round) + e0


def choose_config(tokens: str, dual: bool, rows_hint: int, arch: str = "portable", shapes=None,
                  sms: int = 132) -> GemmKernelConfig:
    """The kernel config for a call whose groups have about ``rows_hint`` token rows each (the
    largest M of a group list; the mean rows per expert for the ragged layout), for ``arch``
    "portable" (mma.sync) or "hopper" (wgmma; see :func:`launch_arch`). ``shapes``: the (M, N, K) of
    every problem of a group list, for the hopper kernel's choice of 128 or 256 weight rows per tile
    on ``sms`` multiprocessors.

    A CTA dequantizes its weight rows once per stage and reuses them for all of its tokens, so
    the largest token tile that does not mostly compute padding wins.
    """
    if arch == "hopper":
        # wgmma m64 n(block_m): each consumer thread holds block_m / 2 fp32 accumulators per set
        # (weight operand and row block); at most 2 x 64 (dual: 2 x 32 at 64 tokens).
        bm = 64 if dual else next((b for b, _ in _BLOCK_M_CHOICES if rows_hint <= b), 128)
        if not dual and bm == 128 and shapes:
            one, two = (_hopper_round_estimate(shapes, bm, rb, sms) for rb in (1, 2))
            if two < one:
                return GemmKernelConfig(tokens, bm, 1, _HOPPER_STAGES_2RB, arch="hopper", row_blocks=2)
        return GemmKernelConfig(tokens, bm, 1, _HOPPER_STAGES, dual=dual, arch="hopper")
    if dual:
        # Two accumulator sets: 64 tokens over two warps keeps 64 fp32 accumulators per thread
        # per weight operand (a 64-token single warp would need 128 and spills at 255 registers).
        return GemmKernelConfig(tokens, *_DUAL_TILE, dual=True)
    if rows_hint <= 16:
        # decode / MoE experts with a few tokens: 16-token tiles waste the least
        return _portable_config(tokens, 16, 1)
    if rows_hint <= 32:
        return _portable_config(tokens, 32, 1)
    if rows_hint <= 512:
        # GPU MODE's uneven groups (64-384 rows): 64-token tiles pad less and spread over more CTAs;
        # on the H100 17-35% faster than 128 x 2 in W4A16 and up to 35% in W4A4 (bench/sweep.py gemm,
        # session 3), except one case within 2%
        return _portable_config(tokens, 64, 1)
    # large groups (the dense 8192 case was measured with this tile only): 128 tokens over two warps
    # per weight slice, 64 accumulators per thread (238 registers on sm_90, no spills)
    return _portable_config(tokens, 128, 2)


def _portable_config(tokens: str, block_m: int, warps_m: int) -> GemmKernelConfig:
    """The portable kernel's tile of block_m tokens: 16-token tiles (decode, MoE experts) are
    memory-bound and read each weight row 128 contiguous bytes per pipeline stage (_DECODE_STAGES)."""
    if block_m == 16:
        stages, sub_stages = _DECODE_STAGES
        return GemmKernelConfig(tokens, block_m, warps_m, stages, sub_stages=sub_stages)
    return GemmKernelConfig(tokens, block_m, warps_m)


def kernel_variants() -> list[GemmKernelConfig]:
    """Every config :func:`choose_config` can return, both archs (CI compiles them all)."""
    out = []
    for tok in _TOKEN_KINDS:
        out += [_portable_config(tok, bm, wm) for bm, wm in _BLOCK_M_CHOICES]
        out.append(GemmKernelConfig(tok, *_DUAL_TILE, dual=True))
    for tok in _TOKEN_KINDS:
        out += [GemmKernelConfig(tok, bm, 1, _HOPPER_STAGES, arch="hopper") for bm, _ in _BLOCK_M_CHOICES]
        out.append(GemmKernelConfig(tok, 128, 1, _HOPPER_STAGES_2RB, arch="hopper", row_blocks=2))
        out.append(GemmKernelConfig(tok, 64, 1, _HOPPER_STAGES, dual=True, arch="hopper"))
    return out


WGMMA_ENV = "CUFLASH_GEMM_WGMMA"
STREAM_K_ENV = "CUFLASH_GEMM_STREAMK"
# Stream-K's cost beyond its stages (H100, scratch A/B of data parallel against forced stream-K, W4A16;
# refitted in session 11 with the model above): about 8 us per accumulator set a CTA parks and sums (GPU
# MODE group cases 1, 3 and 4 with 128-row tiles: 9.1, 7.8 and 6.9 us over the model; the dual GEMM M=512
# N=3072 K=7168, two sets: 16). The dual GEMM's stage costs 0.823 us (2 rounds of 112 stages in 195.2 us,
# M=512 N=3072 K=7168, data parallel).
_STREAM_K_FIXUP_US_PER_SET = 8.0
_DUAL_STAGE_US = 0.823


def _accumulator_sets(cfg: GemmKernelConfig) -> int:
    return (2 if cfg.dual else 1) * cfg.row_blocks


def stream_k_slot_floats(cfg: GemmKernelConfig) -> int:
    """fp32 accumulators a CTA of the wgmma kernel parks per stream-K piece (StreamK in gemm.cu)."""
    return _accumulator_sets(cfg) * (cfg.block_m // 2) * _WGMMA_CONSUMER_THREADS  # kSets x kAcc per consumer thread


def stream_k_grid(cfg: GemmKernelConfig, table: np.ndarray, tiles: int, slots: int) -> int:
    """The grid of a stream-K launch of the wgmma kernel, or 0 for data parallel (whole tiles).

    Stream-K splits the tiles x k-stages of the call evenly over the CTAs: it pays when the tiles fill the
    last wave of ``slots`` CTAs badly (GPU MODE case 1: 352 tiles are 2.67 waves of 132 but take 3 rounds
    of whole tiles; 229.7 -> 203.9 us on the H100) and the stages saved outweigh the fixup. It needs every
    problem to have the same K and the rows known on the host (not ragged); 256-row tiles keep data
    parallel (GPU MODE case 2 measured 134 us data parallel, 148 stream-K). ``CUFLASH_GEMM_STREAMK=0``
    never, ``=1`` wherever allowed; unset, the tile time model decides.
    """
    env = os.environ.get(STREAM_K_ENV)
    if (env == "0" or cfg.arch != "hopper" or tiles == 0 or (table["m"] < 0).any()
            or len(set(table["k"].tolist())) != 1):
        return 0
    kts = int(table["k"][0]) // STAGE_K
    units = tiles * kts
    grid = min(slots, units)
    if env == "1":
        return grid
    if cfg.row_blocks != 1:
        return 0
    c, e_round, e0 = _HOPPER_TILE_US[1]
    if cfg.dual:
        c = _DUAL_STAGE_US
    data_parallel = V.ceil_div(tiles, slots) * (kts * c + e_round) + e0
    stream_k = V.ceil_div(units, grid) * c + e_round + e0 + _STREAM_K_FIXUP_US_PER_SET * _accumulator_sets(cfg)
    return grid if stream_k < 0.95 * data_parallel else 0


def hopper_is_faster(dual: bool, rows_hint: int, ragged: bool = False) -> bool:
    """Where the warp-specialized wgmma kernel beat the portable one on the H100 (2026-11-23, session 4,
    after the swizzled token tile): the dual GEMM (bench/bench_group_gemm.py: 69-221 us against
    80-275 us), every GPU MODE group GEMM case (bench/sweep.py gemm: 25.7-255 us against 30.8-314 us)
    and the dense 8192 case (2474 us against 4494). The portable kernel stays faster for the MoE decode
    cases (ragged, 1-16 rows per expert: 639-1255 us against 707-1964), so ragged calls and groups of
    at most 32 rows keep it."""
    return not ragged and (dual or rows_hint > 32)


def launch_arch(device_id: int, dual: bool = False, rows_hint: int = 0, ragged: bool = False) -> str:
    """The GEMM kernel for a call: "hopper" (wgmma, compute capability 9.0 only) or "portable"
    (mma.sync). ``CUFLASH_GEMM_WGMMA=1`` takes the wgmma kernel wherever the device allows it,
    ``CUFLASH_GEMM_WGMMA=0`` never; unset, :func:`hopper_is_faster` decides."""
    env = os.environ.get(WGMMA_ENV)
    if env == "0" or _jit.device_cc(device_id) != (9, 0):
        return "portable"
    if env == "1" or hopper_is_faster(dual, rows_hint, ragged):
        return "hopper"
    return "portable"


# ----------------------------------------------------------------------------------------------
# Operand descriptions (shapes, strides and addresses of numpy, CuPy or torch arrays)
# ----------------------------------------------------------------------------------------------


def _ptr(x) -> int:
    if interop.is_torch_tensor(x):
        return int(x.data_ptr())
    if interop.is_cupy_array(x):
        return int(x.data.ptr)
    if isinstance(x, np.ndarray):
        return int(x.ctypes.data)
    raise TypeError(f"expected a numpy, CuPy or torch array, got {type(x).__name__}")


def _itemsize(x) -> int:
    if interop.is_torch_tensor(x):
        return int(x.element_size())
    return int(x.dtype.itemsize)


def _strides_bytes(x) -> tuple[int, ...]:
    if interop.is_torch_tensor(x):
        es = int(x.element_size())
        return tuple(int(s) * es for s in x.stride())
    return tuple(int(s) for s in x.strides)


@dataclass
class _Mat:
    """A 2-D or 3-D ([rows, cols] or [rows, cols, L]) operand as the kernel sees it."""

    name: str
    x: Any
    rows: int
    cols: int  # elements along K (bytes for packed data)
    L: int
    row_stride: int  # bytes
    l_stride: int  # bytes
    ptr: int
    needs_copy: bool  # not K-contiguous or misaligned: the launch copies it first


def _mat(name: str, x, align: int) -> _Mat:
    shape = V.shape_of(x)
    st = _strides_bytes(x)
    rows, cols = shape[0], shape[1]
    L = shape[2] if len(shape) == 3 else 1
    es = _itemsize(x)
    row_stride = st[0]
    l_stride = st[2] if len(shape) == 3 else 0
    if rows * cols * L == 0:  # nothing to read or write (NumPy 2 gives such arrays zero strides)
        return _Mat(name, x, rows, cols, L, row_stride, l_stride, 0, False)
    ptr = _ptr(x)
    col_ok = cols <= 1 or st[1] == es
    aligned = ptr % align == 0 and (rows <= 1 or row_stride % align == 0) and (L <= 1 or l_stride % align == 0)
    return _Mat(name, x, rows, cols, L, row_stride, l_stride, ptr, not (col_ok and aligned))


@dataclass
class _Blocked:
    """Blocked scales [L, RB, CB, 32, 4, 4] (or without L) of a [rows, K/16] scale matrix."""

    name: str
    x: Any
    L: int
    l_stride: int
    ptr: int
    needs_copy: bool


def _blocked(name: str, x, rows: int, k: int, L: int) -> _Blocked:
    V.check_dtype(name, x, _SCALE_DTYPES)
    core = (V.ceil_div(rows, 128), k // STAGE_K, 32, 4, 4)
    shape = V.shape_of(x)
    if len(shape) == 5 and L == 1:
        V.check_shape(name, x, core)
        xl, l_stride = 1, 0
    else:
        V.check_shape(name, x, (L,) + core)
        xl, l_stride = L, _strides_bytes(x)[0]
    st = _strides_bytes(x)[-5:]
    contiguous = st == (core[1] * 512, 512, 16, 4, 1)
    ptr = _ptr(x)
    aligned = ptr % _ALIGN_SCALES == 0 and (xl <= 1 or l_stride % _ALIGN_SCALES == 0)
    return _Blocked(name, x, xl, l_stride, ptr, not (contiguous and aligned))


# ----------------------------------------------------------------------------------------------
# Validation (shapes and dtypes only: runs on numpy arrays too, before anything touches a GPU)
# ----------------------------------------------------------------------------------------------


def _as_list(name: str, x) -> list:
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name}: expected a list of arrays (one per group), got {type(x).__name__}")
    return list(x)


def _check_layout(scale_layout: str) -> bool:
    if scale_layout not in ("plain", "blocked"):
        raise ValueError(f"scale_layout: expected 'plain' or 'blocked', got {scale_layout!r}")
    return scale_layout == "blocked"


def _token_kind(name: str, a, sfa) -> str:
    dt = V.check_dtype(name, a, _PACKED_DTYPES + _ACT_DTYPES)
    if dt in _ACT_DTYPES:
        if sfa is not None:
            raise ValueError(f"{name}: {dt} activations (W4A16) take no scales, but sfa was given; pass sfa=None")
        return dt
    if sfa is None:
        raise ValueError(f"{name}: packed NVFP4 tokens (W4A4) need their scales sfa, got None")
    return "nvfp4"


def _check_k(name: str, k: int) -> None:
    if k <= 0 or k % STAGE_K:
        raise ValueError(
            f"{name}: K must be a positive multiple of {STAGE_K} (one kernel stage holds {STAGE_K} values, four "
            f"e4m3 scale blocks), got K={k}"
        )


def _out_dtype(out_dtype, out_list) -> str:
    if out_dtype is None:
        if out_list:
            return V.check_dtype("out[0]", out_list[0], tuple(_OUT_CODES))
        return "float16"
    name = out_dtype if isinstance(out_dtype, str) else getattr(out_dtype, "name", None) or str(out_dtype)
    name = name.replace("torch.", "")
    if name not in _OUT_CODES:
        raise TypeError(f"out_dtype: expected float16, bfloat16 or float32, got {out_dtype}")
    return name


def _alphas(alpha, n: int, name: str = "alpha") -> list[float]:
    if alpha is None:
        return [1.0] * n
    if np.ndim(alpha) == 0:
        vals = [alpha] * n
    else:
        vals = list(np.asarray(alpha, dtype=np.float64).reshape(-1))
        if len(vals) != n:
            raise ValueError(f"{name}: expected a scalar or {n} values (one per group), got {len(vals)}")
    out = []
    for i, v in enumerate(vals):
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"{name}[{i}]: expected a finite number, got {f}")
        out.append(f)
    return out


@dataclass
class _Gemm:
    """One validated product of the call (a group, or the dual GEMM): operands and output shape."""

    a: _Mat
    b: list  # one or two _Mat (dual)
    sfa: Any  # _Mat (plain), _Blocked, or None (W4A16)
    sfb: list
    m: int
    n: int
    k: int
    L: int
    alpha: float
    alpha2: float
    out: _Mat | None


def _check_operand_shape(name: str, x, rows: int | None, cols: int, L: int | None, ndim: int) -> None:
    want = (rows, cols) + ((L,) if ndim == 3 else ())
    V.check_ndim(name, x, (ndim,))
    V.check_shape(name, x, want)


def _validate_product(idx: str, a, bs: list, sfa, sfbs: list, *, blocked: bool, tokens: str, alpha, alpha2,
                      out, out_dtype: str) -> _Gemm:
    V.check_ndim(f"a{idx}", a, (2, 3))
    ndim = len(a.shape)
    sa = V.shape_of(a)
    m, L = sa[0], (sa[2] if ndim == 3 else 1)
    k = sa[1] * (2 if tokens == "nvfp4" else 1)
    _check_k(f"a{idx}", k)
    names = ["b"] if len(bs) == 1 else ["b1", "b2"]
    bm, n = [], None
    for bn, b in zip(names, bs):
        V.check_dtype(f"{bn}{idx}", b, _PACKED_DTYPES)
        V.check_ndim(f"{bn}{idx}", b, (ndim,))
        nb = V.shape_of(b)[0]
        n = nb if n is None else n
        _check_operand_shape(f"{bn}{idx}", b, n, k // 2, L if ndim == 3 else None, ndim)
        bm.append(_mat(f"{bn}{idx}", b, _ALIGN_DATA))
    if n < 1:
        raise ValueError(f"b{idx}: expected N >= 1 weight rows, got {n}")
    kb = k // SCALE_BLOCK

    def scales(sname, sf, rows):
        if blocked:
            return _blocked(f"{sname}{idx}", sf, rows, k, L)
        V.check_dtype(f"{sname}{idx}", sf, _SCALE_DTYPES)
        _check_operand_shape(f"{sname}{idx}", sf, rows, kb, L if ndim == 3 else None, ndim)
        return _mat(f"{sname}{idx}", sf, _ALIGN_SCALES)

    sfa_d = scales("sfa", sfa, m) if tokens == "nvfp4" else None
    sfb_names = ["sfb"] if len(sfbs) == 1 else ["sfb1", "sfb2"]
    sfb_d = [scales(sn, sf, n) for sn, sf in zip(sfb_names, sfbs)]
    out_d = None
    if out is not None:
        V.check_dtype(f"out{idx}", out, (out_dtype,))
        _check_operand_shape(f"out{idx}", out, m, n, L if ndim == 3 else None, ndim)
        out_d = _mat(f"out{idx}", out, _itemsize(out))
        if out_d.needs_copy:
            raise ValueError(f"out{idx}: expected unit stride along N and element-aligned rows, got strides {_strides_bytes(out)} (bytes)")
    return _Gemm(_mat(f"a{idx}", a, _ALIGN_DATA), bm, sfa_d, sfb_d, m, n, k, L, alpha, alpha2, out_d)


def validate_group_gemm(a, b, sfa, sfb, *, alpha=None, out=None, out_dtype=None, scale_layout="plain") -> tuple[list, str, str]:
    """Check a :func:`group_gemm` call (shapes, dtypes, strides only: numpy arrays work too).

    Returns (list of per-group products, token kind, output dtype name). Raises ValueError/TypeError.
    """
    blocked = _check_layout(scale_layout)
    a, b, sfb = _as_list("a", a), _as_list("b", b), _as_list("sfb", sfb)
    G = len(a)
    if G == 0:
        raise ValueError("a: expected at least one group, got an empty list")
    sfa_l = [None] * G if sfa is None else _as_list("sfa", sfa)
    out_l = None if out is None else _as_list("out", out)
    for name, lst in (("b", b), ("sfa", sfa_l), ("sfb", sfb)) + ((("out", out_l),) if out_l is not None else ()):
        if len(lst) != G:
            raise ValueError(f"{name}: expected {G} entries (one per group, as in a), got {len(lst)}")
    tokens = _token_kind("a[0]", a[0], sfa_l[0])
    for i in range(1, G):
        t = _token_kind(f"a[{i}]", a[i], sfa_l[i])
        if t != tokens:
            raise ValueError(f"a[{i}]: every group must have the same token kind, got {t} after {tokens} in a[0]")
    odt = _out_dtype(out_dtype, out_l)
    alphas = _alphas(alpha, G)
    prods = [
        _validate_product(f"[{i}]", a[i], [b[i]], sfa_l[i], [sfb[i]], blocked=blocked, tokens=tokens,
                          alpha=alphas[i], alpha2=1.0, out=None if out_l is None else out_l[i], out_dtype=odt)
        for i in range(G)
    ]
    nprob = sum(p.L for p in prods)
    if nprob > MAX_PROBLEMS:
        raise ValueError(f"a: at most {MAX_PROBLEMS} products (groups x L) per call, got {nprob}")
    return prods, tokens, odt


def validate_dual_gemm(a, b1, b2, sfa, sfb1, sfb2, *, alpha1=None, alpha2=None, out=None, out_dtype=None,
                       scale_layout="plain") -> tuple[_Gemm, str, str]:
    """Check a :func:`dual_gemm` call; returns (product, token kind, output dtype name)."""
    blocked = _check_layout(scale_layout)
    tokens = _token_kind("a", a, sfa)
    odt = _out_dtype(out_dtype, [out] if out is not None else None)
    (al1,) = _alphas(alpha1, 1, "alpha1")
    (al2,) = _alphas(alpha2, 1, "alpha2")
    prod = _validate_product("", a, [b1, b2], sfa, [sfb1, sfb2], blocked=blocked, tokens=tokens, alpha=al1,
                             alpha2=al2, out=out, out_dtype=odt)
    if V.shape_of(b1) != V.shape_of(b2):
        raise ValueError(f"b2: expected the shape of b1 {V.shape_of(b1)}, got {V.shape_of(b2)}")
    return prod, tokens, odt


@dataclass
class _Ragged:
    a: _Mat
    b: _Mat  # [G * N, K/2] view description: rows of expert g start at g * N
    b_group_stride: int
    sfa: Any
    sfb: Any
    sfb_group_stride: int
    total_m: int
    n: int
    k: int
    groups: int
    alphas: list
    out: _Mat | None


def validate_group_gemm_ragged(a, b, sfa, sfb, offsets, *, alpha=None, out=None, out_dtype=None,
                               scale_layout="plain") -> tuple[_Ragged, str, str]:
    """Check a :func:`group_gemm_ragged` call; returns (description, token kind, output dtype name)."""
    blocked = _check_layout(scale_layout)
    tokens = _token_kind("a", a, sfa)
    V.check_ndim("a", a, (2,))
    total_m = V.shape_of(a)[0]
    k = V.shape_of(a)[1] * (2 if tokens == "nvfp4" else 1)
    _check_k("a", k)
    V.check_dtype("b", b, _PACKED_DTYPES)
    V.check_ndim("b", b, (3,))
    G, n = V.shape_of(b)[:2]
    V.check_shape("b", b, (G, n, k // 2))
    if G < 1 or n < 1:
        raise ValueError(f"b: expected at least one expert and N >= 1, got shape {V.shape_of(b)}")
    V.check_dtype("offsets", offsets, ("int32",))
    V.check_shape("offsets", offsets, (G + 1,))
    if G > MAX_PROBLEMS:
        raise ValueError(f"b: at most {MAX_PROBLEMS} experts per call, got {G}")
    odt = _out_dtype(out_dtype, [out] if out is not None else None)
    alphas = _alphas(alpha, G)
    bst = _strides_bytes(b)
    # Experts as one [G * N, K/2] matrix when the expert stride is N rows, else per-expert pointers.
    bmat = _mat("b", b[0], _ALIGN_DATA)
    bmat.x = b
    bmat.needs_copy = bmat.needs_copy or bst[0] % _ALIGN_DATA != 0
    kb = k // SCALE_BLOCK
    if blocked:
        sfa_d = _blocked("sfa", sfa, total_m, k, 1) if tokens == "nvfp4" else None
        sfb_d = _blocked("sfb", sfb, n, k, G)
        sfb_gs = sfb_d.l_stride
    else:
        sfa_d = None
        if tokens == "nvfp4":
            V.check_dtype("sfa", sfa, _SCALE_DTYPES)
            V.check_shape("sfa", sfa, (total_m, kb))
            sfa_d = _mat("sfa", sfa, _ALIGN_SCALES)
        V.check_dtype("sfb", sfb, _SCALE_DTYPES)
        V.check_shape("sfb", sfb, (G, n, kb))
        sfb_d = _mat("sfb", sfb[0], _ALIGN_SCALES)
        sfb_d.x = sfb
        sfb_gs = _strides_bytes(sfb)[0]
        sfb_d.needs_copy = sfb_d.needs_copy or sfb_gs % _ALIGN_SCALES != 0
    out_d = None
    if out is not None:
        V.check_dtype("out", out, (odt,))
        V.check_shape("out", out, (total_m, n))
        out_d = _mat("out", out, _itemsize(out))
        if out_d.needs_copy:
            raise ValueError(f"out: expected unit stride along N and element-aligned rows, got strides {_strides_bytes(out)} (bytes)")
    return _Ragged(_mat("a", a, _ALIGN_DATA), bmat, bst[0], sfa_d, sfb_d, sfb_gs, total_m, n, k, G, alphas, out_d), tokens, odt


# ----------------------------------------------------------------------------------------------
# The problem table (host side, pure numpy: tested on the CPU)
# ----------------------------------------------------------------------------------------------


def build_table(prods: Sequence[_Gemm], out_ptrs: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """One PROBLEM_DTYPE record per (product, L slice).

    ``out_ptrs[i] = (address, row stride in elements, L stride in bytes)`` of product i's output;
    operand addresses come from the validated descriptions (after any copies).
    """
    n_rec = sum(p.L for p in prods)
    t = np.zeros(n_rec, dtype=PROBLEM_DTYPE)
    j = 0
    for p, (cptr, crow, cl) in zip(prods, out_ptrs):
        for l in range(p.L):
            r = t[j]
            r["a"] = p.a.ptr + l * p.a.l_stride
            r["b"] = p.b[0].ptr + l * p.b[0].l_stride
            r["b2"] = p.b[-1].ptr + l * p.b[-1].l_stride
            r["a_row"] = p.a.row_stride
            r["b_row"] = p.b[0].row_stride
            if p.sfa is not None:
                r["sfa"] = p.sfa.ptr + l * p.sfa.l_stride
                r["sfa_row"] = getattr(p.sfa, "row_stride", 0)
            r["sfb"] = p.sfb[0].ptr + l * p.sfb[0].l_stride
            r["sfb2"] = p.sfb[-1].ptr + l * p.sfb[-1].l_stride
            r["sfb_row"] = getattr(p.sfb[0], "row_stride", 0)
            r["c"] = cptr + l * cl
            r["c_row"] = crow
            r["m"], r["n"], r["k"], r["group"] = p.m, p.n, p.k, 0
            r["alpha"], r["alpha2"] = p.alpha, p.alpha2
            r["rows_total"] = p.m
            t[j] = r
            j += 1
    return t


def build_ragged_table(rg: _Ragged, out_ptr: int, out_row: int) -> np.ndarray:
    """One record per expert; m = -1 tells the kernel to read the rows from offsets[g]."""
    t = np.zeros(rg.groups, dtype=PROBLEM_DTYPE)
    g = np.arange(rg.groups, dtype=np.int64)
    t["a"] = rg.a.ptr
    t["a_row"] = rg.a.row_stride
    t["b"] = rg.b.ptr + g * rg.b_group_stride
    t["b2"] = t["b"]
    t["b_row"] = rg.b.row_stride
    if rg.sfa is not None:
        t["sfa"] = rg.sfa.ptr
        t["sfa_row"] = getattr(rg.sfa, "row_stride", 0)
    t["sfb"] = rg.sfb.ptr + g * rg.sfb_group_stride
    t["sfb2"] = t["sfb"]
    t["sfb_row"] = getattr(rg.sfb, "row_stride", 0)
    t["c"] = out_ptr
    t["c_row"] = out_row
    t["m"] = -1
    t["n"] = rg.n
    t["k"] = rg.k
    t["group"] = g
    t["alpha"] = rg.alphas
    t["alpha2"] = 1.0
    t["rows_total"] = rg.total_m
    return t


def tile_count(ms: Sequence[int], ns: Sequence[int], block_m: int, block_n: int = BLOCK_N) -> int:
    """Tiles of a list of problems (what the kernel's prefix sums to)."""
    return sum(V.ceil_div(m, block_m) * V.ceil_div(n, block_n) for m, n in zip(ms, ns))


def ragged_tile_bound(total_m: int, groups: int, n: int, block_m: int, block_n: int = BLOCK_N) -> int:
    """Most tiles a ragged call can have whatever the offsets: each non-empty expert adds at most
    one partial token tile to ceil(total_m / block_m)."""
    return (V.ceil_div(total_m, block_m) + min(groups, total_m)) * V.ceil_div(n, block_n)


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------

_TABLE_CACHE_SIZE = 256
_table_cache: collections.OrderedDict = collections.OrderedDict()  # (device, bytes) -> cupy uint8
_lock = threading.Lock()


def _device_table(cp, table: np.ndarray, device_id: int):
    """The table on the device, uploaded once per distinct content (GPU MODE calls the same
    problem set back to back: no copy after the first call)."""
    key = (device_id, table.tobytes())
    with _lock:
        dev = _table_cache.get(key)
        if dev is not None:
            _table_cache.move_to_end(key)
            return dev
    dev = cp.asarray(table.view(np.uint8))
    with _lock:
        _table_cache[key] = dev
        while len(_table_cache) > _TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    return dev


@dataclass
class _Prepared:
    """Everything one GEMM call launches once its arguments are validated (nothing when there is
    nothing to compute; two kernels when W4A4 tokens are dequantized first), replayed as is when the
    same arrays (same addresses, shapes, strides, dtypes) come back (see _launch_key). ``workspace`` keeps the
    dequantized tokens' buffer alive as long as the launches that use it."""

    launches: list
    workspace: Any = None

    def launch(self, stream) -> None:
        for ln in self.launches:
            ln.launch(stream)


def dequant_workspace(table: np.ndarray) -> tuple[np.ndarray, int]:
    """W4A4 dequantized first (GemmKernelConfig.dequant_first): where each problem's tokens go once
    dequantized to fp16, as (byte offsets into the workspace, one per problem; the workspace size in
    bytes). Ragged problems share one [rows_total, K] token matrix; the others get [m, K] each, one
    after the other (K % 64 == 0 keeps every start 128-byte aligned)."""
    k = table["k"].astype(np.int64)
    if (table["m"] < 0).any():
        return np.zeros(len(table), dtype=np.int64), int(table["rows_total"][0]) * int(k[0]) * 2
    sizes = table["m"].astype(np.int64) * k * 2
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), int(sizes.sum())


def dequant_tables(table: np.ndarray, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two tables of a W4A4 call whose tokens are dequantized first to device addresses ``addrs``
    (workspace base + dequant_workspace offsets): the one dequant_tokens_kernel reads (c / c_row = the
    problem's workspace rows and their stride in elements) and the one the GEMM kernel reads (a / a_row
    = the same rows as fp16 tokens). Ragged problems share their token matrix: the dequant table then
    has one entry, the whole matrix (m = rows_total from row 0), so that each token row is dequantized
    once, by a grid sized for the matrix rather than one such grid per expert."""
    k = table["k"].astype(np.int64)
    deq, main = table.copy(), table.copy()
    deq["c"], deq["c_row"] = addrs, k
    main["a"], main["a_row"], main["sfa"], main["sfa_row"] = addrs, 2 * k, 0, 0
    if len(deq) and (deq["m"] < 0).any():
        deq = deq[:1].copy()
        deq["m"] = deq["rows_total"]
    return deq, main


def dequant_grid(table: np.ndarray) -> tuple[int, int]:
    """(x, y) grid of dequant_tokens_kernel over a dequant table (dequant_tables: no ragged entries):
    y = one problem each, x enough threads for the largest problem's scale blocks."""
    items = int((table["m"].astype(np.int64) * (table["k"].astype(np.int64) // SCALE_BLOCK)).max())
    return max(1, min(V.ceil_div(items, _DEQUANT_THREADS), 4096)), len(table)


def _prepare(ctx, cp, cfg: GemmKernelConfig, table: np.ndarray, tiles_bound: int, offsets, blocked: bool,
             out_dtype: str) -> _Prepared:
    if tiles_bound == 0 or len(table) == 0:
        return _Prepared([])
    # offsets travel as a raw address (a null pointer when no problem is ragged), so a replayed
    # launch holds no reference to the caller's array
    offs = np.uint64(0 if offsets is None else _ptr(offsets))
    launches, workspace = [], None
    if cfg.dequant_first:
        ws_offsets, nbytes = dequant_workspace(table)
        workspace = cp.empty(max(1, nbytes), dtype=cp.uint8)
        deq_table, table = dequant_tables(table, int(workspace.data.ptr) + ws_offsets)
        dk = _jit.get_kernel(cfg, cfg.DEQUANT_KERNEL, ctx.device_id)
        launches.append(_jit.Launch(dk, dequant_grid(deq_table), _DEQUANT_THREADS, 0,
                                (_device_table(cp, deq_table, ctx.device_id), offs, np.int32(int(blocked)))))
    dev_table = _device_table(cp, table, ctx.device_id)
    kernel = _jit.get_kernel(cfg, cfg.name_expression(), ctx.device_id)
    smem = cfg.smem_bytes(len(table))
    limit = _jit.smem_per_block_optin(ctx.device_id)
    if smem > limit:
        raise ValueError(f"too many products in one call: {len(table)} need {smem} bytes of shared memory, the GPU allows {limit}")
    slots = _jit.sm_count(ctx.device_id) * kernel.resident_blocks_per_sm(cfg.threads, smem)
    grid = min(tiles_bound, slots)
    args = (dev_table, np.int32(len(table)), offs, np.int32(int(blocked)), np.int32(_OUT_CODES[out_dtype]))
    if cfg.arch == "hopper":
        sk_grid = stream_k_grid(cfg, table, tiles_bound, slots)
        partials = counters = None
        if sk_grid:
            grid = sk_grid
            partials = cp.empty(grid * stream_k_slot_floats(cfg) * 2, dtype=cp.float32)
            counters = cp.zeros(tiles_bound, dtype=cp.int32)
            workspace = (workspace, partials, counters)
        args += (np.uint64(0 if partials is None else partials.data.ptr),
                 np.uint64(0 if counters is None else counters.data.ptr))
    # after the token dequant the GEMM goes out programmatically (sm_90+: its prologue overlaps the dequant's
    # tail; it waits in griddepcontrol.wait before reading tokens)
    programmatic = cfg.dequant_first and _jit.device_cc(ctx.device_id) >= (9, 0)
    launches.append(_jit.Launch(kernel, grid, cfg.threads, smem, args, programmatic=programmatic))
    return _Prepared(launches, workspace)


# Host overhead per call matters (GPU MODE times 15 back-to-back calls; a decode step is a few
# GEMMs): validating 8 groups and building their table costs ~0.3 ms of Python (measured on this
# project's CI-class CPU), far more than a small GEMM. A call that passes `out` and arrays already
# seen (same addresses, shapes, strides, dtypes, devices and options) replays the prepared launch.
_LAUNCH_CACHE_SIZE = 128
_launch_cache: collections.OrderedDict = collections.OrderedDict()


def _launch_key(kind: str, arrays: tuple, options: tuple):
    """Cache key of a call, or None when it is not cacheable (no `out`, or non-GPU arguments).
    Host overhead per call (ms-scale calls are timed back to back): ~1 us per operand."""
    key = interop.replay_key(arrays)
    if key is None:
        return None
    return (kind, key, options, os.environ.get(WGMMA_ENV), os.environ.get(STREAM_K_ENV))  # the env vars pick the kernel


def _alpha_key(alpha):
    if alpha is None or isinstance(alpha, (int, float)):
        return alpha
    try:
        return tuple(float(a) for a in alpha)
    except TypeError:
        return None


def _replay(key) -> bool:
    """Run the cached plan of a call on the caller's current stream; False when none is cached."""
    if key is None:
        return False
    with _lock:
        plan = _launch_cache.get(key)
        if plan is not None:
            _launch_cache.move_to_end(key)
    if plan is None:
        return False
    plan.run()
    return True


def _remember(key, plan) -> None:
    # plan is None when an operand had to be copied: such a call is not replayable
    if key is None or plan is None:
        return
    with _lock:
        _launch_cache[key] = plan
        while len(_launch_cache) > _LAUNCH_CACHE_SIZE:
            _launch_cache.popitem(last=False)


class GemmPlan:
    """One validated GEMM launch, replayable with no validation and no host work beyond the launch.

    It reads and writes the same arrays (addresses) every time: refill the inputs in place between
    runs. It holds the device-side problem table, so launches captured in a CUDA graph stay valid for
    as long as the plan lives (keep it with the graph). Made by :func:`plan_group_gemm`,
    :func:`plan_group_gemm_ragged` and :func:`plan_dual_gemm`, which take the arguments of the
    corresponding call (``out`` required) and launch nothing.
    """

    def __init__(self, prepared: _Prepared, device_id: int, torch_in: bool):
        self._prepared = prepared
        self.device_id = device_id
        self._torch_in = torch_in

    def run(self, stream=None) -> None:
        """Launch on ``stream`` (a CuPy stream), else on the caller's current stream (torch's
        current stream when the plan was made from torch tensors)."""
        self._prepared.launch(stream or interop.caller_stream(self.device_id, self._torch_in))


def _checked_plan(plan, out, name):
    if out is None:
        raise ValueError(f"{name}: a plan writes into the caller's `out`, which is required")
    if plan is None:
        raise ValueError(
            f"{name}: an operand is not K-contiguous or not aligned and would be copied at every call; "
            "pass contiguous operands to make a plan"
        )
    return plan


def plan_group_gemm(a, b, sfa, sfb, *, alpha=None, out=None, out_dtype=None, scale_layout="plain") -> GemmPlan:
    """A :class:`GemmPlan` of ``group_gemm(a, b, sfa, sfb, ..., out=out)`` (launches nothing)."""
    _, plan = _group_gemm(a, b, sfa, sfb, alpha, out, out_dtype, scale_layout, launch=False) if out is not None else (None, None)
    return _checked_plan(plan, out, "plan_group_gemm")


def plan_group_gemm_ragged(a, b, sfa, sfb, offsets, *, alpha=None, out=None, out_dtype=None,
                           scale_layout="plain") -> GemmPlan:
    """A :class:`GemmPlan` of ``group_gemm_ragged(...)``; the kernel reads ``offsets`` at every run."""
    _, plan = (_group_gemm_ragged(a, b, sfa, sfb, offsets, alpha, out, out_dtype, scale_layout, launch=False)
               if out is not None else (None, None))
    return _checked_plan(plan, out, "plan_group_gemm_ragged")


def plan_dual_gemm(a, b1, b2, sfa, sfb1, sfb2, *, alpha1=None, alpha2=None, out=None, out_dtype=None,
                   scale_layout="plain") -> GemmPlan:
    """A :class:`GemmPlan` of ``dual_gemm(...)`` (launches nothing)."""
    _, plan = (_dual_gemm(a, b1, b2, sfa, sfb1, sfb2, alpha1, alpha2, out, out_dtype, scale_layout, launch=False)
               if out is not None else (None, None))
    return _checked_plan(plan, out, "plan_dual_gemm")


def _prepare_and_launch(ctx, cp, cfg, table, tiles_bound, offsets, blocked, odt, *, key, copied, launch):
    """The common tail of every GEMM call: prepare the launch, run it (unless only planning), and
    return its GemmPlan (None when an operand was copied: such a call is not replayable), cached
    under ``key`` for later calls with the same arrays."""
    prepared = _prepare(ctx, cp, cfg, table, tiles_bound, offsets, blocked, odt)
    if launch:
        prepared.launch(ctx.stream)
    plan = None if copied else GemmPlan(prepared, ctx.device_id, ctx.torch_in)
    _remember(key, plan)
    return plan


def _materialize(ctx, cp, d):
    """Replace an operand that fails the kernel's layout rules (K-contiguous, 16/4-byte aligned
    rows) with a compliant copy: [L, rows, cols] C-contiguous, viewed back as [rows, cols, L]."""
    if d is None or not d.needs_copy:
        return d
    x = ctx.cupy(d.x)
    if isinstance(d, _Blocked):
        y = cp.ascontiguousarray(x)
        ptr, l_stride = int(y.data.ptr), (int(y.strides[0]) if y.ndim == 6 else 0)
        return _Blocked(d.name, y, d.L, l_stride, ptr, False)
    if x.ndim == 3:
        y = cp.ascontiguousarray(cp.moveaxis(x, 2, 0))
        return _Mat(d.name, y, d.rows, d.cols, d.L, int(y.strides[1]), int(y.strides[0]), int(y.data.ptr), False)
    y = cp.ascontiguousarray(x)
    return _Mat(d.name, y, d.rows, d.cols, 1, int(y.strides[0]), 0, int(y.data.ptr), False)


def _alloc_out(cp, m: int, n: int, L: int, ndim: int, dtype: str):
    """[M, N] or [M, N, L] (an [L, M, N] buffer viewed with L last, as GPU MODE lays it out)."""
    if ndim == 2:
        y = cp.empty((m, n), dtype=V.np_dtype(dtype))
        return y, (int(y.data.ptr), n, 0)
    y = cp.empty((L, m, n), dtype=V.np_dtype(dtype))
    return cp.moveaxis(y, 0, 2), (int(y.data.ptr), n, m * n)


def _out_ptrs(d: _Mat, itemsize: int) -> tuple[int, int, int]:
    return (d.ptr, d.row_stride // itemsize, d.l_stride // itemsize)


def group_gemm(a, b, sfa, sfb, *, alpha=None, out=None, out_dtype=None, scale_layout="plain"):
    """``C_i = alpha_i * (A_i * sfa_i) @ (B_i * sfb_i)^T`` for every group i, in one launch.

    Parameters
    ----------
    a : list of G arrays. W4A4: packed NVFP4 ``uint8`` (or torch ``float4_e2m1fn_x2``) ``[M_i, K_i/2]``;
        W4A16: ``float16`` / ``bfloat16`` ``[M_i, K_i]``. An optional trailing L axis on every operand
        (``[M_i, K_i/2, L_i]``). M_i may be 0. K_i a positive multiple of 64.
    b : list of G packed NVFP4 weights ``[N_i, K_i/2]`` (``[N_i, K_i/2, L_i]``), N_i >= 1.
    sfa : list of G e4m3 scale arrays for A (W4A4), or None (W4A16).
    sfb : list of G e4m3 scale arrays for B. Plain layout: ``[rows, K/16]`` (``[rows, K/16, L]``);
        blocked layout: ``[ceil(rows/128), K/64, 32, 4, 4]`` (``[L, ...]``). e4m3 or uint8 bits.
    alpha : None (1), a number, or G numbers (host values).
    out : optional list of G output arrays ``[M_i, N_i]`` (``[M_i, N_i, L_i]``) with unit stride
        along N, filled in place.
    out_dtype : "float16" (default), "bfloat16" or "float32"; taken from ``out`` when given.
    scale_layout : "plain" or "blocked" (both sfa and sfb).

    Returns
    -------
    The list of G outputs (``out`` itself when given). CuPy in, CuPy out; torch in, torch out.

    Example
    -------
    >>> w = cuflash.quantize(cp.random.randn(4096, 7168, dtype=cp.float32))
    >>> x = cp.random.randn(16, 7168).astype(cp.float16)
    >>> (y,) = cuflash.group_gemm([x], [w.data], None, [w.scales], alpha=float(1 / w.global_scale))
    """
    key = None
    if out is not None:
        key = _launch_key("group", (a, b, sfa, sfb, out), (_alpha_key(alpha), out_dtype, scale_layout))
        if _replay(key):
            return out
    return _group_gemm(a, b, sfa, sfb, alpha, out, out_dtype, scale_layout, key=key)[0]


def _group_gemm(a, b, sfa, sfb, alpha, out, out_dtype, scale_layout, *, key=None, launch=True):
    """Validate, prepare and (if ``launch``) run; returns (result, GemmPlan or None)."""
    prods, tokens, odt = validate_group_gemm(a, b, sfa, sfb, alpha=alpha, out=out, out_dtype=out_dtype,
                                             scale_layout=scale_layout)
    ctx = interop.call_context(a=a, b=b, sfa=sfa, sfb=sfb, out=out)
    cp = _jit.require_gpu()
    blocked = scale_layout == "blocked"
    with ctx.device(), ctx.stream:
        results, out_ptrs = [], []
        itemsize = np.dtype(V.np_dtype(odt)).itemsize
        copied = any(d is not None and d.needs_copy for p in prods for d in [p.a, p.sfa, *p.b, *p.sfb])
        for i, p in enumerate(prods):
            p.a = _materialize(ctx, cp, p.a)
            p.b = [_materialize(ctx, cp, x) for x in p.b]
            p.sfa = _materialize(ctx, cp, p.sfa)
            p.sfb = [_materialize(ctx, cp, x) for x in p.sfb]
            if p.out is not None:
                results.append(out[i])
                out_ptrs.append(_out_ptrs(p.out, itemsize))
            else:
                y, ptrs = _alloc_out(cp, p.m, p.n, p.L, len(a[i].shape), odt)
                results.append(y)
                out_ptrs.append(ptrs)
        table = build_table(prods, [(ptr, row, l * itemsize) for ptr, row, l in out_ptrs])
        rows_hint = max(p.m for p in prods)
        shapes = [(p.m, p.n, p.k) for p in prods for _ in range(p.L)]  # one per table record
        cfg = choose_config(tokens, False, rows_hint, launch_arch(ctx.device_id, False, rows_hint),
                            shapes=shapes, sms=_jit.sm_count(ctx.device_id))
        tiles = tile_count([m for m, _, _ in shapes], [n for _, n, _ in shapes], cfg.block_m, cfg.block_n)
        plan = _prepare_and_launch(ctx, cp, cfg, table, tiles, None, blocked, odt, key=key, copied=copied,
                                   launch=launch)
        return (out if out is not None else ctx.to_caller(results)), plan


def group_gemm_ragged(a, b, sfa, sfb, offsets, *, alpha=None, out=None, out_dtype=None, scale_layout="plain"):
    """The MoE layout in one launch: rows ``offsets[g] : offsets[g+1]`` of ``a`` times expert g of ``b``.

    Parameters
    ----------
    a : ``[total_M, K/2]`` packed NVFP4 (W4A4) or ``[total_M, K]`` fp16/bf16 (W4A16), rows grouped by
        expert.
    b : ``[G, N, K/2]`` packed NVFP4 experts.
    sfa : plain ``[total_M, K/16]`` or blocked ``[ceil(total_M/128), K/64, 32, 4, 4]`` (W4A4), or None.
    sfb : plain ``[G, N, K/16]`` or blocked ``[G, ceil(N/128), K/64, 32, 4, 4]``.
    offsets : int32 ``[G + 1]`` on the device, non-decreasing, within ``[0, total_M]`` (read only by
        the kernel, never by the host; values outside are clamped). Groups of 0 rows are fine.
    alpha : None, a number, or G numbers.
    out : optional ``[total_M, N]`` output. Rows outside ``offsets[0] : offsets[G]`` are left as
        they are (zero in a freshly allocated output).

    Returns ``[total_M, N]`` (fp16 unless out_dtype/out says otherwise).
    """
    key = None
    if out is not None:
        key = _launch_key("ragged", (a, b, sfa, sfb, offsets, out), (_alpha_key(alpha), out_dtype, scale_layout))
        if _replay(key):
            return out
    return _group_gemm_ragged(a, b, sfa, sfb, offsets, alpha, out, out_dtype, scale_layout, key=key)[0]


def _group_gemm_ragged(a, b, sfa, sfb, offsets, alpha, out, out_dtype, scale_layout, *, key=None, launch=True):
    rg, tokens, odt = validate_group_gemm_ragged(a, b, sfa, sfb, offsets, alpha=alpha, out=out,
                                                 out_dtype=out_dtype, scale_layout=scale_layout)
    ctx = interop.call_context(a=a, b=b, sfa=sfa, sfb=sfb, offsets=offsets, out=out)
    cp = _jit.require_gpu()
    blocked = scale_layout == "blocked"
    with ctx.device(), ctx.stream:
        copied = any(d is not None and d.needs_copy for d in (rg.a, rg.sfa, rg.b, rg.sfb))
        rg.a = _materialize(ctx, cp, rg.a)
        rg.sfa = _materialize(ctx, cp, rg.sfa)
        if rg.b.needs_copy:
            bc = cp.ascontiguousarray(ctx.cupy(b))
            rg.b = _Mat("b", bc, rg.n, rg.k // 2, 1, rg.k // 2, 0, int(bc.data.ptr), False)
            rg.b_group_stride = int(bc.strides[0])
        if rg.sfb.needs_copy:
            sc = cp.ascontiguousarray(ctx.cupy(sfb))
            rg.sfb_group_stride = int(sc.strides[0])
            if blocked:
                rg.sfb = _Blocked("sfb", sc, rg.groups, rg.sfb_group_stride, int(sc.data.ptr), False)
            else:
                rg.sfb = _Mat("sfb", sc, rg.n, rg.k // SCALE_BLOCK, 1, int(sc.strides[1]), 0, int(sc.data.ptr), False)
        itemsize = np.dtype(V.np_dtype(odt)).itemsize
        if out is None:
            y = cp.zeros((rg.total_m, rg.n), dtype=V.np_dtype(odt))
            optr, orow = int(y.data.ptr), rg.n
        else:
            y = out
            optr, orow = rg.out.ptr, rg.out.row_stride // itemsize
        table = build_ragged_table(rg, optr, orow)
        rows_hint = V.ceil_div(rg.total_m, rg.groups)
        cfg = choose_config(tokens, False, rows_hint, launch_arch(ctx.device_id, False, rows_hint, ragged=True))
        bound = ragged_tile_bound(rg.total_m, rg.groups, rg.n, cfg.block_m, cfg.block_n)
        plan = _prepare_and_launch(ctx, cp, cfg, table, bound, offsets, blocked, odt, key=key, copied=copied,
                                   launch=launch)
        return (out if out is not None else ctx.to_caller(y)), plan


def dual_gemm(a, b1, b2, sfa, sfb1, sfb2, *, alpha1=None, alpha2=None, out=None, out_dtype=None, scale_layout="plain"):
    """``C = silu(alpha1 * A @ B1^T) * (alpha2 * A @ B2^T)``, fused: A read once, both products
    accumulated in fp32 in one kernel (the SwiGLU MLP's gate and up projections).

    Parameters
    ----------
    a : ``[M, K/2]`` packed NVFP4 with ``sfa`` (W4A4) or ``[M, K]`` fp16/bf16 with ``sfa=None``
        (W4A16); optional trailing L axis on every operand.
    b1, b2 : ``[N, K/2]`` packed NVFP4 (gate and up weights) with scales ``sfb1``, ``sfb2``.
    alpha1, alpha2 : None (1) or numbers.
    out : optional ``[M, N]`` (``[M, N, L]``) output, unit stride along N.

    Returns ``[M, N]`` (``[M, N, L]``), fp16 unless out_dtype/out says otherwise.
    """
    key = None
    if out is not None:
        key = _launch_key("dual", (a, b1, b2, sfa, sfb1, sfb2, out),
                          (_alpha_key(alpha1), _alpha_key(alpha2), out_dtype, scale_layout))
        if _replay(key):
            return out
    return _dual_gemm(a, b1, b2, sfa, sfb1, sfb2, alpha1, alpha2, out, out_dtype, scale_layout, key=key)[0]


def _dual_gemm(a, b1, b2, sfa, sfb1, sfb2, alpha1, alpha2, out, out_dtype, scale_layout, *, key=None, launch=True):
    prod, tokens, odt = validate_dual_gemm(a, b1, b2, sfa, sfb1, sfb2, alpha1=alpha1, alpha2=alpha2, out=out,
                                           out_dtype=out_dtype, scale_layout=scale_layout)
    ctx = interop.call_context(a=a, b1=b1, b2=b2, sfa=sfa, sfb1=sfb1, sfb2=sfb2, out=out)
    cp = _jit.require_gpu()
    blocked = scale_layout == "blocked"
    with ctx.device(), ctx.stream:
        copied = any(d is not None and d.needs_copy for d in [prod.a, prod.sfa, *prod.b, *prod.sfb])
        prod.a = _materialize(ctx, cp, prod.a)
        prod.b = [_materialize(ctx, cp, x) for x in prod.b]
        prod.sfa = _materialize(ctx, cp, prod.sfa)
        prod.sfb = [_materialize(ctx, cp, x) for x in prod.sfb]
        itemsize = np.dtype(V.np_dtype(odt)).itemsize
        if out is not None:
            y = out
            ptrs = _out_ptrs(prod.out, itemsize)
        else:
            y, ptrs = _alloc_out(cp, prod.m, prod.n, prod.L, len(a.shape), odt)
        table = build_table([prod], [(ptrs[0], ptrs[1], ptrs[2] * itemsize)])
        cfg = choose_config(tokens, True, prod.m, launch_arch(ctx.device_id, True, prod.m))
        tiles = tile_count([prod.m] * prod.L, [prod.n] * prod.L, cfg.block_m, cfg.block_n)
        plan = _prepare_and_launch(ctx, cp, cfg, table, tiles, None, blocked, odt, key=key, copied=copied,
                                   launch=launch)
        return (out if out is not None else ctx.to_caller(y)), plan
