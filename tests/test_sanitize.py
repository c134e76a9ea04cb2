"""Small cases of every kernel, for compute-sanitizer (memcheck and racecheck slow kernels 10-100x):
bench/device_check.sh runs `-k sanitize` under both tools. Each case is a real check against the
reference, reusing the helpers of the op's own test module."""

import numpy as np
import pytest

import test_attention as T
import test_gemm as G
from cuflash import nvfp4

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_sanitize_quantize(cp, rng, dtype):
    x = (rng.standard_normal((3, 48)) * 5).astype(
        {"float32": np.float32, "float16": np.float16, "bfloat16": T.NP_DTYPE["bfloat16"]}[dtype])
    want = nvfp4.quantize(x)
    got = nvfp4.quantize(cp.asarray(x))
    np.testing.assert_array_equal(got.data.get(), want.data)
    np.testing.assert_array_equal(got.scales.get(), want.scales.view(np.uint8))
    deq = nvfp4.dequantize(got, dtype).get()
    np.testing.assert_array_equal(deq.view(np.uint8), nvfp4.dequantize(want, dtype).view(np.uint8))
    codes = nvfp4.e2m1_encode(cp.asarray(x.astype(np.float32)))
    np.testing.assert_array_equal(codes.get(), nvfp4.e2m1_encode(x.astype(np.float32)))


@pytest.mark.parametrize("tokens", ["nvfp4", "float16", "bfloat16"])
def test_sanitize_group_gemm(cp, rng, tokens):
    G.test_group_gemm_random_shapes(cp, rng, tokens, "blocked", "float16")


@pytest.mark.parametrize("tokens", ["nvfp4", "float16"])
def test_sanitize_group_gemm_stream_k(cp, rng, monkeypatch, tokens):
    """The wgmma kernel with stream-K forced (pieces parked in the workspace, tile counters), where sm_90."""
    from cuflash import _jit, gemm

    if _jit.device_cc(cp.cuda.Device().id) != (9, 0):
        pytest.skip("the wgmma GEMM needs a compute capability 9.0 GPU")
    monkeypatch.setenv(gemm.WGMMA_ENV, "1")
    G.test_group_gemm_wgmma_stream_k(cp, rng, None, monkeypatch, tokens, "odd")


def test_sanitize_ragged_and_dual_gemm(cp, rng):
    G.test_group_gemm_ragged(cp, rng, "nvfp4", "plain", [0, 5, 0, 16, 1, 0, 37, 3])
    G.test_dual_gemm(cp, rng, "float16", 33, 300, 256)
    G.test_group_gemm_batch_L(cp, rng, "plain", "nvfp4")


@pytest.mark.parametrize("d", [64, 128, 256])  # 64, 128: the wgmma prefill kernel on sm_90a; 256: mma.sync
def test_sanitize_attention_prefill_mixed(cp, rng, d):
    T.run_case(cp, rng, [1, 17, 40, 3], [1, 7, 40, 5], heads=8, kv_heads=2, d=d, page_size=5, dtype="float16")


def test_sanitize_attention_split_decode(cp, rng):
    T.run_case(cp, rng, [2049, 1, 130], None, heads=8, kv_heads=2, d=128, page_size=16, dtype="bfloat16")


@pytest.mark.parametrize("d", [128, 256])  # 128: the wgmma prefill kernel on sm_90a; 256: mma.sync
def test_sanitize_attention_split_prefill(cp, rng, d):
    # few CTAs over long caches: the prefill rows split the keys too, merged by the last split CTA
    T.run_case(cp, rng, [1000, 300], [70, 1], heads=8, kv_heads=2, d=d, page_size=16, dtype="float16")


def test_sanitize_append_and_table_check(cp, rng):
    T.test_append_kernel(cp, rng, 5)
    T.test_check_tables_on_device(cp, rng)
