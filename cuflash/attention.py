"""Paged KV cache and paged causal attention (prefill, chunked prefill, decode, mixed batches, GQA/MQA).

Layouts (C-contiguous, one GPU):

- ``k_pages`` / ``v_pages`` of one layer: ``[num_pages, page_size, kv_heads, head_dim]`` (NHD), float16
  or bfloat16 (a :class:`PagedKVCache` holds ``[num_layers, num_pages, ...]``; ``k_pages[i]`` is layer i's);
- ``block_table``: int32 ``[batch, max_pages_per_seq]``; entry ``p`` of row ``b`` is the page holding
  keys ``p * page_size .. (p + 1) * page_size - 1`` of sequence ``b`` (any page size >= 1, any order);
  one table serves every layer (a page id names the same slots in each layer's pool);
- ``kv_lens``: int32 ``[batch]``, keys in the cache per sequence, new tokens included once appended;
- ``q``: ragged ``[total_q, heads, head_dim]``, ``q_indptr`` int32 ``[batch + 1]`` marks each sequence's
  queries (None: one query per sequence, i.e. decode); ``heads`` a multiple of ``kv_heads``;
- ``out``: ``[total_q, heads, head_dim]`` in q's dtype; ``lse``: float32 ``[total_q, heads]``, natural log.

Causal masks align to the bottom-right corner: query ``i`` of a sequence with ``q_len`` queries sits at
position ``kv_len - q_len + i``. A row that sees no key gives output 0 and LSE -inf.

Host metadata (which CTA does which rows, split-KV counts, workspaces) lives in an :class:`AttentionPlan`
built once per batch shape; :meth:`AttentionPlan.run` does no host sync and, given ``out`` (and ``lse``),
no allocation, so a decode step can be captured in a CUDA graph and replayed with new lengths (the
kernels read ``kv_lens`` and the block table from device memory at every launch).

Cache bookkeeping (host only, :class:`KVPageTable`, tested on the CPU): one allocator for all layers.
Per sequence it tracks the positions that have pages (``reserved``) and the tokens written into each
layer (``length(s, layer)``). An append places a layer's tokens after that layer's own length and
reserves only positions past ``reserved``, so a step's tokens are reserved once and counted once per
layer whichever way the calls go: ``reserve`` then per-layer appends, per-layer appends alone (the
first reserves), or one all-layer ``advance(..., layer=None)``. Errors (capacity, unknown sequences,
layers out of step) change nothing.

Serving loops use a :class:`PagedBatch` (``cache.batch(seq_ids, q_lens, num_heads=...)``): fixed device
block table / lengths / q_indptr buffers and an AttentionPlan sized for ``max_kv_len``. Per step,
``batch.step()`` does the host bookkeeping for all layers and copies the new table and lengths into
those buffers (outside any capture); ``batch.append(layer, k, v)`` and ``batch.attention(layer, q,
out=out)`` then launch with no host sync and no allocation, so a whole multi-layer decode step can be
captured once and replayed after each ``step()``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import _jit, _validate as V
from . import interop

HEAD_DIMS = (64, 128, 256)
DTYPES = ("float16", "bfloat16")
_CUDA_TYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
_ELEM_BYTES = 2

MMA_M = 16  # rows of one mma tile: each warp owns 16 (query, head-in-group) rows
SMEM_PAD = 8  # elements appended to each shared-memory row (cuda_src/attention.cu, kSmemPad)
MERGE_PAD = 8  # floats appended to each row of the split-keys warp merge (attention.cu kMergeStride)
COPY_BYTES = 16  # one vector copy
WORK_FIELDS = 3  # work item: (sequence, row tile, first partial row)
H100_SMEM_PER_BLOCK = 227 * 1024  # opt-in dynamic shared memory limit per block on sm_90
SM86_SMEM_PER_BLOCK = 99 * 1024  # the same on sm_86 / sm_89 (CI compiles the variants that fit there too)
MAX_SPLITS = 128  # split-KV count cap (choose_num_splits searches up to it)
SPLIT_OVERHEAD_TILES = 2  # cost of one split in key tiles: prologue latency, partial write, merge read
# More splits must beat the best fewer by 5%: the model cannot see the partials' traffic, and H100
# S=16384 prefill took 2 splits for a 0.05% predicted gain (4096 CTAs: 4158 against 4160 tile-times).
SPLIT_MIN_GAIN = 0.95
APPEND_THREADS = 128
CHECK_THREADS = 256
CHECK_BLOCKS = 128


# ----------------------------------------------------------------------------------------------
# Kernel configs and tile heuristics
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig(_jit.KernelConfig):
    """One variant of the attention kernel family (cuda_src/attention.cu).

    dtype: "float16" or "bfloat16"; head_dim: 64, 128 or 256; block_n: keys per tile; warps: warps per
    CTA (the CTA takes 16 * warps packed (query, head) rows); stages: K/V tiles in the cp.async pipeline;
    split_keys: the warps share 16 rows and split each key tile instead (decode), merging at the end;
    wgmma: the Hopper (sm_90a) warp-specialized kernel instead (128 rows, 3 warpgroups; ``warps`` unused).
    The module also holds the append kernel and the table check.
    """

    dtype: str = "float16"
    head_dim: int = 128
    block_n: int = 64
    warps: int = 4
    stages: int = 2
    split_keys: bool = False
    wgmma: bool = False
    source = "attention.cu"

    @property
    def family(self) -> str:
        return _jit.ARCH_HOPPER if self.wgmma else _jit.ARCH_PORTABLE

    @property
    def block_m(self) -> int:
        if self.wgmma:
            return WGMMA_BLOCK_M
        return MMA_M if self.split_keys else MMA_M * self.warps

    @property
    def threads(self) -> int:
        return WGMMA_THREADS if self.wgmma else 32 * self.warps

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory (the layouts are described in attention.cu). mma.sync kernel: Q tile plus
        kStages K and V tiles, rows padded, or the split-keys merge buffers (fp32 [warps, 16, head_dim +
        MERGE_PAD], row maxima and sums) or the split merge's scratch (merge_bytes) where larger. wgmma
        kernel (WsLayout): 1024 bytes of alignment slack, kStages swizzled K and V tiles (the split merge
        reuses them), a full and an empty mbarrier per stage."""
        if self.wgmma:
            ring = self.stages * 2 * self.block_n * self.head_dim * _ELEM_BYTES
            assert ring >= self.merge_bytes
            return 1024 + ring + 2 * self.stages * 8
        tiles = (self.block_m + 2 * self.stages * self.block_n) * (self.head_dim + SMEM_PAD) * _ELEM_BYTES
        merge = self.warps * MMA_M * (self.head_dim + MERGE_PAD + 2) * 4 if self.split_keys else 0
        return max(tiles, merge, self.merge_bytes)

    @property
    def merge_bytes(self) -> int:
        """Shared memory of the fused split merge (attention.cu Outputs::merge_splits): one flag."""
        return 16

    def attention_kernel(self, splits: bool = True) -> str:
        """The kernel for launches with several KV splits (``splits``) or one; only the wgmma kernel has a
        variant without the split merge."""
        t = _CUDA_TYPE[self.dtype]
        if self.wgmma:
            merge = "true" if splits else "false"
            return (f"cuflash::attn::paged_attention_wgmma_kernel<{t}, {self.head_dim}, {self.block_n}, {self.stages}, "
                    f"{merge}>")
        split = "true" if self.split_keys else "false"
        return (f"cuflash::attn::paged_attention_kernel<{t}, {self.head_dim}, {self.block_n}, {self.warps}, "
                f"{self.stages}, {split}>")

    APPEND_KERNEL = "cuflash::attn::paged_kv_append_kernel"
    CHECK_KERNEL = "cuflash::attn::paged_table_check_kernel"

    def name_expressions(self) -> tuple[str, ...]:
        kernels = (self.attention_kernel(True), self.attention_kernel(False)) if self.wgmma else (self.attention_kernel(),)
        return (*kernels, self.APPEND_KERNEL, self.CHECK_KERNEL)

    def kernel_name(self) -> str:
        if self.wgmma:
            return f"paged_attention_wgmma_{self.dtype}_d{self.head_dim}_n{self.block_n}_s{self.stages}"
        keys = "_splitkeys" if self.split_keys else ""
        return f"paged_attention_{self.dtype}_d{self.head_dim}_n{self.block_n}_w{self.warps}_s{self.stages}{keys}"


WGMMA_BLOCK_M = 128  # attention.cu kWsBlockM: two consumer warpgroups of 64 rows
WGMMA_THREADS = 384  # attention.cu kWsThreads: a producer and two consumer warpgroups
WGMMA_HEAD_DIMS = (64, 128)  # d256's two 64 x 256 fp32 accumulators would not fit the consumers' registers
WGMMA_ENV = "CUFLASH_ATTN_WGMMA"


