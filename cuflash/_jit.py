"""The one place cuflash compiles CUDA code.

Every kernel lives in ``cuda_src/`` and reaches the GPU through :func:`get_kernel`:

1. the op module describes a variant with a frozen config dataclass (a :class:`KernelConfig`);
2. the loader reads the config's ``.cu`` file and, recursively, every project header it includes
   (``#include "common/x.cuh"``, always written relative to ``cuda_src/``), and hands them to NVRTC
   as in-memory headers, so the files that were hashed are exactly the files that were compiled;
3. the cache key is a hash of those texts, the name expressions, the target architecture, the
   compile options, the NVRTC version and the CUDA header version: a changed header can never run a
   stale kernel;
4. compiled cubins are cached on disk (``$CUFLASH_CACHE_DIR`` or ``~/.cache/cuflash``) and loaded
   once per (cache key, device) in memory: a module loaded for GPU 0 is never launched on GPU 1.

Compiling needs NVRTC only (``cupy.cuda.nvrtc``), no GPU and no driver, which is how CI checks that
every kernel variant builds. Loading and launching need CuPy and a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import __version__

# ----------------------------------------------------------------------------------------------
# CuPy availability
# ----------------------------------------------------------------------------------------------


class CuflashUnavailableError(RuntimeError):
    """A GPU entry point was called where CuPy, NVRTC or a GPU is missing."""


_INSTALL_HINT = (
    "install the CUDA extra matching your driver: pip install 'cuflash[cuda12]' "
    "(or 'cuflash[cuda13]')"
)


def cupy_or_none():
    """Return the cupy module, or None when it cannot be imported."""
    try:
        import cupy  # noqa: PLC0415  (imported lazily: `import cuflash` needs numpy alone)
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    return cupy


def require_cupy():
    """Return the cupy module or raise a CuflashUnavailableError naming what is missing."""
    cp = cupy_or_none()
    if cp is None:
        raise CuflashUnavailableError(f"cuflash GPU functions need CuPy, which is not installed: {_INSTALL_HINT}")
    return cp


def gpu_count() -> int:
    """Number of CUDA devices CuPy can see (0 without CuPy, driver or GPU)."""
    cp = cupy_or_none()
    if cp is None:
        return 0
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def gpu_unavailable_reason() -> str | None:
    """None when a GPU is usable, else one sentence saying what is missing."""
    cp = cupy_or_none()
    if cp is None:
        return f"CuPy is not installed ({_INSTALL_HINT})"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cudaErrorNoDevice, cudaErrorInsufficientDriver, ...
        return f"no usable CUDA GPU: {exc}"
    if n == 0:
        return "no CUDA GPU is present"
    return None


def require_gpu():
    """Return cupy when a GPU is usable, else raise CuflashUnavailableError."""
    cp = require_cupy()
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise CuflashUnavailableError(f"cuflash needs a CUDA GPU here: {reason}")
    return cp


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def source_dir() -> Path:
    """The folder holding the CUDA sources.

    In a repository checkout it is the top-level ``cuda_src/``; in an installed wheel the same files
    ship as ``cuflash/cuda_src/``. ``$CUFLASH_CUDA_SRC`` overrides both (tests use it).
    """
    env = os.environ.get("CUFLASH_CUDA_SRC")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here / "cuda_src", here.parent / "cuda_src"):
        if (cand / "common").is_dir():
            return cand
    raise CuflashUnavailableError(
        f"cuflash could not find its CUDA sources (looked in {here / 'cuda_src'} and {here.parent / 'cuda_src'}); "
        "reinstall the package"
    )


def collect_sources(main: str, root: Path | None = None) -> dict[str, str]:
    """Read ``main`` and every project header it reaches, keyed by path relative to ``root``.

    Includes in double quotes must name a file under ``root`` (``#include "common/fp4.cuh"``);
    angle-bracket includes are CUDA's own headers and are covered by the version fields of the key.
    """
    root = source_dir() if root is None else root
    out: dict[str, str] = {}
    stack = [main]
    while stack:
        rel = stack.pop()
        if rel in out:
            continue
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"CUDA source {rel!r} not found under {root}")
        text = path.read_text()
        out[rel] = text
        for inc in _INCLUDE_RE.findall(text):
            if not (root / inc).is_file():
                raise FileNotFoundError(
                    f"{rel}: #include \"{inc}\" must name a file relative to {root} (none found)"
                )
            stack.append(inc)
    return out


def source_tree_hash(root: Path | None = None) -> str:
    """sha256 over every .cu/.cuh file under the source folder (for `python -m cuflash info`)."""
    root = source_dir() if root is None else root
    h = hashlib.sha256()
    for p in sorted(list(root.rglob("*.cu")) + list(root.rglob("*.cuh"))):
        h.update(str(p.relative_to(root)).encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

ARCH_PORTABLE = "portable"  # sm_80+: compiled for the device's own architecture
ARCH_HOPPER = "hopper"  # wgmma/TMA/setmaxnreg: sm_90a only

#: Architectures CI compiles each family for (NVRTC needs no GPU to do so).
TARGET_ARCHS = {ARCH_PORTABLE: ("sm_80", "sm_90"), ARCH_HOPPER: ("sm_90a",)}


class KernelConfig:
    """Base of every op's frozen config dataclass.

    Subclasses set ``source`` (a file in ``cuda_src/``) and ``family`` (ARCH_PORTABLE or
    ARCH_HOPPER) and implement :meth:`name_expressions` (the template instantiations to compile,
    e.g. ``"nvfp4_quantize<__half>"``) and :meth:`kernel_name` (a readable name listing every
    specialisation). ``defines()`` may add ``-D`` options.
    """

    source: str = ""
    family: str = ARCH_PORTABLE

    def name_expressions(self) -> tuple[str, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def kernel_name(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def defines(self) -> tuple[str, ...]:
        return ()

    def arch_for(self, cc: tuple[int, int]) -> str:
        """The -arch to build this variant with for a device of compute capability ``cc``."""
        if self.family == ARCH_HOPPER:
            if cc != (9, 0):
                raise CuflashUnavailableError(
                    f"{self.kernel_name()} needs a Hopper GPU (compute capability 9.0), got {cc[0]}.{cc[1]}"
                )
            return "sm_90a"
        if cc < (8, 0):
            raise CuflashUnavailableError(
                f"{self.kernel_name()} needs compute capability 8.0 or newer, got {cc[0]}.{cc[1]}"
            )
        major, minor = cc
        supported = nvrtc_supported_archs()
        want = major * 10 + minor
        # A device newer than this NVRTC knows runs the newest SASS of its own major version.
        best = max((a for a in supported if a <= want and a // 10 == major), default=None)
        if best is None:
            best = max(a for a in supported if a <= want)
        return f"sm_{best}"


# ----------------------------------------------------------------------------------------------
# NVRTC
# ----------------------------------------------------------------------------------------------

_BASE_OPTIONS = ("-std=c++17", "-lineinfo", "-DCUFLASH_NVRTC=1")


def _nvrtc():
    cp = require_cupy()
    return cp.cuda.nvrtc


def nvrtc_version() -> tuple[int, int]:
    return tuple(_nvrtc().getVersion())


def nvrtc_supported_archs() -> tuple[int, ...]:
    try:
        return tuple(_nvrtc().getSupportedArchs())
    except Exception:  # very old NVRTC
        return (80, 86, 89, 90)


def cuda_include_dir() -> str:
    """Folder holding CUDA's runtime headers (cuda_fp16.h, ...), matched to NVRTC where possible.

    Order: $CUFLASH_CUDA_INCLUDE; the pip wheel found by cuda-pathfinder (CuPy's own way);
    $CUDA_PATH / $CUDA_HOME / /usr/local/cuda.
    """
    env = os.environ.get("CUFLASH_CUDA_INCLUDE")
    candidates = [env] if env else []
    try:
        from cuda import pathfinder  # noqa: PLC0415 (ships with CuPy >= 14)

        d = pathfinder.find_nvidia_header_directory("cudart")
        if d:
            candidates.append(d)
    except Exception:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "cuda_fp16.h")):
            return c
    raise CuflashUnavailableError(
        "cuflash could not find CUDA's runtime headers (cuda_fp16.h) that NVRTC needs: "
        f"{_INSTALL_HINT}, or set CUFLASH_CUDA_INCLUDE"
    )


def cuda_header_version(include_dir: str) -> int:
    """CUDART_VERSION of the headers in ``include_dir`` (0 if it cannot be read)."""
    try:
        text = Path(include_dir, "cuda_runtime_api.h").read_text(errors="replace")
    except OSError:
        return 0
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text)
    return int(m.group(1)) if m else 0


class CompileError(RuntimeError):
    """NVRTC rejected a kernel; the message holds its log with real file names."""


@dataclass(frozen=True)
class CompiledModule:
    key: str
    arch: str
    cubin: bytes
    lowered: dict  # name expression -> mangled name
    log: str


def _options(config: KernelConfig, arch: str, include_dir: str) -> tuple[str, ...]:
    return _BASE_OPTIONS + (f"-arch={arch}", f"-I{include_dir}") + tuple(config.defines())


def cache_key(config: KernelConfig, arch: str, root: Path | None = None) -> str:
    """Hash of everything that goes into the compiled module."""
    include_dir = cuda_include_dir()
    sources = collect_sources(config.source, root)
    payload = {
        "cuflash": __version__,
        "sources": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(sources.items())},
        "main": config.source,
        "names": list(config.name_expressions()),
        "arch": arch,
        # the include path itself is left out: its contents are pinned by the header version
        "options": [o for o in _options(config, arch, include_dir) if not o.startswith("-I")],
        "nvrtc": list(nvrtc_version()),
        "cuda_headers": cuda_header_version(include_dir),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    env = os.environ.get("CUFLASH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cuflash" / "kernels"


def _line_directive(root: Path, rel: str, text: str) -> str:
    # Compile errors then name the real file, not NVRTC's in-memory name.
    return f'#line 1 "{(root / rel).as_posix()}"\n{text}'


def compile_module(config: KernelConfig, arch: str, *, root: Path | None = None, use_disk_cache=True) -> CompiledModule:
    """Compile ``config`` for ``arch`` (e.g. "sm_90a") through NVRTC. Needs no GPU."""
    nvrtc = _nvrtc()
    root = source_dir() if root is None else root
    key = cache_key(config, arch, root)
    cdir = cache_dir()
    cubin_path, meta_path = cdir / f"{key}.cubin", cdir / f"{key}.json"
    if use_disk_cache and cubin_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            return CompiledModule(key, arch, cubin_path.read_bytes(), meta["lowered"], meta.get("log", ""))
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is rebuilt below

    sources = collect_sources(config.source, root)
    main_text = _line_directive(root, config.source, sources.pop(config.source))
    header_names = sorted(sources)
    header_texts = [_line_directive(root, h, sources[h]) for h in header_names]
    include_dir = cuda_include_dir()
    opts = list(_options(config, arch, include_dir))
    prog = nvrtc.createProgram(
        main_text, config.source, [t.encode() for t in header_texts], [h.encode() for h in header_names]
    )
    try:
        names = config.name_expressions()
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise CompileError(f"NVRTC failed to compile {config.kernel_name()} for {arch}: {exc}\n{log}") from None
        log = nvrtc.getProgramLog(prog)
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    mod = CompiledModule(key, arch, bytes(cubin), lowered, log)
    if use_disk_cache:
        _store(cdir, key, mod, config)
    return mod


def _store(cdir: Path, key: str, mod: CompiledModule, config: KernelConfig) -> None:
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        for suffix, data in (
            (".cubin", mod.cubin),
            (".json", json.dumps({"lowered": mod.lowered, "log": mod.log, "name": config.kernel_name(), "arch": mod.arch}).encode()),
        ):
            tmp = cdir / f"{key}{suffix}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, cdir / f"{key}{suffix}")
    except OSError:
        pass  # a read-only home still works, compiling once per process


# ----------------------------------------------------------------------------------------------
# Loading and launching
# ----------------------------------------------------------------------------------------------

_lock = threading.RLock()
_modules: dict[tuple[str, int], object] = {}  # (cache key, device id) -> cupy Module
_kernels: dict[tuple[KernelConfig, str, int], "Kernel"] = {}
_device_info: dict[int, dict] = {}

_SMEM_DEFAULT_LIMIT = 48 * 1024  # above this a kernel must opt in through a function attribute
#: Scalar types a kernel argument may have; anything else (a bare Python int or float) is refused,
#: since CuPy would pass it with a width the kernel may not expect.
_SCALAR_TYPES = (np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64, np.uint8, np.int8, np.int16, np.uint16)


def _device_props(device_id: int) -> dict:
    """The few device properties launches need, read once per device (the query costs ~100 us)."""
    props = _device_info.get(device_id)
    if props is None:
        with _lock:
            cp = require_cupy()
            p = cp.cuda.runtime.getDeviceProperties(device_id)
            props = {
                "cc": (int(p["major"]), int(p["minor"])),
                "sms": int(p["multiProcessorCount"]),
                "smem_per_block_optin": int(p["sharedMemPerBlockOptin"]),
                "smem_per_sm": int(p["sharedMemPerMultiprocessor"]),
            }
            _device_info[device_id] = props
    return props


def device_cc(device_id: int) -> tuple[int, int]:
    return _device_props(device_id)["cc"]


def sm_count(device_id: int) -> int:
    return _device_props(device_id)["sms"]


def smem_per_block_optin(device_id: int) -> int:
    """Largest dynamic shared memory a block may opt in to (227 KB on an H100)."""
    return _device_props(device_id)["smem_per_block_optin"]


def smem_per_sm(device_id: int) -> int:
    return _device_props(device_id)["smem_per_sm"]


def _dim3(x) -> tuple[int, ...]:
    """A grid or block size (an int or a tuple of up to three) as a tuple of ints."""
    return tuple(int(v) for v in (x if isinstance(x, tuple) else (x,)))


class Kernel:
    """A compiled kernel bound to one device. Call it through :meth:`launch`."""

    def __init__(self, function, name: str, device_id: int):
        self.function = function
        self.name = name
        self.device_id = device_id
        self._smem_opt_in = _SMEM_DEFAULT_LIMIT
        self._occupancy: dict[tuple[int, int], int] = {}

    def resident_blocks_per_sm(self, threads: int, smem: int) -> int:
        """CTAs of this kernel one SM holds at once (registers and shared memory counted by the
        driver's occupancy calculator), cached per (threads, smem)."""
        key = (int(threads), int(smem))
        n = self._occupancy.get(key)
        if n is None:
            cp = require_cupy()
            drv = cp.cuda.driver
            with cp.cuda.Device(self.device_id):
                self._opt_in_smem(cp, smem)
                n = max(1, int(drv.occupancyMaxActiveBlocksPerMultiprocessor(self.function.ptr, int(threads), int(smem))))
            self._occupancy[key] = n
        return n

    def _opt_in_smem(self, cp, smem: int) -> None:
        if smem > self._smem_opt_in:
            cp.cuda.driver.funcSetAttribute(
                self.function.ptr, cp.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem
            )
            self._smem_opt_in = smem

    def launch(self, grid, block, args: Sequence, *, stream, smem: int = 0) -> None:
        """Launch on ``stream`` (a cupy Stream of this kernel's device).

        Every argument must be a cupy array (passed as a device pointer) or a numpy scalar of an
        explicit width (np.int32, np.float32, ...).
        """
        cp = require_cupy()
        check_launch_args(self.name, args, cp.ndarray)
        smem = int(smem)
        grid, block = _dim3(grid), _dim3(block)
        if min(grid) == 0:
            return  # nothing to do; CUDA rejects empty grids
        with cp.cuda.Device(self.device_id):
            self._opt_in_smem(cp, smem)
            self.function(grid, block, tuple(args), shared_mem=smem, stream=stream)


# ----------------------------------------------------------------------------------------------
# Programmatic dependent launch (sm_90): cuLaunchKernelEx through ctypes (CuPy launches have no
# launch attributes). A kernel launched this way may start while the kernel before it in the stream
# still runs; its device code must call griddep_wait (common/wgmma.cuh) before reading what that
# kernel writes. CUFLASH_PDL=0 turns it off (every launch plain, same results).
# ----------------------------------------------------------------------------------------------

PDL_ENV = "CUFLASH_PDL"
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # cuda.h, CUlaunchAttributeID
_launch_ex_fn = None  # cuLaunchKernelEx, False once known to be missing


def _launch_ex():
    """libcuda's cuLaunchKernelEx as a ctypes function, or None (no driver, or one before CUDA 12)."""
    global _launch_ex_fn
    if _launch_ex_fn is None:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            _launch_ex_fn = fn
        except (OSError, AttributeError):
            _launch_ex_fn = False
    return _launch_ex_fn or None


class CuLaunchAttribute(ctypes.Structure):
    """cuda.h CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union (72 bytes)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class CuLaunchConfig(ctypes.Structure):
    """cuda.h CUlaunchConfig (56 bytes on 64-bit hosts)."""
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(CuLaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_CTYPES_OF = {np.dtype(np.int32): "c_int32", np.dtype(np.uint32): "c_uint32", np.dtype(np.int64): "c_int64",
              np.dtype(np.uint64): "c_uint64", np.dtype(np.float32): "c_float", np.dtype(np.float64): "c_double",
              np.dtype(np.int8): "c_int8", np.dtype(np.uint8): "c_uint8", np.dtype(np.int16): "c_int16",
              np.dtype(np.uint16): "c_uint16"}


class ProgrammaticLaunch:
    """One launch of a kernel with the programmatic stream serialization attribute, its arguments
    marshalled once (a prepared GEMM replays it). :meth:`launch` falls back to a plain launch where
    cuLaunchKernelEx is missing, CUFLASH_PDL=0, or the driver refuses the attribute."""

    def __init__(self, kernel: "Kernel", grid, block, args: Sequence, smem: int):
        cp = require_cupy()
        check_launch_args(kernel.name, args, cp.ndarray)
        self.kernel, self.args, self.smem = kernel, tuple(args), int(smem)
        self.grid, self.block = _dim3(grid), _dim3(block)

        self._attr = CuLaunchAttribute(_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
        self._attr.value[0] = 1  # programmaticStreamSerializationAllowed
        g3, b3 = (self.grid + (1, 1))[:3], (self.block + (1, 1))[:3]
        self._config = CuLaunchConfig((ctypes.c_uint * 3)(*g3), (ctypes.c_uint * 3)(*b3), self.smem, None,
                              ctypes.pointer(self._attr), 1)
        self._values = [ctypes.c_uint64(a.data.ptr) if isinstance(a, cp.ndarray)
                        else getattr(ctypes, _CTYPES_OF[np.dtype(type(a))])(a) for a in self.args]
        self._params = (ctypes.c_void_p * max(1, len(self._values)))(
            *[ctypes.addressof(v) for v in self._values])

    def launch(self, stream) -> None:
        fn = _launch_ex()
        if min(self.grid) == 0:
            return
        if fn is None or os.environ.get(PDL_ENV) == "0":
            self.kernel.launch(self.grid, self.block, self.args, stream=stream, smem=self.smem)
            return
        cp = require_cupy()
        with cp.cuda.Device(self.kernel.device_id):
            self.kernel._opt_in_smem(cp, self.smem)
            config = CuLaunchConfig.from_buffer_copy(self._config)  # per call: replays may run on other threads
            config.stream = stream.ptr
            err = fn(ctypes.addressof(config), self.kernel.function.ptr, self._params, None)
        if err != 0:  # e.g. a driver without programmatic launches: nothing was queued
            global _launch_ex_fn
            _launch_ex_fn = False
            self.kernel.launch(self.grid, self.block, self.args, stream=stream, smem=self.smem)


@dataclass
class Launch:
    """One kernel launch with its arguments fixed: what an op prepares once and replays (the GEMM's
    prepared calls, an attention plan's runs). ``programmatic``: launched with programmatic dependent
    launch (see ProgrammaticLaunch) after the launch before it."""

    kernel: Kernel
    grid: Any  # int or tuple
    threads: Any  # int or tuple
    smem: int
    args: tuple
    programmatic: bool = False
    _pdl: Any = None  # the ProgrammaticLaunch, made at the first launch

    def launch(self, stream) -> None:
        if self.programmatic:
            if self._pdl is None:
                self._pdl = ProgrammaticLaunch(self.kernel, self.grid, self.threads, self.args, self.smem)
            self._pdl.launch(stream)
        else:
            self.kernel.launch(self.grid, self.threads, self.args, stream=stream, smem=self.smem)


def check_launch_args(name: str, args: Sequence, array_type) -> None:
    for i, a in enumerate(args):
        if isinstance(a, array_type) or isinstance(a, _SCALAR_TYPES):
            continue
        raise TypeError(
            f"{name}: launch argument {i} must be a device array or a numpy scalar of explicit width "
            f"(np.int32, np.float32, ...), got {type(a).__name__}"
        )


def get_kernel(config: KernelConfig, name_expression: str, device_id: int) -> Kernel:
    """The kernel ``name_expression`` of ``config``, compiled for and loaded on ``device_id``."""
    k = _kernels.get((config, name_expression, device_id))
    if k is not None:
        return k
    cp = require_gpu()
    with _lock:
        k = _kernels.get((config, name_expression, device_id))
        if k is not None:
            return k
        arch = config.arch_for(device_cc(device_id))
        compiled = compile_module(config, arch)
        mkey = (compiled.key, device_id)
        module = _modules.get(mkey)
        if module is None:
            with cp.cuda.Device(device_id):
                module = cp.cuda.function.Module()
                module.load(compiled.cubin)
            _modules[mkey] = module
        fn = module.get_function(compiled.lowered[name_expression])
        k = Kernel(fn, f"{config.kernel_name()}::{name_expression}", device_id)
        _kernels[(config, name_expression, device_id)] = k
        return k


def compile_all(configs: Iterable[KernelConfig], archs: Sequence[str] | None = None, **kw) -> list[CompiledModule]:
    """Compile every config for each of its family's target architectures (used by CI)."""
    out = []
    for c in configs:
        for arch in archs or TARGET_ARCHS[c.family]:
            out.append(compile_module(c, arch, **kw))
    return out
