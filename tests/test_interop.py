"""torch <-> CuPy through DLPack: zero-copy, dtypes, the caller's stream and device."""

import numpy as np
import pytest

from cuflash import interop


def test_non_array_arguments_are_refused_clearly():
    with pytest.raises(TypeError, match="x: expected a CuPy array or a torch CUDA tensor, got list"):
        interop._array_device("x", [1, 2])


@pytest.mark.gpu
def test_torch_views_are_zero_copy_and_keep_bits():
    torch = pytest.importorskip("torch")
    cp = pytest.importorskip("cupy")
    t = torch.arange(64, device="cuda", dtype=torch.uint8)
    for dtype in ("float4_e2m1fn_x2", "float8_e4m3fn"):
        if hasattr(torch, dtype):
            v = t.view(getattr(torch, dtype))
            c = interop.torch_to_cupy(v)
            assert c.dtype == cp.uint8 and c.data.ptr == t.data_ptr()
            np.testing.assert_array_equal(c.get(), np.arange(64))
    b = torch.randn(8, 8, device="cuda", dtype=torch.bfloat16)
    cb = interop.torch_to_cupy(b)
    assert cb.dtype.name == "bfloat16" and cb.data.ptr == b.data_ptr()
    back = interop.cupy_to_torch(cb)
    assert back.dtype == torch.bfloat16 and back.data_ptr() == b.data_ptr()


@pytest.mark.gpu
def test_call_context_uses_torch_current_stream_and_returns_torch():
    torch = pytest.importorskip("torch")
    x = torch.ones(4, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ctx = interop.call_context(x=x)
        assert ctx.torch_in and ctx.stream.ptr == s.cuda_stream
        out = ctx.to_caller(ctx.cupy(x) * 2)
    assert isinstance(out, torch.Tensor) and out.device == x.device


@pytest.mark.gpu
def test_call_context_rejects_cpu_tensors_and_mixed_devices():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        interop.call_context(x=torch.ones(2))
    if torch.cuda.device_count() < 2:
        pytest.skip("mixed devices need 2 GPUs")
    with pytest.raises(ValueError, match="must live on one GPU"):
        interop.call_context(a=torch.ones(2, device="cuda:0"), b=[torch.ones(2, device="cuda:1")])


@pytest.mark.gpu
def test_call_context_runs_on_the_inputs_device():
    cp = pytest.importorskip("cupy")
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs")
    with cp.cuda.Device(1):
        x = cp.ones(4)
    with cp.cuda.Device(0):
        ctx = interop.call_context(x=x)
    assert ctx.device_id == 1


def test_torch_stream_wrapper_is_made_once_per_raw_stream(monkeypatch):
    """A call on torch tensors wraps torch's current stream for CuPy; the wrapper is cached per (raw
    stream, device), so repeated calls pay no construction."""
    import types

    current = {"ptr": 1000}
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(
        current_stream=lambda device: types.SimpleNamespace(cuda_stream=current["ptr"] + device)))
    made = []

    class FakeExternal:
        def __init__(self, ptr, device_id):
            made.append((ptr, device_id))
            self.ptr = ptr

    fake_cp = types.SimpleNamespace(cuda=types.SimpleNamespace(ExternalStream=FakeExternal))
    monkeypatch.setattr(interop, "_torch_module", lambda: fake_torch)
    monkeypatch.setattr(interop, "require_gpu", lambda: fake_cp)
    monkeypatch.setattr(interop, "_TORCH_STREAMS", {})
    s0 = interop.torch_current_stream(0)
    assert interop.torch_current_stream(0) is s0 and s0.ptr == 1000
    s1 = interop.torch_current_stream(1)
    assert s1 is not s0 and s1.ptr == 1001
    current["ptr"] = 2000  # the caller switched torch streams: a new wrapper for the new stream
    s2 = interop.torch_current_stream(0)
    assert s2.ptr == 2000 and made == [(1000, 0), (1001, 1), (2000, 0)]