def use_wgmma(device_id: int) -> bool:
    """Whether prefill takes the wgmma kernel on this device: compute capability 9.0 (sm_90a), unless
    ``CUFLASH_ATTN_WGMMA=0``."""
    return os.environ.get(WGMMA_ENV) != "0" and _jit.device_cc(device_id) == (9, 0)


ROLES = ("prefill", "narrow", "decode")


def tile_config(dtype: str, head_dim: int, role: str, max_smem: int = H100_SMEM_PER_BLOCK,
                hopper: bool = False) -> AttentionConfig:
    """The kernel variant for sequences of one role, a pure function of its arguments.

    role "decode": sequences of at most 16 packed rows (q_len * group), e.g. one query of a GQA group
    of up to 16 heads; role "narrow": up to 64 rows (one 4-warp tile); role "prefill": the rest.
    ``max_smem`` is the device's opt-in shared memory per block; ``hopper``: the device runs sm_90a code
    (prefill then takes the wgmma kernel where the head dim allows).
    """
    if role not in ROLES:
        raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
    if hopper and role == "prefill" and head_dim in WGMMA_HEAD_DIMS:
        # 128 x 128 tiles. A slot goes back only after P V of its tile, while the consumers already wait
        # for the next tile's K: three slots keep one tile of copies ahead (192 KB at d128), four at d64.
        cfg = AttentionConfig(dtype, head_dim, block_n=128, stages=3 if head_dim == 128 else 4, wgmma=True)
        if cfg.smem_bytes <= max_smem:
            return cfg
    split_keys = False
    if role == "decode":
        # The warps split each key tile (16 keys each) over the same 16 rows: with one row tile per
        # warp, one warp did all the tensor work of a decode CTA (H100, B=1 S=32768: 76 us, 1.76 TB/s).
        # d <= 128: 8 warps, 128-key tiles, 3 stages (213 KB at d128, one CTA per SM, 64 KB of K/V in
        # flight per tile) led an H100 sweep of block_n 32-128, 2-8 warps, 2-6 stages, 1-64 splits on
        # every decode case of bench_attention (B=1 S=32768 1.94 TB/s against 1.89 for 4 warps, 64-key
        # tiles, 2 stages; B=16 S=8192 2.61 against 2.56; B=64 S=4096 2.72 against 2.69; GPU time behind the
        # benchmark's write flush).
        # Where it does not fit (sm_86/89), and at d64 (unmeasured; 8 warps would also copy more Q rows
        # per pass than the CTA has), 4 warps of 64-key tiles. d256: 2 warps of 32-key tiles.
        split_keys = True
        if head_dim == 128:
            cfg = AttentionConfig(dtype, head_dim, 128, 8, 3, split_keys)
            if cfg.smem_bytes <= max_smem:
                return cfg
        warps, stages = (4 if head_dim <= 128 else 2), 2
    elif role == "narrow":
        # 4 warps = 64 rows: one CTA holds every query head of a group (group <= 64) of one decode query
        # (or a few queries); only warps holding rows compute, all four stream K/V. Two stages keep
        # smem at 87 KB (d128) so two CTAs share an SM.
        warps, stages = 4, 2
    elif head_dim <= 128:
        # 8 warps = 128-row tiles halve K/V smem traffic per row against 64-row tiles; ptxas 13.0
        # (sm_90a) reports 170 registers at d128 and 128 at d64, no spills.
        warps, stages = 8, 2
    else:
        # d256: the fp32 output accumulator alone is 128 registers per thread (ptxas: 243, no
        # spills); 4 warps keep the Q tile at 33 KB.
        warps, stages = 4, 2
    # 64-key tiles at d <= 128; d256 halves them so a K+V stage stays at 33 KB.
    block_n = 64 if head_dim <= 128 else 32
    cfg = AttentionConfig(dtype, head_dim, block_n, warps, stages, split_keys)
    # Smaller parts (sm_86/89 allow 99 KB per block): shrink key tiles until the variant fits.
    min_block_n = MMA_M * warps if split_keys else MMA_M
    while cfg.smem_bytes > max_smem and cfg.block_n > min_block_n:
        cfg = AttentionConfig(dtype, head_dim, cfg.block_n // 2, warps, stages, split_keys)
    if cfg.smem_bytes > max_smem:
        raise _jit.CuflashUnavailableError(
            f"{cfg.kernel_name()} needs {cfg.smem_bytes} bytes of shared memory per block, the device allows {max_smem}"
        )
    return cfg


def kernel_variants() -> list[AttentionConfig]:
    """Every attention config the heuristics can pick (CI compiles them all: sm_80 and sm_90, sm_90a for
    the wgmma ones)."""
    out = []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for role in ROLES:
                for limit, hopper in ((H100_SMEM_PER_BLOCK, True), (H100_SMEM_PER_BLOCK, False),
                                      (SM86_SMEM_PER_BLOCK, False)):
                    c = tile_config(dtype, d, role, limit, hopper)
                    if c not in out:
                        out.append(c)
    return out


def choose_num_splits(n_ctas: int, max_tiles: int, slots: int) -> int:
    """Split-KV count for a launch of ``n_ctas`` CTAs (before splitting) whose longest CTA walks
    ``max_tiles`` key tiles, on a GPU holding ``slots`` CTAs at once (SMs x CTAs per SM).

    Cost model: time ~ waves x per-CTA time = ceil(n_ctas * S / slots) * (ceil(max_tiles / S) +
    SPLIT_OVERHEAD_TILES); a larger S wins only below SPLIT_MIN_GAIN times the best cost so far. B=1, 8 kv heads, 32k keys on 264 slots
    gives 32 splits (256 CTAs, one wave); 128 CTAs of 128 tiles give 2 (a third split would start a second
    wave); 512 CTAs give 1.
    """
    if n_ctas <= 0 or max_tiles <= 1:
        return 1
    best, best_cost = 1, None
    for s in range(1, min(MAX_SPLITS, max_tiles) + 1):
        cost = math.ceil(n_ctas * s / slots) * (math.ceil(max_tiles / s) + SPLIT_OVERHEAD_TILES)
        if best_cost is None or cost < SPLIT_MIN_GAIN * best_cost:
            best, best_cost = s, cost
    return best


# ----------------------------------------------------------------------------------------------
# Work partition (pure host code)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchSpec:
    """One attention launch of a plan: sequences of one role.

    work: int32 [n_items, 3] (sequence, row tile, first partial row); grid (n_items, kv_heads, num_splits).
    part_qrow: int32 [n_part_rows], the global query row of each partial row (used when num_splits > 1).
    """

    role: str
    config: AttentionConfig
    work: np.ndarray
    num_splits: int
    part_qrow: np.ndarray

    @property
    def n_part_rows(self) -> int:
        return int(self.part_qrow.shape[0])


def identity_work(spec: LaunchSpec, batch: int) -> bool:
    """Whether a launch's work list is item b = (sequence b, row tile 0, partial row b) for every sequence
    of the batch, in any order: the kernel can then run without it (attention.cu load_work_item)."""
    w = spec.work
    return (spec.role == "decode" and w.shape[0] == batch and bool(np.array_equal(np.sort(w[:, 0]), np.arange(batch)))
            and not w[:, 1].any() and bool(np.array_equal(w[:, 2], w[:, 0])))


_NULL = np.uint64(0)  # a null pointer kernel argument


def visible_keys(q_len: int, kv_len: int, last_query: int, causal: bool) -> int:
    """Keys query ``last_query`` (0-based among q_len) of a sequence can see (the mask rule)."""
    last = kv_len - q_len + last_query if causal else kv_len - 1
    return max(0, min(last, kv_len - 1) + 1)


def partition(q_lens, kv_lens, *, group: int, num_kv_heads: int, dtype: str, head_dim: int, causal: bool,
              slots_of, max_smem: int = H100_SMEM_PER_BLOCK, hopper: bool = False) -> list[LaunchSpec]:
    """Split a batch into launches (decode-like and prefill sequences) and work items.

    q_lens, kv_lens: host int arrays [batch] (kv_lens: the lengths to plan for); ``slots_of(config)``
    gives the CTAs the GPU holds at once for a config; ``hopper``: see :func:`tile_config`. Sequences
    with no query get no work.
    """
    q_lens = np.asarray(q_lens, dtype=np.int64)
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    q_starts = np.concatenate([[0], np.cumsum(q_lens)])
    configs = {role: tile_config(dtype, head_dim, role, max_smem, hopper) for role in ROLES}
    rows = q_lens * group
    decode_rows, narrow_rows = configs["decode"].block_m, configs["narrow"].block_m
    members = {"decode": (rows > 0) & (rows <= decode_rows), "narrow": (rows > decode_rows) & (rows <= narrow_rows),
               "prefill": rows > narrow_rows}
    specs = []
    for role in ROLES:
        cfg = configs[role]
        seqs = np.flatnonzero(members[role])
        if seqs.size == 0:
            continue
        items, part_qrow, keys_of_item = [], [], []
        for b in seqs:
            base = len(part_qrow)
            part_qrow.extend(range(int(q_starts[b]), int(q_starts[b + 1])))
            for m in range(-(-int(rows[b]) // cfg.block_m)):
                last_row = min((m + 1) * cfg.block_m, int(rows[b])) - 1
                items.append((int(b), m, base))
                keys_of_item.append(visible_keys(int(q_lens[b]), int(kv_lens[b]), last_row // group, causal))
        # Longest first: causal prefill tiles differ in work, and the last wave then holds short ones.
        order = sorted(range(len(items)), key=lambda i: -keys_of_item[i])
        work = np.array([items[i] for i in order], dtype=np.int32).reshape(-1, WORK_FIELDS)
        max_tiles = -(-max(keys_of_item) // cfg.block_n)
        splits = choose_num_splits(len(items) * num_kv_heads, max_tiles, slots_of(cfg))
        specs.append(LaunchSpec(role, cfg, work, splits, np.array(part_qrow, dtype=np.int32)))
    return specs


# ----------------------------------------------------------------------------------------------
# Validation (host only, before any launch)
# ----------------------------------------------------------------------------------------------


def _check_float_dtype(name, x, want=None) -> str:
    dt = V.check_dtype(name, x, DTYPES)
    if want is not None and dt != want:
        raise TypeError(f"{name}: expected dtype {want} (the same as q / the cache), got {dt}")
    return dt


def _check_int32(name, x, ndim: int) -> None:
    V.check_dtype(name, x, ("int32",))
    V.check_ndim(name, x, (ndim,))


def _check_contiguous(name, x) -> None:
    ok = x.is_contiguous() if interop.is_torch_tensor(x) else bool(x.flags.c_contiguous)
    if not ok:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {tuple(x.stride() if interop.is_torch_tensor(x) else x.strides)}")


def _check_pools(k_pages, v_pages, dtype=None) -> tuple[str, int, int, int, int]:
    """(dtype, num_pages, page_size, kv_heads, head_dim) of matching page pools."""
    dt = _check_float_dtype("k_pages", k_pages, dtype)
    _check_float_dtype("v_pages", v_pages, dt)
    V.check_ndim("k_pages", k_pages, (4,))
    shape = V.shape_of(k_pages)
    V.check_shape("v_pages", v_pages, shape)
    num_pages, page_size, kv_heads, head_dim = shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"k_pages: expected head_dim in {HEAD_DIMS}, got {head_dim}")
    if page_size < 1 or num_pages < 1 or kv_heads < 1:
        raise ValueError(f"k_pages: expected [num_pages >= 1, page_size >= 1, kv_heads >= 1, head_dim], got {shape}")
    _check_contiguous("k_pages", k_pages)
    _check_contiguous("v_pages", v_pages)
    return dt, num_pages, page_size, kv_heads, head_dim


def _check_indptr(name: str, indptr: np.ndarray, batch: int) -> np.ndarray:
    if indptr.shape != (batch + 1,):
        raise ValueError(f"{name}: expected shape ({batch + 1},) (batch + 1), got {indptr.shape}")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name}: expected non-decreasing offsets starting at 0, got {indptr.tolist()[:16]}")
    return np.diff(indptr)


def _check_lengths(kv_lens: np.ndarray, new_lens: np.ndarray | None, table_stride: int, page_size: int,
                   what: str = "kv_lens") -> None:
    if np.any(kv_lens < 0):
        b = int(np.flatnonzero(kv_lens < 0)[0])
        raise ValueError(f"{what}[{b}]: expected a length >= 0, got {int(kv_lens[b])}")
    cap = table_stride * page_size
    if np.any(kv_lens > cap):
        b = int(np.flatnonzero(kv_lens > cap)[0])
        raise ValueError(
            f"{what}[{b}]: {int(kv_lens[b])} keys do not fit the sequence's pages "
            f"(block_table has {table_stride} pages of {page_size} per sequence = {cap} keys)"
        )
    if new_lens is not None and np.any(new_lens > kv_lens):
        b = int(np.flatnonzero(new_lens > kv_lens)[0])
        raise ValueError(
            f"{what}[{b}]: the lengths include the appended tokens, so expected >= {int(new_lens[b])} "
            f"(tokens appended to sequence {b}), got {int(kv_lens[b])}"
        )


def _host_int(name: str, x) -> np.ndarray:
    """Host int64 copy of a small metadata array (a device array costs one sync)."""
    if x is None:
        return None
    if hasattr(x, "dtype") and V.dtype_name(x) not in ("int32", "int64"):
        raise TypeError(f"{name}: expected int32, got {V.dtype_name(x)}")
    if interop.is_torch_tensor(x):
        x = x.detach().cpu().numpy()
    elif interop.is_cupy_array(x):
        x = x.get()
    return np.asarray(x, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Plan and run
# ----------------------------------------------------------------------------------------------


def _start(launches, stream) -> None:
    """Launch each _jit.Launch in order on ``stream``."""
    for ln in launches:
        ln.launch(stream)


class AttentionPlan:
    """Host metadata of one batch shape: the work partition, split counts and workspaces.

    Parameters
    ----------
    q_indptr : int [batch + 1] (host or device; a device array costs one sync here, never at run) or
        None for decode (one query per sequence).
    kv_lens : int [batch], the lengths to plan for (split counts are sized from them; the kernels read
        the actual lengths from the ``kv_lens`` passed to :meth:`run`, so any later lengths that fit
        the block table stay correct, e.g. in CUDA-graph replays). ``max_kv_len`` (an int) may stand in
        for it: every sequence is planned at that length.
    num_heads, num_kv_heads, head_dim, page_size, dtype : the shapes of q and the pools.
    max_pages_per_seq : block_table columns; when given, the lengths are checked to fit.
    causal, softmax_scale : the attention (scale defaults to 1 / sqrt(head_dim)).
    device : GPU id (default: the current device).

    Example
    -------
    >>> plan = AttentionPlan(None, kv_lens=None, max_kv_len=4096, batch=8, num_heads=32, num_kv_heads=8,
    ...                      head_dim=128, page_size=16, dtype="float16")          # doctest: +SKIP
    >>> out = plan.run(q, k_pages, v_pages, block_table, kv_lens_gpu, out=out)   # doctest: +SKIP
    """

    def __init__(self, q_indptr, kv_lens=None, *, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: str = "float16", causal: bool = True, softmax_scale: float | None = None,
                 max_kv_len: int | None = None, batch: int | None = None, max_pages_per_seq: int | None = None,
                 device: int | None = None):
        if dtype not in DTYPES:
            raise TypeError(f"dtype: expected one of {DTYPES}, got {dtype}")
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {head_dim}")
        if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads: expected a positive multiple of num_kv_heads ({num_kv_heads}) for GQA, got {num_heads}"
            )
        if page_size < 1:
            raise ValueError(f"page_size: expected >= 1, got {page_size}")
        kv = _host_int("kv_lens", kv_lens)
        if kv is None:
            if max_kv_len is None or batch is None:
                raise ValueError("kv_lens: expected the lengths, or max_kv_len and batch, got neither")
            kv = np.full(int(batch), int(max_kv_len), dtype=np.int64)
        elif max_kv_len is not None:
            kv = np.maximum(kv, int(max_kv_len))
        if kv.ndim != 1:
            raise ValueError(f"kv_lens: expected shape (batch,), got {kv.shape}")
        self.batch = int(kv.shape[0])
        indptr = np.arange(self.batch + 1) if q_indptr is None else _host_int("q_indptr", q_indptr)
        q_lens = _check_indptr("q_indptr", indptr, self.batch)
        _check_lengths(kv, None, max_pages_per_seq if max_pages_per_seq is not None else 2**31 // page_size, page_size)
        self.decode_only = q_indptr is None
        self.total_q = int(indptr[-1])
        self.num_heads, self.num_kv_heads, self.head_dim = int(num_heads), int(num_kv_heads), int(head_dim)
        self.group = self.num_heads // self.num_kv_heads
        self.page_size, self.dtype, self.causal = int(page_size), dtype, bool(causal)
        self.softmax_scale = float(1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale)
        self.max_kv_len = int(kv.max(initial=0))

        cp = _jit.require_gpu()
        self.device_id = int(cp.cuda.Device().id if device is None else device)
        max_smem = _jit.smem_per_block_optin(self.device_id)

        def slots_of(cfg):  # CTAs the whole GPU holds at once (the driver's occupancy calculator)
            k = _jit.get_kernel(cfg, cfg.attention_kernel(), self.device_id)
            return _jit.sm_count(self.device_id) * k.resident_blocks_per_sm(cfg.threads, cfg.smem_bytes)

        self.launches = partition(q_lens, kv, group=self.group, num_kv_heads=self.num_kv_heads, dtype=dtype,
                                  head_dim=self.head_dim, causal=self.causal, slots_of=slots_of, max_smem=max_smem,
                                  hopper=use_wgmma(self.device_id))
        with cp.cuda.Device(self.device_id):
            self._q_indptr = cp.asarray(indptr.astype(np.int32))
            # A decode-only plan's decode launch, one item per sequence, runs without its work list
            # (attention.cu load_work_item, work == nullptr): its first K/V copies then wait on one
            # dependent load (kv_lens) before the block table instead of three.
            self._work = [None if self.decode_only and identity_work(s, self.batch) else cp.asarray(s.work)
                          for s in self.launches]
            self._o_part, self._lse_part, self._counters = [], [], []
            for s in self.launches:
                n = s.n_part_rows if s.num_splits > 1 else 0
                self._o_part.append(cp.empty((max(1, s.num_splits * n * self.num_heads * self.head_dim),), cp.float32))
                self._lse_part.append(cp.empty((max(1, s.num_splits * n * self.num_heads),), cp.float32))
                # splits done per (work item, kv head); the last one to finish merges and puts it back to 0
                self._counters.append(cp.zeros((max(1, s.work.shape[0] * self.num_kv_heads),), cp.int32))
            self._lse_scratch = cp.empty((max(1, self.total_q), self.num_heads), cp.float32)
        self._kernels = [_jit.get_kernel(s.config, s.config.attention_kernel(s.num_splits > 1), self.device_id)
                         for s in self.launches]
        self._replay_key = None  # the last run's arrays (see run)
        self._replay_args = None

    def __repr__(self):
        parts = ", ".join(f"{s.role}: {s.work.shape[0]} items x {s.num_splits} splits ({s.config.kernel_name()})"
                          for s in self.launches)
        return f"AttentionPlan(batch={self.batch}, total_q={self.total_q}, {parts})"

    def run(self, q, k_pages, v_pages, block_table, kv_lens, *, out=None, lse=None, return_lse: bool = False,
            check_tables: bool = False):
        """Attention over the paged cache (see the module docstring for layouts).

        No host sync and, with ``out`` given (and ``lse`` when ``return_lse``), no allocation.
        ``check_tables=True`` first checks on the device that every length fits the table and every page
        id a sequence uses lies in [0, num_pages) (one sync; not for graph capture).
        Returns ``out``, or ``(out, lse)`` when ``return_lse``.

        A run with ``out`` given and the same arrays as the plan's previous run (same addresses, shapes,
        strides, dtypes: a decode loop refilling q and the lengths in place) skips the validation, which
        that run did, and only launches (host time per call ~80 -> ~20 us on the bench's machine).
        """
        key = None
        if out is not None and (lse is not None or not return_lse) and not check_tables:
            key = interop.replay_key((q, k_pages, v_pages, block_table, kv_lens, out, lse))
            if key is not None and key == self._replay_key:
                self._replay()
                return (out, lse) if return_lse else out
        ctx = interop.call_context(q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table, kv_lens=kv_lens,
                                   out=out, lse=lse)
        if ctx.device_id != self.device_id:
            raise ValueError(f"q: the plan was made for GPU {self.device_id}, the arrays live on GPU {ctx.device_id}")
        self._check_run_args(q, k_pages, v_pages, block_table, kv_lens, out, lse)
        cp = _jit.require_gpu()
        with ctx.device(), ctx.stream:
            qc, kc, vc = ctx.cupy(q), ctx.cupy(k_pages), ctx.cupy(v_pages)
            table, lens = ctx.cupy(block_table), ctx.cupy(kv_lens)
            copied = not qc.flags.c_contiguous
            if copied:
                qc = cp.ascontiguousarray(qc)
            if check_tables:
                check_tables_on_device(table, lens, self.page_size, int(kc.shape[0]), ctx)
            out_c = cp.empty(qc.shape, dtype=qc.dtype) if out is None else ctx.cupy(out)
            if lse is not None:
                lse_c = ctx.cupy(lse)
            elif return_lse:
                lse_c = cp.empty((self.total_q, self.num_heads), cp.float32)
            else:
                lse_c = self._lse_scratch
            launches = self._launches(qc, kc, vc, table, lens, out_c, lse_c)
            _start(launches, ctx.stream)
            # Replayable: the caller's own arrays, none copied (the launches hold them, so their
            # addresses stay theirs while the plan remembers them).
            self._replay_key = None if key is None or copied else key
            self._replay_args = (ctx.torch_in, launches) if self._replay_key is not None else None
            out_ret = out if out is not None else ctx.to_caller(out_c)
            if not return_lse:
                return out_ret
            return out_ret, (lse if lse is not None else ctx.to_caller(lse_c))

    def _replay(self) -> None:
        """The previous run's launches on the caller's current stream (torch's, when torch came in)."""
        torch_in, launches = self._replay_args
        _start(launches, interop.caller_stream(self.device_id, torch_in))

    def _launches(self, q, k_pages, v_pages, table, lens, out, lse) -> list:
        """The launches (_jit.Launch) of a run on these arrays."""
        scale_log2 = np.float32(self.softmax_scale * math.log2(math.e))
        stride = np.int32(table.shape[1])
        launches = []
        for spec, kernel, work, o_part, lse_part, counters in zip(self.launches, self._kernels, self._work, self._o_part,
                                                                   self._lse_part, self._counters):
            args = (q, k_pages, v_pages, table, stride, lens, self._q_indptr, _NULL if work is None else work,
                    np.int32(self.num_heads), np.int32(self.group), np.int32(self.page_size), scale_log2,
                    np.int32(self.causal), out, lse, o_part, lse_part, np.int32(spec.n_part_rows), counters)
            grid = (spec.work.shape[0], self.num_kv_heads, spec.num_splits)
            launches.append(_jit.Launch(kernel, grid, spec.config.threads, spec.config.smem_bytes, args))
        return launches

    def _check_run_args(self, q, k_pages, v_pages, block_table, kv_lens, out, lse) -> None:
        dt = _check_float_dtype("q", q)
        if dt != self.dtype:
            raise TypeError(f"q: expected dtype {self.dtype} (the plan's), got {dt}")
        V.check_shape("q", q, (self.total_q, self.num_heads, self.head_dim))
        _, _, page_size, kv_heads, head_dim = _check_pools(k_pages, v_pages, dt)
        if (page_size, kv_heads, head_dim) != (self.page_size, self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"k_pages: expected [num_pages, {self.page_size}, {self.num_kv_heads}, {self.head_dim}] (the plan's "
                f"page_size, kv_heads, head_dim), got {V.shape_of(k_pages)}"
            )
        _check_int32("block_table", block_table, 2)
        _check_int32("kv_lens", kv_lens, 1)
        V.check_shape("block_table", block_table, (self.batch, None))
        V.check_shape("kv_lens", kv_lens, (self.batch,))
        _check_contiguous("block_table", block_table)
        _check_contiguous("kv_lens", kv_lens)
        cap = int(block_table.shape[1]) * self.page_size
        if cap < self.max_kv_len:
            raise ValueError(
                f"block_table: expected at least {-(-self.max_kv_len // self.page_size)} pages per sequence "
                f"(the plan's longest sequence has {self.max_kv_len} keys), got {block_table.shape[1]}"
            )
        if out is not None:
            _check_float_dtype("out", out, dt)
            V.check_shape("out", out, (self.total_q, self.num_heads, self.head_dim))
            _check_contiguous("out", out)
        if lse is not None:
            V.check_dtype("lse", lse, ("float32",))
            V.check_shape("lse", lse, (self.total_q, self.num_heads))
            _check_contiguous("lse", lse)


def check_tables_on_device(block_table, kv_lens, page_size: int, num_pages: int, ctx) -> None:
    """Raise ValueError naming the first sequence whose length exceeds its table row or whose table
    holds a page id outside [0, num_pages). Needs one host sync."""
    cp = _jit.require_gpu()
    error = cp.zeros(4, dtype=cp.int32)
    cfg = tile_config("float16", 128, "decode")  # the check kernel is dtype-agnostic; any module holds it
    k = _jit.get_kernel(cfg, cfg.CHECK_KERNEL, ctx.device_id)
    k.launch(CHECK_BLOCKS, CHECK_THREADS,
             (block_table, np.int32(block_table.shape[1]), kv_lens, np.int32(block_table.shape[0]), np.int32(page_size),
              np.int32(num_pages), error), stream=ctx.stream)
    flag, b, col, value = (int(v) for v in error.get(stream=ctx.stream))
    if flag:
        if col < 0:
            raise ValueError(f"kv_lens[{b}]: {value} keys do not fit {block_table.shape[1]} pages of {page_size}")
        raise ValueError(f"block_table[{b}, {col}]: expected a page id in [0, {num_pages}), got {value}")


def paged_attention(q, k_pages, v_pages, block_table, kv_lens, *, q_indptr=None, causal: bool = True,
                    softmax_scale: float | None = None, return_lse: bool = False, out=None, lse=None,
                    plan: AttentionPlan | None = None, check_tables: bool = False):
    """softmax(Q K^T * scale) V per sequence over its paged keys (causal, bottom-right aligned).

    Parameters
    ----------
    q : [total_q, heads, head_dim] float16/bfloat16 (CuPy or torch CUDA), ragged by ``q_indptr``.
    k_pages, v_pages : [num_pages, page_size, kv_heads, head_dim], q's dtype; heads % kv_heads == 0.
    block_table : int32 [batch, max_pages_per_seq]; kv_lens : int32 [batch] (on the GPU).
    q_indptr : int32 [batch + 1], or None for decode (one query per sequence).
    plan : an :class:`AttentionPlan` for this batch shape. Without one a plan is built here (one host
        sync to read q_indptr and kv_lens, which are then also checked). With one, q_indptr, causal and
        softmax_scale come from the plan and must not be passed differently.
    out, lse : optional outputs ([total_q, heads, head_dim] q's dtype; [total_q, heads] float32).

    Returns ``out`` or ``(out, lse)``; torch in, torch out.

    Example
    -------
    >>> out, lse = paged_attention(q, k_pages, v_pages, table, lens, q_indptr=indptr, return_lse=True)  # doctest: +SKIP
    """
    if plan is None:
        dt = _check_float_dtype("q", q)
        V.check_ndim("q", q, (3,))
        _, _, page_size, kv_heads, head_dim = _check_pools(k_pages, v_pages, dt)
        total_q, heads, qd = V.shape_of(q)
        if qd != head_dim:
            raise ValueError(f"q: expected head_dim {head_dim} (the cache's), got {qd}")
        if heads % kv_heads:
            raise ValueError(f"q: expected heads to be a multiple of kv_heads ({kv_heads}) for GQA, got {heads}")
        _check_int32("block_table", block_table, 2)
        _check_int32("kv_lens", kv_lens, 1)
        batch = int(kv_lens.shape[0])
        V.check_shape("block_table", block_table, (batch, None))
        if q_indptr is None:
            if total_q != batch:
                raise ValueError(f"q: without q_indptr one query per sequence is expected, so {batch} rows, got {total_q}")
        else:
            _check_int32("q_indptr", q_indptr, 1)
        kv_host = _host_int("kv_lens", kv_lens)
        indptr_host = _host_int("q_indptr", q_indptr)
        if indptr_host is not None:
            _check_indptr("q_indptr", indptr_host, batch)
            if int(indptr_host[-1]) != total_q:
                raise ValueError(f"q_indptr: expected the last offset to equal q's rows ({total_q}), got {int(indptr_host[-1])}")
        _check_lengths(kv_host, None, int(block_table.shape[1]), page_size)
        ctx = interop.call_context(q=q)
        plan = AttentionPlan(indptr_host if q_indptr is not None else None, kv_host, num_heads=heads,
                             num_kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, dtype=dt, causal=causal,
                             softmax_scale=softmax_scale, max_pages_per_seq=int(block_table.shape[1]),
                             device=ctx.device_id)
    else:
        if q_indptr is not None:
            raise ValueError("q_indptr: the plan holds the query layout; pass q_indptr to AttentionPlan, not with plan=")
        if causal != plan.causal:
            raise ValueError(f"causal: the plan was made with causal={plan.causal}, got {causal}")
        if softmax_scale is not None and not math.isclose(float(softmax_scale), plan.softmax_scale, rel_tol=1e-7):
            raise ValueError(f"softmax_scale: the plan was made with {plan.softmax_scale}, got {softmax_scale}")
    return plan.run(q, k_pages, v_pages, block_table, kv_lens, out=out, lse=lse, return_lse=return_lse,
                    check_tables=check_tables)


# ----------------------------------------------------------------------------------------------
# Append
# ----------------------------------------------------------------------------------------------


def append_paged_kv(k, v, k_pages, v_pages, block_table, kv_lens, *, append_indptr=None, check: bool = True,
                    check_tables: bool = False) -> None:
    """Write new tokens' keys and values into their pages.

    Parameters
    ----------
    k, v : [total_new, kv_heads, head_dim], the pools' dtype; sequence b's new tokens are rows
        ``append_indptr[b] : append_indptr[b + 1]`` (None: one new token per sequence).
    k_pages, v_pages : [num_pages, page_size, kv_heads, head_dim].
    block_table : int32 [batch, max_pages_per_seq], with pages already assigned for the new positions.
    kv_lens : int32 [batch], lengths AFTER the append: sequence b's new tokens take positions
        ``kv_lens[b] - n_new_b .. kv_lens[b] - 1``.
    check : read kv_lens and append_indptr on the host and check them (one sync); PagedKVCache, which
        keeps host copies, passes False.
    check_tables : also check the table's page ids on the device (one sync).
    """
    dt, num_pages, page_size, kv_heads, head_dim, batch, total_new = _check_append_args(
        k, v, k_pages, v_pages, block_table, kv_lens, append_indptr)
    if check:
        kv_host = _host_int("kv_lens", kv_lens)
        indptr = np.arange(batch + 1) if append_indptr is None else _host_int("append_indptr", append_indptr)
        new = _check_indptr("append_indptr", indptr, batch)
        if int(indptr[-1]) != total_new:
            raise ValueError(f"append_indptr: expected the last offset to equal k's rows ({total_new}), got {int(indptr[-1])}")
        _check_lengths(kv_host, new, int(block_table.shape[1]), page_size)
    ctx = interop.call_context(k=k, v=v, k_pages=k_pages, v_pages=v_pages, block_table=block_table, kv_lens=kv_lens,
                               append_indptr=append_indptr)
    cp = _jit.require_gpu()
    with ctx.device(), ctx.stream:
        kc, vc = cp.ascontiguousarray(ctx.cupy(k)), cp.ascontiguousarray(ctx.cupy(v))
        table, lens = ctx.cupy(block_table), ctx.cupy(kv_lens)
        indptr_d = cp.arange(batch + 1, dtype=cp.int32) if append_indptr is None else ctx.cupy(append_indptr)
        if check_tables:
            check_tables_on_device(table, lens, page_size, num_pages, ctx)
        cfg = tile_config(dt, head_dim, "decode")  # the append kernel rides in every module; reuse this one
        kern = _jit.get_kernel(cfg, cfg.APPEND_KERNEL, ctx.device_id)
        token_vecs = kv_heads * head_dim * _ELEM_BYTES // COPY_BYTES
        kern.launch(total_new, APPEND_THREADS,
                    (kc, vc, ctx.cupy(k_pages), ctx.cupy(v_pages), table, np.int32(table.shape[1]), lens, indptr_d,
                     np.int32(batch), np.int32(page_size), np.int32(token_vecs)), stream=ctx.stream)


def _check_append_args(k, v, k_pages, v_pages, block_table, kv_lens, append_indptr):
    """Host-side checks of an append's arguments (no sync): dtypes and shapes. Returns
    (dtype, num_pages, page_size, kv_heads, head_dim, batch, total_new)."""
    dt, num_pages, page_size, kv_heads, head_dim = _check_pools(k_pages, v_pages)
    _check_float_dtype("k", k, dt)
    _check_float_dtype("v", v, dt)
    V.check_ndim("k", k, (3,))
    V.check_shape("k", k, (None, kv_heads, head_dim))
    V.check_shape("v", v, V.shape_of(k))
    _check_int32("block_table", block_table, 2)
    _check_int32("kv_lens", kv_lens, 1)
    batch = int(kv_lens.shape[0])
    V.check_shape("block_table", block_table, (batch, None))
    total_new = int(k.shape[0])
    if append_indptr is None:
        if total_new != batch:
            raise ValueError(f"k: without append_indptr one new token per sequence is expected, so {batch} rows, got {total_new}")
    else:
        _check_int32("append_indptr", append_indptr, 1)
        V.check_shape("append_indptr", append_indptr, (batch + 1,))
    return dt, num_pages, page_size, kv_heads, head_dim, batch, total_new


# ----------------------------------------------------------------------------------------------
# Paged KV cache
# ----------------------------------------------------------------------------------------------


class KVPageTable:
    """Host bookkeeping of a paged cache: a free list of pages, each sequence's pages, and how many
    tokens each layer holds. Pure numpy (no GPU), so it is tested on the CPU.

    One table serves every layer of a model (``num_layers``): a page id names the same slot range in
    every layer's pool, so pages are allocated once for all layers (as vLLM does). Two counts per
    sequence:

    - ``reserved(s)``: positions that have pages (grown by :meth:`reserve` and, as needed, :meth:`advance`);
    - ``length(s, layer)``: tokens written into ``layer`` (grown by :meth:`advance` only), what attention
      over that layer sees.

    Appends go through :meth:`advance`, which places a layer's new tokens right after that layer's own
    count and reserves only positions past ``reserved(s)``. So however the calls are arranged (one
    explicit :meth:`reserve` per step followed by per-layer appends, per-layer appends alone, where the
    first layer reserves and the others find the pages there, or one all-layer ``advance(layer=None)``
    per step), a token is reserved once and counted once per layer: no length can be counted twice.
    Every mutating method is all or nothing: on any error nothing changes.
    """

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int | None = None, *, num_layers: int = 1):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages, page_size: expected >= 1, got {num_pages}, {page_size}")
        if int(num_layers) != num_layers or num_layers < 1:
            raise ValueError(f"num_layers: expected an integer >= 1, got {num_layers}")
        self.num_pages, self.page_size, self.num_layers = int(num_pages), int(page_size), int(num_layers)
        self.max_pages_per_seq = int(max_pages_per_seq or num_pages)
        if self.max_pages_per_seq < 1:
            raise ValueError(f"max_pages_per_seq: expected >= 1, got {max_pages_per_seq}")
        self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: pop() hands out low ids first
        self._pages: dict[int, list[int]] = {}
        self._reserved: dict[int, int] = {}
        self._written: dict[int, np.ndarray] = {}  # seq -> int64 [num_layers]
        self._next_id = 0

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def sequences(self) -> list[int]:
        return list(self._pages)

    def add_sequence(self, seq_id: int | None = None) -> int:
        if seq_id is None:
            while self._next_id in self._pages:
                self._next_id += 1
            seq_id = self._next_id
        seq_id = int(seq_id)
        if seq_id in self._pages:
            raise ValueError(f"seq_id: sequence {seq_id} already exists")
        self._pages[seq_id], self._reserved[seq_id] = [], 0
        self._written[seq_id] = np.zeros(self.num_layers, dtype=np.int64)
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        self._require(seq_id)
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._reserved[seq_id], self._written[seq_id]

    def _require(self, seq_id) -> None:
        if int(seq_id) not in self._pages:
            raise ValueError(f"seq_id: no sequence {seq_id} in the cache (known: {sorted(self._pages)[:16]})")

    def _layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        if not 0 <= int(layer) < self.num_layers:
            raise ValueError(f"layer: expected 0 <= layer < {self.num_layers} (num_layers), got {layer}")
        return int(layer)

    def reserved(self, seq_id: int) -> int:
        """Positions of the sequence that have pages (>= every layer's length)."""
        self._require(seq_id)
        return self._reserved[int(seq_id)]

    def length(self, seq_id: int, layer: int | None = 0) -> int:
        """Tokens written into ``layer``; None: the count every layer shares (ValueError if they differ,
        i.e. in the middle of a step's per-layer appends)."""
        self._require(seq_id)
        w = self._written[int(seq_id)]
        if layer is not None:
            return int(w[self._layer(layer)])
        if w.min() != w.max():
            raise ValueError(
                f"seq_id: sequence {seq_id}'s layers hold different token counts ({w.tolist()}): finish the "
                f"step's per-layer appends first"
            )
        return int(w[0])

    def lengths(self, seq_ids: Sequence[int], layer: int | None = 0) -> np.ndarray:
        """int32 [len(seq_ids)] of :meth:`length`."""
        return np.array([self.length(s, layer) for s in seq_ids], dtype=np.int32)

    def pages(self, seq_id: int) -> list[int]:
        self._require(seq_id)
        return list(self._pages[int(seq_id)])

    def _check_step(self, seq_ids, new_tokens) -> tuple[list[int], list[int]]:
        seq_ids = [int(s) for s in seq_ids]
        new_tokens = [int(n) for n in new_tokens]
        if len(seq_ids) != len(new_tokens):
            raise ValueError(f"new_tokens: expected one count per sequence ({len(seq_ids)}), got {len(new_tokens)}")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids: expected distinct sequences, got {seq_ids}")
        for s, n in zip(seq_ids, new_tokens):
            self._require(s)
            if n < 0:
                raise ValueError(f"new_tokens: expected counts >= 0, got {n} for sequence {s}")
        return seq_ids, new_tokens

    def _grow(self, seq_ids: list[int], totals: list[int]) -> None:
        """Give each sequence pages for max(reserved, total) positions, all or nothing."""
        need = []
        for s, total in zip(seq_ids, totals):
            total = max(total, self._reserved[s])
            pages = -(-total // self.page_size)
            if pages > self.max_pages_per_seq:
                raise ValueError(
                    f"append: sequence {s} would hold {total} tokens = {pages} pages, over "
                    f"max_pages_per_seq ({self.max_pages_per_seq}); nothing was written"
                )
            need.append(pages - len(self._pages[s]))
        if sum(need) > len(self._free):
            raise ValueError(
                f"append: the cache is full: {sum(need)} new pages of {self.page_size} tokens needed, "
                f"{len(self._free)} free of {self.num_pages}; nothing was written"
            )
        for s, total, k in zip(seq_ids, totals, need):
            self._pages[s].extend(self._free.pop() for _ in range(k))
            self._reserved[s] = max(self._reserved[s], total)

    def reserve(self, seq_ids: Sequence[int], new_tokens: Sequence[int]) -> np.ndarray:
        """Pages for ``new_tokens`` more positions per sequence past its reserved count, in every layer,
        ahead of the appends that fill them (which then reserve nothing more). Writes no layer's
        length. All or nothing. Returns the reserved counts after (int64)."""
        seq_ids, new_tokens = self._check_step(seq_ids, new_tokens)
        self._grow(seq_ids, [self._reserved[s] + n for s, n in zip(seq_ids, new_tokens)])
        return np.array([self._reserved[s] for s in seq_ids], dtype=np.int64)

    def advance(self, seq_ids: Sequence[int], new_tokens: Sequence[int], *, layer: int | None = 0) -> np.ndarray:
        """Count ``new_tokens`` tokens appended to each sequence in ``layer`` (None: in every layer at once,
        whose counts must then agree), reserving pages for positions past the reserved count.

        Sequence s's new tokens take positions ``length(s, layer) .. length(s, layer) + n - 1``: the
        positions follow the layer's own count, so a later layer of the same step reuses what an
        earlier layer (or :meth:`reserve`) reserved. All or nothing. Returns the layer's lengths after
        (int64), the ``kv_lens`` its append and attention take.
        """
        seq_ids, new_tokens = self._check_step(seq_ids, new_tokens)
        sel = slice(None) if layer is None else self._layer(layer)
        starts = [self.length(s, None if layer is None else sel) for s in seq_ids]  # raises if layers differ
        ends = [a + n for a, n in zip(starts, new_tokens)]
        self._grow(seq_ids, ends)
        for s, e in zip(seq_ids, ends):
            self._written[s][sel] = e
        return np.array(ends, dtype=np.int64)

    def block_table(self, seq_ids: Sequence[int], width: int | None = None) -> np.ndarray:
        """int32 [len(seq_ids), width] (default: max_pages_per_seq); unused entries hold -1."""
        width = self.max_pages_per_seq if width is None else int(width)
        table = np.full((len(seq_ids), width), -1, dtype=np.int32)
        for i, s in enumerate(seq_ids):
            p = self.pages(s)
            if len(p) > width:
                raise ValueError(f"width: sequence {s} has {len(p)} pages, expected width >= {len(p)}, got {width}")
            table[i, : len(p)] = p
        return table


def slot_positions(kv_lens_after: np.ndarray, new_tokens: np.ndarray, table: np.ndarray, page_size: int) -> np.ndarray:
    """Flat slots (page * page_size + offset) of appended tokens, in the append kernel's order: the
    host mirror of paged_kv_append_kernel's addressing (tested on the CPU)."""
    out = []
    for b, (n_after, n_new) in enumerate(zip(kv_lens_after, new_tokens)):
        for pos in range(int(n_after) - int(n_new), int(n_after)):
            out.append(int(table[b, pos // page_size]) * page_size + pos % page_size)
    return np.array(out, dtype=np.int64)


class BatchState:
    """The host side of a batch of sequences over a :class:`KVPageTable`: their query counts, block
    table and lengths as host arrays, kept current in place by :meth:`step` and :meth:`update`.

    Pure numpy (tested on the CPU); :class:`PagedBatch` adds the device buffers and the plan, and any
    other backend (e.g. a numpy replay) can subclass it the same way, overriding :meth:`_upload`.

    seq_ids : distinct live sequences; q_lens : new tokens (queries) per sequence and step (None: one,
    decode). Every layer of the sequences must hold the same count when the batch is made.

    Attributes: ``q_lens`` int64 [B]; ``q_indptr_host`` int32 [B + 1] (also the append layout);
    ``block_table_host`` int32 [B, max_pages_per_seq] (-1 past each sequence's pages);
    ``kv_lens_host`` int32 [B], the lengths the last :meth:`step` / :meth:`update` recorded.
    """

    def __init__(self, pages: KVPageTable, seq_ids: Sequence[int], q_lens: Sequence[int] | None = None):
        seq_ids = [int(s) for s in seq_ids]
        if not seq_ids:
            raise ValueError("seq_ids: expected at least one sequence, got none")
        q = [1] * len(seq_ids) if q_lens is None else [int(n) for n in q_lens]
        pages._check_step(seq_ids, q)  # known, distinct, counts >= 0, one per sequence
        self.pages, self.seq_ids, self.batch = pages, seq_ids, len(seq_ids)
        self.q_lens = np.array(q, dtype=np.int64)
        self.decode_only = q_lens is None or bool(np.all(self.q_lens == 1))
        self.total_q = int(self.q_lens.sum())
        self.q_indptr_host = np.concatenate([[0], np.cumsum(self.q_lens)]).astype(np.int32)
        self.block_table_host = np.full((self.batch, pages.max_pages_per_seq), -1, dtype=np.int32)
        self.kv_lens_host = np.zeros(self.batch, dtype=np.int32)
        self._num_pages = np.zeros(self.batch, dtype=np.int64)  # pages written into each table row
        self._read_state(full=True)

    def _read_state(self, full: bool, lens: np.ndarray | None = None) -> bool:
        """Host arrays <- the page table (only new pages of each row unless ``full``); True when the
        block table changed."""
        if lens is None:
            lens = self.pages.lengths(self.seq_ids, None)  # raises (changing nothing) if layers differ
        for s in self.seq_ids:
            self.pages._require(s)
        changed = False
        for i, s in enumerate(self.seq_ids):
            p = self.pages._pages[s]
            if full or len(p) != self._num_pages[i]:
                lo = 0 if full else int(self._num_pages[i])
                row = self.block_table_host[i]
                row[lo : len(p)] = p[lo:]
                row[len(p) :] = -1
                self._num_pages[i] = len(p)
                changed = True
        self.kv_lens_host[...] = lens
        return changed

    def step(self, stream=None) -> np.ndarray:
        """One forward's bookkeeping: count ``q_lens`` new tokens per sequence in every layer at once
        (``KVPageTable.advance(..., layer=None)``: reserved once, counted once), then write the new
        block table and lengths into the batch's buffers. All or nothing on the host. Returns the
        lengths after (int64): sequence b's new tokens sit at positions ``len - q_lens[b] .. len - 1``."""
        stream = self._upload_stream(stream)
        lens = self.pages.advance(self.seq_ids, self.q_lens, layer=None)
        changed = self._read_state(full=False, lens=lens)
        self._upload(changed, stream)
        return lens

    def update(self, stream=None) -> np.ndarray:
        """Re-read the sequences' pages and (common) lengths from the page table and write them into the
        batch's buffers, counting nothing (e.g. after appends made through the cache). Returns the lengths."""
        stream = self._upload_stream(stream)
        self._read_state(full=True)
        self._upload(True, stream)
        return self.kv_lens_host.astype(np.int64)

    def _upload_stream(self, stream):
        """The stream the copies will use, checked before anything changes (backends override)."""
        return stream

    def _upload(self, table_changed: bool, stream) -> None:
        """Host arrays -> wherever the backend's kernels read them (the host arrays themselves here)."""


class PagedKVCache:
    """A paged K/V cache of one or more layers on one GPU: page pools, one allocator for all layers,
    per-sequence tables and lengths, and capture-friendly batches.

    Parameters
    ----------
    num_pages, page_size, num_kv_heads, head_dim : one layer's pool is [num_pages, page_size, kv_heads, head_dim].
    dtype : "float16" or "bfloat16".
    num_layers : layers sharing the page table (a page id names the same slots in every layer's pool).
    max_pages_per_seq : width of the block tables handed to the kernels (default: num_pages).
    device : GPU id (default: the current one).

    ``k_pages`` / ``v_pages`` are always [num_layers, num_pages, page_size, kv_heads, head_dim];
    ``k_pages[i]`` (or ``layer(i)``) is layer i's C-contiguous pool, the layout the kernels take.
    Host bookkeeping is a :class:`KVPageTable` (``pages``): see there how reservations and per-layer
    lengths work. Two ways to drive it:

    - eager: ``append(seq_ids, k, v, new_tokens, layer=i)`` then ``attention(seq_ids, q, q_lens, layer=i)``
      for each layer (the first layer's append reserves the pages, the others reuse them; each call
      uploads tables and builds a plan);
    - serving loops / CUDA graphs: ``b = batch(seq_ids, q_lens, num_heads=...)`` once, then per step
      ``b.step()`` (host bookkeeping for all layers + copies into fixed device buffers) and per layer
      ``b.append(i, k, v)``, ``b.attention(i, q, out=out)`` (no host sync, no allocation: capturable).

    Example
    -------
    >>> cache = PagedKVCache(1024, 16, 8, 128, "float16", num_layers=2)  # doctest: +SKIP
    >>> s = cache.add_sequence()                                         # doctest: +SKIP
    >>> for i in range(2):                                               # doctest: +SKIP
    ...     cache.append([s], k[i], v[i], [n], layer=i)
    ...     out = cache.attention([s], q[i], q_lens=[n], layer=i)
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: str = "float16", *,
                 num_layers: int = 1, max_pages_per_seq: int | None = None, device: int | None = None):
        if dtype not in DTYPES:
            raise TypeError(f"dtype: expected one of {DTYPES}, got {dtype}")
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {head_dim}")
        if num_kv_heads < 1:
            raise ValueError(f"num_kv_heads: expected >= 1, got {num_kv_heads}")
        self.pages = KVPageTable(num_pages, page_size, max_pages_per_seq, num_layers=num_layers)
        self.num_kv_heads, self.head_dim, self.dtype = int(num_kv_heads), int(head_dim), dtype
        cp = _jit.require_gpu()
        self.device_id = int(cp.cuda.Device().id if device is None else device)
        np_dtype = V.np_dtype(dtype)
        with cp.cuda.Device(self.device_id):
            shape = (self.num_layers, num_pages, page_size, num_kv_heads, head_dim)
            self.k_pages = cp.empty(shape, dtype=np_dtype)
            self.v_pages = cp.empty(shape, dtype=np_dtype)
        self._layers = [(self.k_pages[i], self.v_pages[i]) for i in range(self.num_layers)]

    @property
    def page_size(self) -> int:
        return self.pages.page_size

    @property
    def num_layers(self) -> int:
        return self.pages.num_layers

    @property
    def nbytes(self) -> int:
        return int(self.k_pages.nbytes + self.v_pages.nbytes)

    def layer(self, i: int):
        """(k_pages, v_pages) of layer i: [num_pages, page_size, kv_heads, head_dim] views."""
        return self._layers[self.pages._layer(i)]

    def add_sequence(self, seq_id: int | None = None) -> int:
        return self.pages.add_sequence(seq_id)

    def free_sequence(self, seq_id: int) -> None:
        self.pages.free_sequence(seq_id)

    def length(self, seq_id: int, layer: int | None = 0) -> int:
        """Tokens of the sequence in ``layer`` (None: the count all layers share)."""
        return self.pages.length(seq_id, layer)

    def reserve(self, seq_ids: Sequence[int], new_tokens: Sequence[int]) -> np.ndarray:
        """Reserve pages for a step's tokens in every layer ahead of the per-layer appends (optional:
        the first append past the reserved positions reserves them). See :meth:`KVPageTable.reserve`."""
        return self.pages.reserve(seq_ids, new_tokens)

    def tables(self, seq_ids: Sequence[int], layer: int = 0):
        """(block_table int32 [B, max_pages_per_seq], kv_lens int32 [B] of ``layer``) on the GPU."""
        table, lens = self.pages.block_table(seq_ids), self.pages.lengths(seq_ids, layer)
        cp = _jit.require_gpu()
        with cp.cuda.Device(self.device_id):
            return cp.asarray(table), cp.asarray(lens)

    def append(self, seq_ids: Sequence[int], k, v, new_tokens: Sequence[int] | None = None, *, layer: int = 0) -> None:
        """Append ragged new tokens to ``layer``: k, v [sum(new_tokens), kv_heads, head_dim] (default one
        token per sequence), placed after the layer's current length (``KVPageTable.advance``). Pages
        are allocated only past the reserved positions; past capacity raises ValueError and writes nothing."""
        seq_ids = [int(s) for s in seq_ids]
        new_tokens = [1] * len(seq_ids) if new_tokens is None else [int(n) for n in new_tokens]
        _check_float_dtype("k", k, self.dtype)
        _check_float_dtype("v", v, self.dtype)
        V.check_ndim("k", k, (3,))
        V.check_shape("k", k, (sum(new_tokens), self.num_kv_heads, self.head_dim))
        V.check_shape("v", v, V.shape_of(k))
        self.pages._layer(layer)
        if not seq_ids:
            return
        lens = self.pages.advance(seq_ids, new_tokens, layer=layer)  # raises, changing nothing, when pages run out
        if not sum(new_tokens):
            return
        cp = _jit.require_gpu()
        with cp.cuda.Device(self.device_id):
            table = cp.asarray(self.pages.block_table(seq_ids))
            lens_d = cp.asarray(lens.astype(np.int32))
            indptr = cp.asarray(np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int32))
        kp, vp = self._layers[layer]
        append_paged_kv(k, v, kp, vp, table, lens_d, append_indptr=indptr, check=False)

    def attention(self, seq_ids: Sequence[int], q, q_lens: Sequence[int] | None = None, *, layer: int = 0,
                  causal: bool = True, softmax_scale: float | None = None, return_lse: bool = False, out=None):
        """Attention of q [sum(q_lens), heads, head_dim] (default one query per sequence) over the keys of
        ``seq_ids`` in ``layer``; the last q_len tokens of each sequence are its queries' positions."""
        seq_ids = [int(s) for s in seq_ids]
        V.check_ndim("q", q, (3,))
        self.pages._layer(layer)
        table, lens = self.tables(seq_ids, layer)
        indptr = None
        if q_lens is not None:
            indptr = np.concatenate([[0], np.cumsum([int(n) for n in q_lens])]).astype(np.int32)
        kv = self.pages.lengths(seq_ids, layer).astype(np.int64)
        ctx = interop.call_context(q=q)
        plan = AttentionPlan(indptr, kv, num_heads=int(q.shape[1]), num_kv_heads=self.num_kv_heads,
                             head_dim=self.head_dim, page_size=self.page_size, dtype=self.dtype, causal=causal,
                             softmax_scale=softmax_scale, max_pages_per_seq=self.pages.max_pages_per_seq,
                             device=ctx.device_id)
        kp, vp = self._layers[layer]
        return plan.run(q, kp, vp, table, lens, out=out, return_lse=return_lse)

    def batch(self, seq_ids: Sequence[int], q_lens: Sequence[int] | None = None, *, num_heads: int,
              max_kv_len: int | None = None, causal: bool = True, softmax_scale: float | None = None) -> "PagedBatch":
        """A :class:`PagedBatch`: fixed device buffers and an attention plan for steps of ``q_lens`` new
        tokens per sequence (None: decode), over every layer. ``max_kv_len``: the longest length the
        batch will reach (split-KV counts are sized for it; longer lengths that fit the table stay correct)."""
        return PagedBatch(self, seq_ids, q_lens, num_heads=num_heads, max_kv_len=max_kv_len, causal=causal,
                          softmax_scale=softmax_scale)


class PagedBatch(BatchState):
    """A batch of a :class:`PagedKVCache` whose steps can be captured in a CUDA graph.

    Device buffers, allocated once: ``block_table`` int32 [B, max_pages_per_seq], ``kv_lens`` int32 [B]
    (lengths after the current step's tokens), ``q_indptr`` int32 [B + 1] (queries and appended tokens
    of each sequence, fixed), and ``plan`` (an :class:`AttentionPlan` for the batch's q layout).

    Per step: :meth:`step` (host bookkeeping for all layers, then host->device copies into the same
    buffers, in the stream order of ``stream``, default the current stream; never during a capture),
    then per layer :meth:`append` and :meth:`attention`, which read only those buffers: no host sync, and
    no allocation when ``out`` (and ``lse``) are given. Capture one step's launches once, then for every
    later step call :meth:`step` and replay. Keep the batch alive as long as the graph (the graph holds
    its buffers' addresses). A different q layout (e.g. another prefill chunk) needs another batch.

    Made by :meth:`PagedKVCache.batch`.
    """

    def __init__(self, cache: PagedKVCache, seq_ids, q_lens=None, *, num_heads: int, max_kv_len: int | None = None,
                 causal: bool = True, softmax_scale: float | None = None):
        super().__init__(cache.pages, seq_ids, q_lens)
        self.cache = cache
        cap = cache.pages.max_pages_per_seq * cache.page_size
        if max_kv_len is not None and not 0 <= int(max_kv_len) <= cap:
            raise ValueError(
                f"max_kv_len: expected 0 <= max_kv_len <= {cap} (max_pages_per_seq {cache.pages.max_pages_per_seq} "
                f"x page_size {cache.page_size}), got {max_kv_len}"
            )
        planned = self.kv_lens_host.astype(np.int64) + self.q_lens  # the lengths after the first step
        cp = _jit.require_gpu()
        with cp.cuda.Device(cache.device_id):
            self.plan = AttentionPlan(
                None if self.decode_only else self.q_indptr_host, np.minimum(planned, cap), num_heads=num_heads,
                num_kv_heads=cache.num_kv_heads, head_dim=cache.head_dim, page_size=cache.page_size, dtype=cache.dtype,
                causal=causal, softmax_scale=softmax_scale, max_kv_len=max_kv_len,
                max_pages_per_seq=cache.pages.max_pages_per_seq, device=cache.device_id,
            )
            self.block_table = cp.asarray(self.block_table_host)
            self.kv_lens = cp.asarray(self.kv_lens_host)
            self.q_indptr = cp.asarray(self.q_indptr_host)

    def _upload_stream(self, stream):
        cp = _jit.require_gpu()
        if stream is None:
            with cp.cuda.Device(self.cache.device_id):
                stream = cp.cuda.get_current_stream()
        if stream.is_capturing():
            raise ValueError("stream: step() and update() copy host tables to the device, so expected a stream "
                             "outside graph capture, got one that is capturing; nothing was counted")
        return stream

    def _upload(self, table_changed: bool, stream) -> None:
        cp = _jit.require_gpu()
        with cp.cuda.Device(self.cache.device_id):
            self.kv_lens.set(self.kv_lens_host, stream=stream)
            if table_changed:
                self.block_table.set(self.block_table_host, stream=stream)

    def append(self, layer: int, k, v) -> None:
        """This step's new tokens (k, v [total_q, kv_heads, head_dim], rows ragged by q_indptr) into
        ``layer``'s pages, at the positions :meth:`step` counted. No host sync, no allocation."""
        kp, vp = self.cache.layer(layer)
        V.check_ndim("k", k, (3,))
        V.check_shape("k", k, (self.total_q, self.cache.num_kv_heads, self.cache.head_dim))
        if self.total_q == 0:
            return
        append_paged_kv(k, v, kp, vp, self.block_table, self.kv_lens, append_indptr=self.q_indptr, check=False)

    def attention(self, layer: int, q, *, out=None, lse=None, return_lse: bool = False):
        """Causal attention of q [total_q, heads, head_dim] over ``layer``'s cache (this step's tokens
        appended first). No host sync; no allocation given ``out`` (and ``lse`` with return_lse)."""
        kp, vp = self.cache.layer(layer)
        return self.plan.run(q, kp, vp, self.block_table, self.kv_lens, out=out, lse=lse, return_lse=return_lse)
