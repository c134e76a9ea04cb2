"""Run cuflash's real CUDA kernels on the CPU: g++ compiles ``cuda_src/`` with a host shim.

How it works:

- ``cuda_host_shim.h`` (passed with ``g++ -include``) provides the CUDA execution model on the host:
  ``threadIdx`` & co., ``__syncthreads``, warp shuffles, atomics and the few intrinsics the kernels
  use. A launch runs the grid one block at a time; each CUDA thread is a fiber on one OS thread,
  switched only at barriers and warp collectives, so runs are deterministic and a barrier that can
  never complete is reported as a deadlock instead of hanging.
- ``cuda_src/`` is copied to a build folder, the only files with inline PTX are replaced
  (``OVERLAYS``): ``common/mma.cuh`` by ``mma_emulated.cuh`` (cp.async, ldmatrix, mma.sync and
  ex2.approx written from the PTX ISA), ``common/wgmma.cuh`` by ``wgmma_emulated.cuh`` (wgmma.mma_async
  with its matrix descriptors, fences and commit groups, fence.proxy.async), ``common/mbarrier.cuh`` by
  ``mbarrier_emulated.cuh`` (mbarrier.init / arrive / try_wait.parity; a wait blocks its thread until
  the barrier's phase changes, so a wait nothing can complete is a deadlock), and every
  ``extern __shared__ T name[];`` becomes a pointer to the block's dynamic shared memory. Nothing else
  in the kernel source changes.
- ``include/`` holds minimal host stand-ins for ``crt/host_defines.h`` and ``<nv/target>``, which the
  cudart wheel's ``cuda_fp16.h`` / ``cuda_bf16.h`` / ``cuda_fp8.h`` include but do not ship.
- One shared library per (source file, kernel instantiations), cached by a hash of everything that
  goes into it, loaded with ctypes. Kernel arguments are numpy arrays (passed as host addresses) and
  numpy scalars of the kernel's parameter types, exactly as a CuPy launch takes them.

Checks the emulation adds: cp.async / ldmatrix / wgmma operand addresses inside the block's dynamic
shared memory and aligned, shared memory filled with NaN bytes before every block and guarded after
it, cp.async data landing only at the cp.async.wait_group that retires its group; wgmma results
reaching the accumulators only at the wgmma.wait_group that retires them (NaN before), a wgmma.fence
before each batch of wgmmas, cp.async data read by wgmma only after its fence.proxy.async; mbarriers
in shared memory, 8-byte aligned, initialised once (count 1..2^20-1) and by another thread only after a
__syncthreads, their bytes not overwritten, wait parity 0 or 1.

Tests may also compile a source text of their own (``build(name, kernels, text=...)``): it is placed
next to the copy of ``cuda_src/``, so it includes the headers as the kernels do (``"common/mbarrier.cuh"``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
SHIM = HERE / "cuda_host_shim.h"
MMA = HERE / "mma_emulated.cuh"
#: cuda_src files holding inline PTX -> their host stand-ins (no other file may contain asm).
OVERLAYS = {"common/mma.cuh": MMA, "common/wgmma.cuh": HERE / "wgmma_emulated.cuh",
            "common/mbarrier.cuh": HERE / "mbarrier_emulated.cuh"}
INCLUDE = HERE / "include"
CXX_FLAGS = ("-std=c++20", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-ffp-contract=off", "-w")

_SHARED_RE = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:<>\s]*?)\s+(\w+)\s*\[\s*\]\s*;")
_lock = threading.Lock()
SCHEDULES = {"round_robin": 0, "low_first": 1, "high_first": 2}


class EmulatorError(RuntimeError):
    """A kernel launch failed in the emulator (deadlock, bad shared-memory access, ...)."""


def unavailable_reason() -> str | None:
    """Why the emulator cannot run here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    try:
        from cuflash import _jit

        _jit.cuda_include_dir()
    except Exception as e:  # noqa: BLE001
        return f"CUDA headers (cuda_fp16.h) not found: {e}"
    return None


def _cache_dir() -> Path:
    d = os.environ.get("CUFLASH_EMU_CACHE") or os.path.join(tempfile.gettempdir(), f"cuflash-emu-{os.getuid()}")
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


def _rewrite_shared(text: str, name: str) -> str:
    text = _SHARED_RE.sub(lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::cuemu::dynamic_smem());",
                          text)
    if "__shared__" in text:
        raise EmulatorError(f"{name}: a __shared__ declaration the emulator cannot rewrite (only `extern __shared__ T x[];`)")
    return text


def _main_cpp(source: str, kernels: Sequence[str]) -> str:
    lines = [f'#include "{source}"', ""]
    for i, k in enumerate(kernels):
        lines.append(
            f"extern \"C\" int cuemu_k{i}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, "
            f"size_t smem, void** args) {{\n"
            f"  return cuemu::launch(&{k}, dim3(gx, gy, gz), dim3(bx, by, bz), smem, args);\n}}"
        )
    lines.append('extern "C" const char* cuemu_error() { return cuemu::error(); }')
    lines.append('extern "C" void cuemu_set_schedule(int s) { cuemu::S().schedule = s; }')
    return "\n".join(lines) + "\n"


