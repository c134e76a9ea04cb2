"""Paged KV cache and paged causal attention (prefill, chunked prefill, decode, mixed batches, GQA/MQA).

Layouts (C-contiguous, one GPU):

- ``k_pages`` / ``v_pages``: ``[num_pages, page_size, kv_heads, head_dim]`` (NHD), float16 or bfloat16;
- ``block_table``: int32 ``[batch, max_pages_per_seq]``; entry ``p`` of row ``b`` is the page holding
  keys ``p * page_size .. (p + 1) * page_size - 1`` of sequence ``b`` (any page size >= 1, any order);
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
"""

from __future__ import annotations

import math
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
COPY_BYTES = 16  # one vector copy
WORK_FIELDS = 3  # work item: (sequence, row tile, first partial row)
H100_SMEM_PER_BLOCK = 227 * 1024  # opt-in dynamic shared memory limit per block on sm_90
SM86_SMEM_PER_BLOCK = 99 * 1024  # the same on sm_86 / sm_89 (CI compiles the variants that fit there too)
MAX_SPLITS = 128  # split-KV count cap; the combine kernel loops over splits, so any count works
SPLIT_OVERHEAD_TILES = 2  # cost of one split in key tiles: prologue latency, partial write, combine read
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
    CTA (the CTA takes 16 * warps packed (query, head) rows); stages: K/V tiles in the cp.async pipeline.
    The module also holds the split combine for (dtype, head_dim), the append kernel and the table check.
    """

    dtype: str = "float16"
    head_dim: int = 128
    block_n: int = 64
    warps: int = 4
    stages: int = 2
    source = "attention.cu"
    family = _jit.ARCH_PORTABLE

    @property
    def block_m(self) -> int:
        return MMA_M * self.warps

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory: Q tile plus kStages K and V tiles, rows padded (attention.cu smem_bytes)."""
        return (self.block_m + 2 * self.stages * self.block_n) * (self.head_dim + SMEM_PAD) * _ELEM_BYTES

    def attention_kernel(self) -> str:
        t = _CUDA_TYPE[self.dtype]
        return f"cuflash::attn::paged_attention_kernel<{t}, {self.head_dim}, {self.block_n}, {self.warps}, {self.stages}>"

    def combine_kernel(self) -> str:
        return f"cuflash::attn::combine_splits_kernel<{_CUDA_TYPE[self.dtype]}, {self.head_dim}>"

    APPEND_KERNEL = "cuflash::attn::paged_kv_append_kernel"
    CHECK_KERNEL = "cuflash::attn::paged_table_check_kernel"

    def name_expressions(self) -> tuple[str, ...]:
        return (self.attention_kernel(), self.combine_kernel(), self.APPEND_KERNEL, self.CHECK_KERNEL)

    def kernel_name(self) -> str:
        return f"paged_attention_{self.dtype}_d{self.head_dim}_n{self.block_n}_w{self.warps}_s{self.stages}"


ROLES = ("prefill", "decode")


