"""Packaging: `import cuflash` needs numpy alone, the CUDA sources ship with the package, GPU entry
points say what is missing, `python -m cuflash info` works everywhere."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cuflash
from cuflash import _jit

_BLOCK_CUPY = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("cupy", "cupy_backends", "torch"):
                raise ImportError(f"{name} is blocked for this test")
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(cuflash.__file__).parent.parent)


def test_import_works_with_numpy_alone_and_gpu_entry_points_say_what_is_missing():
    code = _BLOCK_CUPY + textwrap.dedent(
        """
        import numpy as np
        import cuflash
        t = cuflash.quantize(np.ones((2, 32), np.float32))      # the CPU path needs no CuPy
        assert t.data.shape == (2, 16)
        try:
            cuflash._jit.require_gpu()
        except cuflash.CuflashUnavailableError as e:
            print("ERROR:", e)
        """
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "ERROR: cuflash GPU functions need CuPy, which is not installed: install the CUDA extra" in r.stdout


def test_info_runs_without_cupy():
    r = _run(_BLOCK_CUPY + "from cuflash.__main__ import main; main(['info'])")
    assert r.returncode == 0, r.stderr
    assert "CuPy           not installed" in r.stdout and "source hash" in r.stdout


def test_info_command():
    r = subprocess.run([sys.executable, "-m", "cuflash", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for field in ("CuPy", "GPU", "source hash", "kernel cache", "kernel sources"):
        assert field in r.stdout


def test_cuda_sources_ship_with_the_package():
    src = _jit.source_dir()
    assert (src / "nvfp4.cu").is_file() and (src / "common" / "fp4.cuh").is_file()
    pkg = Path(cuflash.__file__).resolve().parent
    if "site-packages" in str(pkg):  # a normal (non-editable) install must carry its own copy
        assert src == pkg / "cuda_src"


def test_gpu_entry_points_raise_clearly_without_a_gpu():
    reason = _jit.gpu_unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is present")
    with pytest.raises(_jit.CuflashUnavailableError, match="cuflash needs a CUDA GPU here"):
        _jit.require_gpu()


def test_no_undefined_names_or_unused_imports():
    """pyflakes over the package, the tests and the benchmarks: an undefined name in a GPU-only path
    would otherwise first fail on the device."""
    pyflakes_api = pytest.importorskip("pyflakes.api")
    from pyflakes import reporter as pyflakes_reporter
    import io

    root = Path(__file__).resolve().parent.parent
    out, err = io.StringIO(), io.StringIO()
    paths = [str(root / d) for d in ("cuflash", "tests", "bench") if (root / d).is_dir()]
    n = pyflakes_api.checkRecursive(paths, pyflakes_reporter.Reporter(out, err))
    assert n == 0, out.getvalue() + err.getvalue()
