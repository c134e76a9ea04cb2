"""The kernel loader: every variant compiles through NVRTC for its target architectures (no GPU
needed), the cache key covers every header, compile errors name the real file."""

import importlib

import numpy as np
import pytest

from cuflash import _jit

pytest.importorskip("cupy", reason="compiling needs CuPy's NVRTC bindings (pip install '.[cuda12]')")

#: Every op module with kernels; each exposes kernel_variants().
KERNEL_MODULES = ["cuflash.nvfp4", "cuflash.gemm", "cuflash.attention"]


def _variants():
    for mod in KERNEL_MODULES:
        for cfg in importlib.import_module(mod).kernel_variants():
            for arch in _jit.TARGET_ARCHS[cfg.family]:
                yield pytest.param(cfg, arch, id=f"{cfg.kernel_name()}-{arch}")


@pytest.mark.parametrize("config, arch", list(_variants()))
def test_every_kernel_variant_compiles(config, arch):
    mod = _jit.compile_module(config, arch, use_disk_cache=False)
    assert len(mod.cubin) > 0
    assert set(mod.lowered) == set(config.name_expressions())


def _sweep_variants():
    """The variants bench/sweep.py times on the GPU (not chosen by the heuristics; compiled here so a
    device visit never finds one broken), for sm_90 / sm_90a."""
    import sys
    from pathlib import Path

    from cuflash import attention, gemm

    bench = str(Path(__file__).resolve().parent.parent / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import sweep

    out = []
    for tok in ("nvfp4", "float16"):
        out += [gemm.GemmKernelConfig(tok, bm, wm, st) for bm, wm, st in sweep.PORTABLE]
        out += [gemm.GemmKernelConfig(tok, bm, 1, st, arch="hopper", row_blocks=rb) for bm, st, rb in sweep.HOPPER]
    for bn, w, st in sweep.DECODE_CONFIGS + sweep.PREFILL_CONFIGS:
        out.append(attention.AttentionConfig("float16", 128, bn, w, st))
    known = {c for mod in KERNEL_MODULES for c in importlib.import_module(mod).kernel_variants()}
    return [pytest.param(c, id=c.kernel_name()) for c in dict.fromkeys(out) if c not in known]


@pytest.mark.parametrize("config", _sweep_variants())
def test_sweep_variants_compile(config):
    arch = "sm_90a" if config.family == _jit.ARCH_HOPPER else "sm_90"
    mod = _jit.compile_module(config, arch, use_disk_cache=False)
    assert len(mod.cubin) > 0


class _Cfg(_jit.KernelConfig):
    """A throwaway config over a temporary source tree."""

    source = "main.cu"

    def __init__(self, names=("k",)):
        self._names = names

    def name_expressions(self):
        return self._names

    def kernel_name(self):
        return "test_kernel"


def _tree(tmp_path, header_body="constexpr int kValue = 1;", main_body=None):
    (tmp_path / "common").mkdir(parents=True, exist_ok=True)
    (tmp_path / "common" / "h.cuh").write_text(f"#pragma once\n{header_body}\n")
    (tmp_path / "common" / "outer.cuh").write_text('#pragma once\n#include "common/h.cuh"\n')
    main = main_body or '#include "common/outer.cuh"\nextern "C" __global__ void k(int* x) { x[0] = kValue; }\n'
    (tmp_path / "main.cu").write_text(main)
    return tmp_path


def test_cache_key_covers_nested_headers(tmp_path):
    root = _tree(tmp_path)
    cfg = _Cfg()
    k1 = _jit.cache_key(cfg, "sm_90", root)
    assert _jit.cache_key(cfg, "sm_90", root) == k1
    assert _jit.cache_key(cfg, "sm_80", root) != k1
    (root / "common" / "h.cuh").write_text("#pragma once\nconstexpr int kValue = 2;\n")  # reached only through outer.cuh
    assert _jit.cache_key(cfg, "sm_90", root) != k1


def test_changed_header_is_recompiled_not_served_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path / "cache"))
    root = _tree(tmp_path / "src")
    m1 = _jit.compile_module(_Cfg(), "sm_80", root=root)
    assert (tmp_path / "cache" / f"{m1.key}.cubin").is_file()
    again = _jit.compile_module(_Cfg(), "sm_80", root=root)
    assert again.key == m1.key and again.cubin == m1.cubin
    (root / "common" / "h.cuh").write_text("#pragma once\nconstexpr int kValue = 12345;\n")
    m2 = _jit.compile_module(_Cfg(), "sm_80", root=root)
    assert m2.key != m1.key and m2.cubin != m1.cubin


