"""``python -m cuflash info``: the GPU, CuPy, CUDA and NVRTC versions, the kernels' source hash and
where compiled kernels are cached."""

from __future__ import annotations

import argparse
import sys

from . import __version__, _jit


def info_lines() -> list[str]:
    lines = [f"cuflash        {__version__}"]
    cp = _jit.cupy_or_none()
    lines.append(f"CuPy           {cp.__version__ if cp else 'not installed'}")
    if cp is not None:
        for label, fn in (
            ("CUDA runtime", lambda: cp.cuda.runtime.runtimeGetVersion()),
            ("CUDA driver", lambda: cp.cuda.runtime.driverGetVersion()),
            ("NVRTC", lambda: ".".join(map(str, _jit.nvrtc_version()))),
            ("CUDA headers", lambda: f"{_jit.cuda_header_version(_jit.cuda_include_dir())} in {_jit.cuda_include_dir()}"),
        ):
            try:
                lines.append(f"{label:<14} {fn()}")
            except Exception as exc:  # report, don't fail: this command exists to diagnose set-ups
                lines.append(f"{label:<14} unavailable ({type(exc).__name__}: {exc})")
    reason = _jit.gpu_unavailable_reason()
    if reason is None:
        for d in range(_jit.gpu_count()):
            p = cp.cuda.runtime.getDeviceProperties(d)
            name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
            lines.append(f"GPU {d:<10} {name}, compute capability {p['major']}.{p['minor']}, {p['multiProcessorCount']} SMs, {p['totalGlobalMem'] / 2**30:.0f} GiB")
    else:
        lines.append(f"GPU            none ({reason})")
    try:
        lines.append(f"kernel sources {_jit.source_dir()}")
        lines.append(f"source hash    {_jit.source_tree_hash()}")
    except Exception as exc:
        lines.append(f"kernel sources unavailable ({exc})")
    lines.append(f"kernel cache   {_jit.cache_dir()}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash")
    parser.add_argument("command", choices=["info"], help="info: print versions, GPUs and the kernel cache")
    parser.parse_args(argv)
    print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