class Module:
    """The kernels of one source file, compiled for the host."""

    def __init__(self, path: Path, kernels: Sequence[str]):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.cuemu_error.restype = ctypes.c_char_p
        self._fns = {}
        for i, k in enumerate(kernels):
            fn = getattr(self._lib, f"cuemu_k{i}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
            self._fns[k] = fn

    def launch(self, kernel: str, grid, block, args: Sequence, smem: int = 0, schedule: str = "round_robin") -> None:
        """Launch ``kernel`` (a name expression given to :func:`build`) on the host.

        grid / block: int or up to 3 ints. args: numpy arrays (their addresses), numpy scalars
        (np.int32 -> int, np.int64 -> long long, np.float32 -> float, np.uint64 -> a raw address) or
        ctypes values, in the kernel's parameter order. schedule: the order in which a block's runnable
        threads resume after a synchronization point: "round_robin" (every thread advances one
        step in turn: warps move in lockstep), "low_first" / "high_first" (the lowest / highest
        runnable thread first: one warp runs as far ahead of the others as the block barriers
        allow, which exposes missing __syncthreads between warps).
        """
        g = _dim3(grid)
        b = _dim3(block)
        vals = [_c_value(a) for a in args]
        ptrs = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        with _lock:
            self._lib.cuemu_set_schedule(SCHEDULES[schedule])
            rc = self._fns[kernel](*g, *b, int(smem), ptrs)
            if rc != 0:
                raise EmulatorError(f"{kernel}: {self._lib.cuemu_error().decode()}")


def _dim3(x) -> tuple[int, int, int]:
    t = (int(x),) if np.ndim(x) == 0 else tuple(int(v) for v in x)
    return t + (1,) * (3 - len(t))


def _c_value(a):
    if isinstance(a, np.ndarray):
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.uint64):
        return ctypes.c_uint64(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    if isinstance(a, ctypes._SimpleCData):
        return a
    raise TypeError(f"kernel argument of type {type(a).__name__}: pass a numpy array, a sized numpy scalar or a ctypes value")


def _key(source: str, kernels: Sequence[str], src_root: Path, include_dir: str, text: str | None) -> str:
    h = hashlib.sha256()
    for p in sorted(list(src_root.rglob("*.cu")) + list(src_root.rglob("*.cuh"))) + sorted(
        [SHIM, *OVERLAYS.values()] + [p for p in INCLUDE.rglob("*") if p.is_file()]
    ):
        h.update(str(p).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(repr((source, tuple(kernels), CXX_FLAGS, include_dir, text)).encode())
    h.update(subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:24]


def _prepare(source: str, kernels: Sequence[str], text: str | None = None):
    """(library path, compile command or None if cached, build folder or None). text: the source of
    ``source`` when it is not a file of cuda_src (a test's own kernels)."""
    from cuflash import _jit

    src_root = _jit.source_dir()
    if text is not None and (src_root / source).exists():
        raise EmulatorError(f"{source}: a file of cuda_src/ already has this name")
    include_dir = _jit.cuda_include_dir()
    key = _key(source, kernels, src_root, include_dir, text)
    lib = _cache_dir() / f"{Path(source).stem}-{key}.so"
    if lib.is_file():
        return lib, None, None
    build = Path(tempfile.mkdtemp(prefix="cuflash-emu-build-"))
    for p in list(src_root.rglob("*.cu")) + list(src_root.rglob("*.cuh")):
        rel = p.relative_to(src_root)
        dst = build / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        overlay = OVERLAYS.get(rel.as_posix())
        dst.write_text(_rewrite_shared(overlay.read_text() if overlay is not None else p.read_text(), rel.as_posix()))
    if text is not None:
        (build / source).write_text(_rewrite_shared(text, source))
    (build / "cuemu_main.cpp").write_text(_main_cpp(source, kernels))
    tmp_out = build / "out.so"
    cmd = ["g++", *CXX_FLAGS, "-include", str(SHIM), f"-I{INCLUDE}", f"-I{include_dir}", f"-I{build}",
           str(build / "cuemu_main.cpp"), "-o", str(tmp_out)]
    return lib, cmd, build


def build_many(requests: Sequence[tuple]) -> list[Module]:
    """Compile several (source, kernel name expressions[, source text]) modules, the missing ones in
    parallel (see :func:`build`)."""
    prepared = [_prepare(*req) for req in requests]
    procs = [(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) if cmd else None)
             for _, cmd, _ in prepared]
    try:
        for (lib, cmd, build), proc in zip(prepared, procs):
            if proc is None:
                continue
            log, _ = proc.communicate()
            if proc.returncode != 0:
                raise EmulatorError(f"g++ failed ({' '.join(cmd)}):\n{log[-6000:]}")
            os.replace(build / "out.so", lib)  # atomic: concurrent builders at worst both compile
    finally:
        for p in procs:
            if p is not None and p.poll() is None:
                p.kill()
        for _, _, build in prepared:
            if build is not None:
                shutil.rmtree(build, ignore_errors=True)
    return [Module(lib, req[1]) for (lib, _, _), req in zip(prepared, requests)]


def build(source: str, kernels: Sequence[str], text: str | None = None) -> Module:
    """Compile (or load from the cache) the host build of ``source`` (e.g. "gemm.cu") exporting the
    given kernel name expressions (e.g. "cuflash::group_gemm_kernel<16, 1, 4, 0, false, 1>").
    text: a test's own source for ``source`` (a name not in cuda_src/, e.g. "test_mbarrier.cu"),
    compiled next to the copy of cuda_src/ like its files."""
    return build_many([(source, kernels, text)])[0]
