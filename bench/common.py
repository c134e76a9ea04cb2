"""The one timing helper every benchmark in bench/ shares.

- ``require_gpu_or_exit()``: on a machine without a usable GPU, print one sentence and exit 1.
- ``time_fn(fn)``: CUDA events around each call after warm-up, the L2 cache flushed before each
  call (a write over a buffer twice the L2 size; ``flush="clean"`` reads another one after it, so the
  L2 holds clean lines), median with p20/p80, in microseconds.
- ``measure_ceilings()``: the device-to-device copy bandwidth (bytes read + written) and the fp16
  matmul rate through torch (cuBLAS), measured in the run itself; floors come from these.
- ``Results``: records (op, case, impl, median_us, derived TFLOP/s and TB/s), a GitHub table, JSON.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def require_gpu_or_exit():
    """Return cupy, or print why no GPU can be used and exit with status 1."""
    from cuflash import _jit

    reason = _jit.gpu_unavailable_reason()
    if reason is not None:
        print(f"This benchmark needs a CUDA GPU and none can be used here: {reason}.", file=sys.stderr)
        sys.exit(1)
    return _jit.require_cupy()


def _percentile(xs, q):
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


@dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    n: int


FLUSH_MODES = ("write", "clean")


class _L2Flusher:
    """Evicts the timed call's data from the L2 cache before each call. "write" (the default, as the peer
    timings in ../shared/DEVICE.md were taken): a write over a buffer twice the L2 size, so the call
    starts with the L2 full of dirty lines whose write-back it pays for while it reads. "clean": the same
    write, then a read of another such buffer, so the L2 holds clean lines (closer to a serving step,
    whose previous kernels write little)."""

    def __init__(self, cp, mode: str = "write"):
        if mode not in FLUSH_MODES:
            raise ValueError(f"flush: expected one of {FLUSH_MODES}, got {mode!r}")
        l2 = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["l2CacheSize"]
        n = max(2 * l2, 64 << 20) // 4
        self.buf = cp.empty(n, dtype=cp.int32)
        self.clean = cp.ones(n, dtype=cp.int32) if mode == "clean" else None

    def __call__(self):
        self.buf.fill(1)
        if self.clean is not None:
            self.clean.max()


#: GPU cycles of the busy-wait queued before a host-hidden measurement (~1 ms at H100 clocks): longer
#: than any call's host work, so the call's launches are queued before the start event fires.
HIDE_HOST_CYCLES = 2_000_000


def time_fn(fn, *, warmup: int = 5, iters: int = 50, flush_l2: bool = True, stream=None,
            hide_host: bool = False, flush: str = "write") -> Timing:
    """Median time of ``fn()`` in microseconds, CUDA events around each call on ``stream``.

    By default this is the time of a call as a caller sees it when the GPU is idle: the host work
    before the first launch (validation, cache lookups) counts when it is longer than the L2 flush
    queued before the start event. ``hide_host=True`` queues a busy-wait kernel (torch.cuda._sleep, on
    torch's current stream, which must be ``stream``) before the start event, so the host has queued
    fn's launches by the time it fires: the GPU time of the call alone. ``flush``: how the L2 is
    flushed when ``flush_l2`` (see _L2Flusher).
    """
    import cupy as cp

    stream = stream or cp.cuda.get_current_stream()
    flusher = _L2Flusher(cp, flush) if flush_l2 else (lambda: None)
    sleep = None
    if hide_host:
        import torch

        if torch.cuda.current_stream().cuda_stream != stream.ptr:
            raise ValueError("hide_host: the busy-wait runs on torch's current stream, so `stream` must be it")
        sleep = lambda: torch.cuda._sleep(HIDE_HOST_CYCLES)  # noqa: E731
    for _ in range(warmup):
        fn()
    stream.synchronize()
    times = []
    for _ in range(iters):
        with stream:  # the flush is ordered before the timed region on the same stream
            flusher()
        if sleep is not None:
            sleep()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
    return Timing(statistics.median(times), _percentile(times, 0.2), _percentile(times, 0.8), len(times))


def gemm_operands(cp, rng, G: int, M: int, N: int, K: int, form: str):
    """Random CuPy operands of a G-group GEMM (M x N x K each): (A, B, SA, SB) as cuflash.group_gemm
    takes them. B: packed NVFP4 with e4m3 scales in [2^-3, 2) (exponent fields 4..7, positive);
    A: the same kind (form "W4A4", SA its scales) or standard-normal fp16 (form "W4A16", SA None)."""
    import numpy as np

    bits = lambda *shape: cp.asarray(rng.integers(0, 256, shape, dtype=np.uint8))  # noqa: E731
    scales = lambda rows: cp.asarray(rng.integers(0x20, 0x40, (rows, K // 16), dtype=np.uint8))  # noqa: E731
    B, SB = [bits(N, K // 2) for _ in range(G)], [scales(N) for _ in range(G)]
    if form == "W4A4":
        return [bits(M, K // 2) for _ in range(G)], B, [scales(M) for _ in range(G)], SB
    return [cp.asarray(rng.standard_normal((M, K), dtype=np.float32)).astype(cp.float16) for _ in range(G)], B, None, SB


def moe_operands(cp, rng, G: int, rows: tuple[int, int], N: int, K: int, form: str):
    """Random CuPy operands of a ragged MoE call (cuflash.group_gemm_ragged), experts of rows[0]..rows[1]
    token rows each: (a, b, sa, sb, offsets), b [G, N, K/2] stacked NVFP4 experts; tokens and scales as
    gemm_operands draws them (W4A16: sa None)."""
    import numpy as np

    counts = rng.integers(rows[0], rows[1] + 1, G)
    offsets = cp.asarray(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    total = int(counts.sum())
    b = cp.asarray(rng.integers(0, 256, (G, N, K // 2), dtype=np.uint8))
    sb = cp.asarray(rng.integers(0x20, 0x40, (G, N, K // 16), dtype=np.uint8))
    if form == "W4A4":
        a = cp.asarray(rng.integers(0, 256, (total, K // 2), dtype=np.uint8))
        sa = cp.asarray(rng.integers(0x20, 0x40, (total, K // 16), dtype=np.uint8))
    else:
        a, sa = cp.asarray(rng.standard_normal((total, K), dtype=np.float32)).astype(cp.float16), None
    return a, b, sa, sb, offsets


def moe_bytes(G: int, total: int, N: int, K: int, form: str) -> int:
    """Bytes a ragged MoE call moves at least once: G NVFP4 experts [N, K] with their scales, the
    ``total`` token rows (NVFP4 with scales in W4A4, fp16 in W4A16) and the fp16 output [total, N]."""
    tokens = total * (K // 2 + K // 16) if form == "W4A4" else 2 * total * K
    return tokens + G * (N * K // 2 + N * K // 16) + 2 * total * N


def measure_ceilings(torch_available: bool = True) -> dict:
    """Copy bandwidth (TB/s, bytes read + written) and fp16 matmul TFLOP/s, measured here."""
    import cupy as cp

    n = 1 << 30  # 1 GiB copied
    src = cp.ones(n // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    t = time_fn(lambda: dst.__setitem__(Ellipsis, src), warmup=3, iters=20, flush_l2=False)
    out = {"copy_TBps": 2 * n / (t.median_us * 1e-6) / 1e12}
    if torch_available:
        import torch

        m = 8192
        a = torch.randn(m, m, device="cuda", dtype=torch.float16)
        b = torch.randn(m, m, device="cuda", dtype=torch.float16)
        ext = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        t = time_fn(lambda: torch.matmul(a, b), warmup=3, iters=10, flush_l2=False, stream=ext)
        out["fp16_TFLOPs"] = 2 * m**3 / (t.median_us * 1e-6) / 1e12
    return out


def environment() -> dict:
    import cupy as cp

    from cuflash import _jit

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    env = {
        "gpu": name,
        "sms": props["multiProcessorCount"],
        "cupy": cp.__version__,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "nvrtc": ".".join(map(str, _jit.nvrtc_version())),
        "python": platform.python_version(),
        "kernel_source_hash": _jit.source_tree_hash()[:16],
    }
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    return env


@dataclass
class Record:
    op: str
    case: str
    impl: str
    median_us: float
    p20_us: float
    p80_us: float
    tflops: float | None = None
    tbps: float | None = None
    extra: dict = field(default_factory=dict)


class Results:
    def __init__(self):
        self.records: list[Record] = []

    def add(self, op, case, impl, timing: Timing, *, flops=None, nbytes=None, **extra) -> Record:
        sec = timing.median_us * 1e-6
        r = Record(
            op, case, impl, round(timing.median_us, 2), round(timing.p20_us, 2), round(timing.p80_us, 2),
            round(flops / sec / 1e12, 1) if flops else None,
            round(nbytes / sec / 1e12, 3) if nbytes else None,
            extra,
        )
        self.records.append(r)
        return r

    def table(self, baseline_impl: str | None = None) -> str:
        rows = ["| op | case | impl | median us | p20-p80 us | TFLOP/s | TB/s |" + (" speedup |" if baseline_impl else ""),
                "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if baseline_impl else "")]
        base = {(r.op, r.case): r.median_us for r in self.records if r.impl == baseline_impl}
        for r in self.records:
            line = (f"| {r.op} | {r.case} | {r.impl} | {r.median_us:.1f} | {r.p20_us:.1f}-{r.p80_us:.1f} | "
                    f"{'' if r.tflops is None else r.tflops} | {'' if r.tbps is None else r.tbps} |")
            if baseline_impl:
                b = base.get((r.op, r.case))
                line += f" {b / r.median_us:.2f}x |" if b else " |"
            rows.append(line)
        return "\n".join(rows)

    def write_json(self, path, meta: dict) -> None:
        Path(path).write_text(json.dumps({"meta": meta, "records": [asdict(r) for r in self.records]}, indent=1))