def test_compile_error_names_the_real_file(tmp_path):
    root = _tree(tmp_path, header_body="constexpr int kValue = not_defined_anywhere;")
    with pytest.raises(_jit.CompileError) as err:
        _jit.compile_module(_Cfg(), "sm_80", root=root, use_disk_cache=False)
    assert str(root / "common" / "h.cuh") in str(err.value)


def test_include_must_name_a_file_under_the_source_root(tmp_path):
    root = _tree(tmp_path, main_body='#include "h.cuh"\n')
    with pytest.raises(FileNotFoundError, match='#include "h.cuh" must name a file relative to'):
        _jit.cache_key(_Cfg(), "sm_80", root)


def test_arch_choice():
    portable, hopper = _Cfg(), _Cfg()
    hopper.family = _jit.ARCH_HOPPER
    assert hopper.arch_for((9, 0)) == "sm_90a"
    assert portable.arch_for((9, 0)) == "sm_90"
    assert portable.arch_for((8, 6)) == "sm_86"
    with pytest.raises(_jit.CuflashUnavailableError, match="needs a Hopper GPU"):
        hopper.arch_for((8, 9))
    with pytest.raises(_jit.CuflashUnavailableError, match="8.0 or newer"):
        portable.arch_for((7, 5))


def test_launch_arguments_need_explicit_widths():
    _jit.check_launch_args("k", (np.int32(1), np.float32(2.0), np.int64(3)), np.ndarray)
    with pytest.raises(TypeError, match="launch argument 1 .* got int"):
        _jit.check_launch_args("k", (np.int32(1), 5), np.ndarray)
    with pytest.raises(TypeError, match="got float"):
        _jit.check_launch_args("k", (1.5,), np.ndarray)


def test_source_tree_hash_changes_with_any_file(tmp_path):
    root = _tree(tmp_path)
    h1 = _jit.source_tree_hash(root)
    (root / "common" / "h.cuh").write_text("#pragma once\n// changed\n")
    assert _jit.source_tree_hash(root) != h1


def test_programmatic_launch_structs_match_cuda_h():
    """CUlaunchAttribute / CUlaunchConfig as cuda.h lays them out (the driver reads them by offset)."""
    import ctypes

    assert ctypes.sizeof(_jit.CuLaunchAttribute) == 72 and _jit.CuLaunchAttribute.value.offset == 8
    assert ctypes.sizeof(_jit.CuLaunchConfig) == 56
    assert (_jit.CuLaunchConfig.smem.offset, _jit.CuLaunchConfig.stream.offset, _jit.CuLaunchConfig.attrs.offset,
            _jit.CuLaunchConfig.num_attrs.offset) == (24, 32, 40, 48)


def test_programmatic_launch_marshals_arguments():
    """Each kernel argument is passed by the address of a value of its exact width."""
    import ctypes

    pytest.importorskip("cupy")

    class FakeKernel:
        name = "fake"

    args = (np.int32(-3), np.uint64(2**40 + 5), np.float32(1.5), np.int64(-7))
    ln = _jit.ProgrammaticLaunch(FakeKernel(), (5, 2), 384, args, 1000)
    assert list(ln._config.grid) == [5, 2, 1] and list(ln._config.block) == [384, 1, 1] and ln._config.smem == 1000
    assert ln._config.num_attrs == 1 and ln._config.attrs.contents.id == 6 and ln._config.attrs.contents.value[0] == 1
    got = [ctypes.cast(ln._params[0], ctypes.POINTER(ctypes.c_int32)).contents.value,
           ctypes.cast(ln._params[1], ctypes.POINTER(ctypes.c_uint64)).contents.value,
           ctypes.cast(ln._params[2], ctypes.POINTER(ctypes.c_float)).contents.value,
           ctypes.cast(ln._params[3], ctypes.POINTER(ctypes.c_int64)).contents.value]
    assert got == [-3, 2**40 + 5, 1.5, -7]
    with pytest.raises(TypeError, match="launch argument 1"):
        _jit.ProgrammaticLaunch(FakeKernel(), 1, 32, (np.int32(1), 5), 0)