def tile_config(dtype: str, head_dim: int, role: str, max_smem: int = H100_SMEM_PER_BLOCK) -> AttentionConfig:
    """The kernel variant for sequences of one role, a pure function of its arguments.

    role "decode": sequences whose packed rows (q_len * group) fit one 4-warp tile of 64 rows;
    role "prefill": the rest. ``max_smem`` is the device's opt-in shared memory per block.
    """
    if role not in ROLES:
        raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
    if role == "decode":
        # 4 warps = 64 rows: one CTA holds every query head of a group (group <= 64) of one decode query
        # (or a few queries); only warps holding rows compute, all four stream K/V. Two stages keep
        # smem at 87 KB (d128) so two CTAs share an SM: ~70 KB of K/V in flight per SM, above the
        # ~23 KB that 3 TB/s x 1 us latency / 132 SMs needs.
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
    cfg = AttentionConfig(dtype, head_dim, block_n, warps, stages)
    # Smaller parts (sm_86/89 allow 99 KB per block): shrink key tiles until the variant fits.
    while cfg.smem_bytes > max_smem and cfg.block_n > MMA_M:
        cfg = AttentionConfig(dtype, head_dim, cfg.block_n // 2, warps, stages)
    if cfg.smem_bytes > max_smem:
        raise _jit.CuflashUnavailableError(
            f"{cfg.kernel_name()} needs {cfg.smem_bytes} bytes of shared memory per block, the device allows {max_smem}"
        )
    return cfg


def kernel_variants() -> list[AttentionConfig]:
    """Every attention config the heuristics can pick (CI compiles them all, for sm_80 and sm_90)."""
    out = []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for role in ROLES:
                for limit in (H100_SMEM_PER_BLOCK, SM86_SMEM_PER_BLOCK):
                    c = tile_config(dtype, d, role, limit)
                    if c not in out:
                        out.append(c)
    return out


def choose_num_splits(n_ctas: int, max_tiles: int, slots: int) -> int:
    """Split-KV count for a launch of ``n_ctas`` CTAs (before splitting) whose longest CTA walks
    ``max_tiles`` key tiles, on a GPU holding ``slots`` CTAs at once (SMs x CTAs per SM).

    Cost model: time ~ waves x per-CTA time = ceil(n_ctas * S / slots) * (ceil(max_tiles / S) +
    SPLIT_OVERHEAD_TILES); the smallest S of least cost wins. B=1, 8 kv heads, 32k keys on 264 slots
    gives 32 splits (256 CTAs, one wave); 128 CTAs of 128 tiles give 2 (a third split would start a second
    wave); 512 CTAs give 1.
    """
    if n_ctas <= 0 or max_tiles <= 1:
        return 1
    best, best_cost = 1, None
    for s in range(1, min(MAX_SPLITS, max_tiles) + 1):
        cost = math.ceil(n_ctas * s / slots) * (math.ceil(max_tiles / s) + SPLIT_OVERHEAD_TILES)
        if best_cost is None or cost < best_cost:
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


def visible_keys(q_len: int, kv_len: int, last_query: int, causal: bool) -> int:
    """Keys query ``last_query`` (0-based among q_len) of a sequence can see (the mask rule)."""
    last = kv_len - q_len + last_query if causal else kv_len - 1
    return max(0, min(last, kv_len - 1) + 1)


def partition(q_lens, kv_lens, *, group: int, num_kv_heads: int, dtype: str, head_dim: int, causal: bool,
              slots_of, max_smem: int = H100_SMEM_PER_BLOCK) -> list[LaunchSpec]:
    """Split a batch into launches (decode-like and prefill sequences) and work items.

    q_lens, kv_lens: host int arrays [batch] (kv_lens: the lengths to plan for); ``slots_of(config)``
    gives the CTAs the GPU holds at once for a config. Sequences with no query get no work.
    """
    q_lens = np.asarray(q_lens, dtype=np.int64)
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    q_starts = np.concatenate([[0], np.cumsum(q_lens)])
    decode_cfg = tile_config(dtype, head_dim, "decode", max_smem)
    specs = []
    for role in ROLES:
        cfg = decode_cfg if role == "decode" else tile_config(dtype, head_dim, "prefill", max_smem)
        rows = q_lens * group
        is_decode = (rows > 0) & (rows <= decode_cfg.block_m)
        seqs = np.flatnonzero(is_decode if role == "decode" else rows > decode_cfg.block_m)
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
                                  head_dim=self.head_dim, causal=self.causal, slots_of=slots_of, max_smem=max_smem)
        with cp.cuda.Device(self.device_id):
            self._q_indptr = cp.asarray(indptr.astype(np.int32))
            self._work = [cp.asarray(s.work) for s in self.launches]
            self._part_qrow = [cp.asarray(s.part_qrow if s.n_part_rows else np.zeros(1, np.int32)) for s in self.launches]
            self._o_part, self._lse_part = [], []
            for s in self.launches:
                n = s.n_part_rows if s.num_splits > 1 else 0
                self._o_part.append(cp.empty((max(1, s.num_splits * n * self.num_heads * self.head_dim),), cp.float32))
                self._lse_part.append(cp.empty((max(1, s.num_splits * n * self.num_heads),), cp.float32))
            self._lse_scratch = cp.empty((max(1, self.total_q), self.num_heads), cp.float32)

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
        """
        ctx = interop.call_context(q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table, kv_lens=kv_lens,
                                   out=out, lse=lse)
        if ctx.device_id != self.device_id:
            raise ValueError(f"q: the plan was made for GPU {self.device_id}, the arrays live on GPU {ctx.device_id}")
        self._check_run_args(q, k_pages, v_pages, block_table, kv_lens, out, lse)
        cp = _jit.require_gpu()
        with ctx.device(), ctx.stream:
            qc, kc, vc = ctx.cupy(q), ctx.cupy(k_pages), ctx.cupy(v_pages)
            table, lens = ctx.cupy(block_table), ctx.cupy(kv_lens)
            if not qc.flags.c_contiguous:
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
            self._launch(ctx, qc, kc, vc, table, lens, out_c, lse_c)
            out_ret = out if out is not None else ctx.to_caller(out_c)
            if not return_lse:
                return out_ret
            return out_ret, (lse if lse is not None else ctx.to_caller(lse_c))

    def _launch(self, ctx, q, k_pages, v_pages, table, lens, out, lse) -> None:
        scale_log2 = np.float32(self.softmax_scale * math.log2(math.e))
        stride = np.int32(table.shape[1])
        for spec, work, part_qrow, o_part, lse_part in zip(self.launches, self._work, self._part_qrow, self._o_part,
                                                           self._lse_part):
            cfg = spec.config
            k = _jit.get_kernel(cfg, cfg.attention_kernel(), ctx.device_id)
            k.launch(
                (work.shape[0], self.num_kv_heads, spec.num_splits), cfg.threads,
                (q, k_pages, v_pages, table, stride, lens, self._q_indptr, work, np.int32(self.num_heads),
                 np.int32(self.group), np.int32(self.page_size), scale_log2, np.int32(self.causal), out, lse, o_part,
                 lse_part, np.int32(spec.n_part_rows)),
                stream=ctx.stream, smem=cfg.smem_bytes,
            )
            if spec.num_splits > 1:
                c = _jit.get_kernel(cfg, cfg.combine_kernel(), ctx.device_id)
                c.launch((spec.n_part_rows, self.num_heads), self.head_dim,
                         (o_part, lse_part, part_qrow, np.int32(spec.n_part_rows), np.int32(self.num_heads),
                          np.int32(spec.num_splits), out, lse), stream=ctx.stream)

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


# ----------------------------------------------------------------------------------------------
# Paged KV cache
# ----------------------------------------------------------------------------------------------


class KVPageTable:
    """Host bookkeeping of a paged cache: a free list of pages, each sequence's pages and length.

    Pure numpy (no GPU), so it is tested on the CPU. Lengths are tracked explicitly.
    """

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int | None = None):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages, page_size: expected >= 1, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self.max_pages_per_seq = int(max_pages_per_seq or num_pages)
        self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: pop() hands out low ids first
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
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
        self._pages[seq_id], self._lens[seq_id] = [], 0
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        self._require(seq_id)
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._lens[seq_id]

    def length(self, seq_id: int) -> int:
        self._require(seq_id)
        return self._lens[seq_id]

    def pages(self, seq_id: int) -> list[int]:
        self._require(seq_id)
        return list(self._pages[seq_id])

    def _require(self, seq_id) -> None:
        if int(seq_id) not in self._pages:
            raise ValueError(f"seq_id: no sequence {seq_id} in the cache (known: {sorted(self._pages)[:16]})")

    def reserve(self, seq_ids: Sequence[int], new_tokens: Sequence[int]) -> np.ndarray:
        """Grow each sequence by its new tokens, taking pages from the free list. All or nothing: on any
        error (unknown or repeated id, capacity) nothing changes. Returns the new lengths (int64)."""
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
        need = []
        for s, n in zip(seq_ids, new_tokens):
            pages = -(-(self._lens[s] + n) // self.page_size)
            if pages > self.max_pages_per_seq:
                raise ValueError(
                    f"append: sequence {s} would hold {self._lens[s] + n} tokens = {pages} pages, over "
                    f"max_pages_per_seq ({self.max_pages_per_seq}); nothing was written"
                )
            need.append(pages - len(self._pages[s]))
        if sum(need) > len(self._free):
            raise ValueError(
                f"append: the cache is full: {sum(need)} new pages of {self.page_size} tokens needed, "
                f"{len(self._free)} free of {self.num_pages}; nothing was written"
            )
        for s, n, k in zip(seq_ids, new_tokens, need):
            self._pages[s].extend(self._free.pop() for _ in range(k))
            self._lens[s] += n
        return np.array([self._lens[s] for s in seq_ids], dtype=np.int64)

    def block_table(self, seq_ids: Sequence[int], width: int | None = None) -> np.ndarray:
        """int32 [len(seq_ids), width] (default: max_pages_per_seq); unused entries hold -1."""
        width = self.max_pages_per_seq if width is None else int(width)
        table = np.full((len(seq_ids), width), -1, dtype=np.int32)
        for i, s in enumerate(seq_ids):
            p = self.pages(s)
            table[i, : len(p)] = p
        return table

    def lengths(self, seq_ids: Sequence[int]) -> np.ndarray:
        return np.array([self.length(s) for s in seq_ids], dtype=np.int32)


def slot_positions(kv_lens_after: np.ndarray, new_tokens: np.ndarray, table: np.ndarray, page_size: int) -> np.ndarray:
    """Flat slots (page * page_size + offset) of appended tokens, in the append kernel's order: the
    host mirror of paged_kv_append_kernel's addressing (tested on the CPU)."""
    out = []
    for b, (n_after, n_new) in enumerate(zip(kv_lens_after, new_tokens)):
        for pos in range(int(n_after) - int(n_new), int(n_after)):
            out.append(int(table[b, pos // page_size]) * page_size + pos % page_size)
    return np.array(out, dtype=np.int64)


class PagedKVCache:
    """A paged K/V cache on one GPU: page pools, an allocator, and per-sequence tables and lengths.

    Parameters
    ----------
    num_pages, page_size, num_kv_heads, head_dim : pool shape [num_pages, page_size, kv_heads, head_dim].
    dtype : "float16" or "bfloat16".
    max_pages_per_seq : width of the block tables handed to the kernels (default: num_pages).
    device : GPU id (default: the current one).

    Example
    -------
    >>> cache = PagedKVCache(1024, 16, 8, 128, "float16")          # doctest: +SKIP
    >>> s = cache.add_sequence()                                   # doctest: +SKIP
    >>> cache.append([s], k_new, v_new, [k_new.shape[0]])          # doctest: +SKIP
    >>> out = cache.attention([s], q, q_lens=[q.shape[0]])         # doctest: +SKIP
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: str = "float16", *,
                 max_pages_per_seq: int | None = None, device: int | None = None):
        if dtype not in DTYPES:
            raise TypeError(f"dtype: expected one of {DTYPES}, got {dtype}")
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {head_dim}")
        if num_kv_heads < 1:
            raise ValueError(f"num_kv_heads: expected >= 1, got {num_kv_heads}")
        self.pages = KVPageTable(num_pages, page_size, max_pages_per_seq)
        self.num_kv_heads, self.head_dim, self.dtype = int(num_kv_heads), int(head_dim), dtype
        cp = _jit.require_gpu()
        self.device_id = int(cp.cuda.Device().id if device is None else device)
        np_dtype = V.np_dtype(dtype)
        with cp.cuda.Device(self.device_id):
            shape = (num_pages, page_size, num_kv_heads, head_dim)
            self.k_pages = cp.empty(shape, dtype=np_dtype)
            self.v_pages = cp.empty(shape, dtype=np_dtype)

    @property
    def page_size(self) -> int:
        return self.pages.page_size

    def add_sequence(self, seq_id: int | None = None) -> int:
        return self.pages.add_sequence(seq_id)

    def free_sequence(self, seq_id: int) -> None:
        self.pages.free_sequence(seq_id)

    def length(self, seq_id: int) -> int:
        return self.pages.length(seq_id)

    def tables(self, seq_ids: Sequence[int]):
        """(block_table int32 [B, max_pages_per_seq], kv_lens int32 [B]) on the GPU for a batch."""
        cp = _jit.require_gpu()
        with cp.cuda.Device(self.device_id):
            return cp.asarray(self.pages.block_table(seq_ids)), cp.asarray(self.pages.lengths(seq_ids))

    def append(self, seq_ids: Sequence[int], k, v, new_tokens: Sequence[int] | None = None) -> None:
        """Append ragged new tokens: k, v [sum(new_tokens), kv_heads, head_dim] (default one token per
        sequence). Pages are allocated as needed; past capacity raises ValueError and writes nothing."""
        seq_ids = [int(s) for s in seq_ids]
        new_tokens = [1] * len(seq_ids) if new_tokens is None else [int(n) for n in new_tokens]
        _check_float_dtype("k", k, self.dtype)
        _check_float_dtype("v", v, self.dtype)
        V.check_ndim("k", k, (3,))
        V.check_shape("k", k, (sum(new_tokens), self.num_kv_heads, self.head_dim))
        V.check_shape("v", v, V.shape_of(k))
        if not seq_ids:
            return
        self.pages.reserve(seq_ids, new_tokens)  # raises, changing nothing, when the pages run out
        cp = _jit.require_gpu()
        table, lens = self.tables(seq_ids)
        with cp.cuda.Device(self.device_id):
            indptr = cp.asarray(np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int32))
        if sum(new_tokens):
            append_paged_kv(k, v, self.k_pages, self.v_pages, table, lens, append_indptr=indptr, check=False)

    def attention(self, seq_ids: Sequence[int], q, q_lens: Sequence[int] | None = None, *, causal: bool = True,
                  softmax_scale: float | None = None, return_lse: bool = False, out=None):
        """Attention of q [sum(q_lens), heads, head_dim] (default one query per sequence) over the cached
        keys of ``seq_ids``; the last q_len cached tokens of each sequence are its queries' positions."""
        seq_ids = [int(s) for s in seq_ids]
        V.check_ndim("q", q, (3,))
        table, lens = self.tables(seq_ids)
        indptr = None
        if q_lens is not None:
            indptr = np.concatenate([[0], np.cumsum([int(n) for n in q_lens])]).astype(np.int32)
        kv = self.pages.lengths(seq_ids).astype(np.int64)
        ctx = interop.call_context(q=q)
        plan = AttentionPlan(indptr, kv, num_heads=int(q.shape[1]), num_kv_heads=self.num_kv_heads,
                             head_dim=self.head_dim, page_size=self.page_size, dtype=self.dtype, causal=causal,
                             softmax_scale=softmax_scale, max_pages_per_seq=self.pages.max_pages_per_seq,
                             device=ctx.device_id)
        return plan.run(q, self.k_pages, self.v_pages, table, lens, out=out, return_lse=return_lse)
