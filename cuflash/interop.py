"""CuPy <-> torch, zero-copy through DLPack, and the device and stream a call runs on.

Every GPU entry point does::

    ctx = interop.call_context(a=a, b=b)          # one device, the caller's array type and stream
    a_cp = ctx.cupy(a)                             # torch tensors viewed as CuPy arrays (no copy)
    ...launch on ctx.stream under ctx.device...
    return ctx.to_caller(out)                      # torch in -> torch out

Rules:
- torch ``float4_e2m1fn_x2`` and ``float8_*`` tensors are viewed as uint8 first (CuPy has no such
  dtypes); bfloat16 travels as ml_dtypes.bfloat16 (CuPy >= 14).
- When a torch tensor comes in, kernels run on torch's current stream of that device, so they order
  with the caller's torch work without any synchronisation.
- Inputs must all live on one device; the call runs there whatever the current device is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ._jit import require_gpu


def _torch_module():
    return sys.modules.get("torch")  # never import torch ourselves: if it is not loaded, no tensor exists


_TORCH_STREAMS: dict = {}  # (raw stream, device) -> the CuPy stream wrapping it


def torch_current_stream(device_id: int):
    """torch's current stream of ``device_id`` as a CuPy stream, one wrapper per raw stream, kept: a
    call on torch tensors pays no wrapper construction (its host time counts when small GEMMs are
    timed back to back)."""
    ptr = _torch_module().cuda.current_stream(device_id).cuda_stream
    stream = _TORCH_STREAMS.get((ptr, device_id))
    if stream is None:
        if len(_TORCH_STREAMS) >= 256:  # streams come and go in long-lived servers
            _TORCH_STREAMS.clear()
        stream = _TORCH_STREAMS[(ptr, device_id)] = require_gpu().cuda.ExternalStream(ptr, device_id)
    return stream


def _array_key(x, tensor_type, ndarray_type):
    t = type(x)
    if t is list or t is tuple:
        return tuple([_array_key(v, tensor_type, ndarray_type) for v in x])
    if x is None:
        return None
    if t is tensor_type or (tensor_type is not None and isinstance(x, tensor_type)):
        return (x.data_ptr(), x.shape, x.stride(), x.dtype)
    if t is ndarray_type or (ndarray_type is not None and isinstance(x, ndarray_type)):
        return (x.data.ptr, x.shape, x.strides, x.dtype)
    raise TypeError  # not a GPU array: the full path validates and explains


def replay_key(arrays):
    """What identifies a call's arrays (nested tuples / lists, None allowed) when a validated launch is
    replayed: per array its address (device pointers are unique within a process), shape, strides and
    dtype; None when one is neither a CuPy array nor a torch tensor (the full path explains). Exact type
    checks first: this runs for every operand of every call (40 tensors for 8 W4A4 groups), and
    isinstance on torch.Tensor is slow. ~1 us per array."""
    torch, cp = sys.modules.get("torch"), sys.modules.get("cupy")
    try:
        return _array_key(arrays, torch.Tensor if torch is not None else None, cp.ndarray if cp is not None else None)
    except TypeError:
        return None


def is_torch_tensor(x) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def is_cupy_array(x) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def is_gpu_array(x) -> bool:
    return is_cupy_array(x) or (is_torch_tensor(x) and x.is_cuda)


def _array_device(name: str, x) -> int:
    if is_cupy_array(x):
        return int(x.device.id)
    if is_torch_tensor(x):
        if not x.is_cuda:
            raise ValueError(f"{name}: expected a CUDA tensor, got a tensor on {x.device}")
        return int(x.device.index)
    raise TypeError(f"{name}: expected a CuPy array or a torch CUDA tensor, got {type(x).__name__}")


def _flatten(named: dict) -> list[tuple[str, Any]]:
    """(name, array) pairs from keyword arguments that may hold lists/tuples of arrays or None."""
    out = []
    for name, v in named.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if x is not None:
                    out.append((f"{name}[{i}]", x))
        else:
            out.append((name, v))
    return out


@dataclass
class CallContext:
    device_id: int
    torch_in: bool
    stream: Any  # cupy Stream (an ExternalStream wrapping torch's current stream when torch came in)

    def cupy(self, x):
        """View ``x`` as a CuPy array on this call's device (zero-copy for torch tensors)."""
        if x is None:
            return None
        if is_cupy_array(x):
            return x
        return torch_to_cupy(x, self.stream)

    def to_caller(self, x):
        """Return a CuPy result as the caller's array type (a list or tuple element-wise)."""
        if isinstance(x, (list, tuple)):
            return type(x)(self.to_caller(v) for v in x)
        if x is None or not self.torch_in or not is_cupy_array(x):
            return x
        return cupy_to_torch(x, self.stream)

    def device(self):
        cp = require_gpu()
        return cp.cuda.Device(self.device_id)


def call_context(**named) -> CallContext:
    """Check that every array argument lives on one GPU and pick the stream to run on."""
    require_gpu()
    pairs = _flatten(named)
    if not pairs:
        raise ValueError("expected at least one GPU array argument")
    devices = {}
    torch_in = False
    for name, x in pairs:
        devices.setdefault(_array_device(name, x), name)
        torch_in = torch_in or is_torch_tensor(x)
    if len(devices) > 1:
        desc = ", ".join(f"{n} on GPU {d}" for d, n in devices.items())
        raise ValueError(f"all arrays of one call must live on one GPU, got {desc}")
    (device_id,) = devices
    return CallContext(device_id, torch_in, caller_stream(device_id, torch_in))


def caller_stream(device_id: int, torch_in: bool):
    """The stream a call runs on: torch's current stream of the device when torch tensors came in,
    else CuPy's current stream there."""
    if torch_in:
        return torch_current_stream(device_id)
    cp = require_gpu()
    with cp.cuda.Device(device_id):
        return cp.cuda.get_current_stream()


def _uint8_view_dtypes():
    torch = _torch_module()
    names = ("float4_e2m1fn_x2", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz")
    return tuple(getattr(torch, n) for n in names if hasattr(torch, n))


def torch_to_cupy(t, stream=None):
    """Zero-copy view of a torch CUDA tensor as a CuPy array.

    FP4/FP8 tensors come out as uint8 (their bit patterns); bfloat16 as ml_dtypes.bfloat16.
    """
    cp = require_gpu()
    torch = _torch_module()
    if t.dtype in _uint8_view_dtypes():
        t = t.view(torch.uint8)
    with cp.cuda.Device(t.device.index):
        if stream is None:
            stream = torch_current_stream(t.device.index)
        with stream:
            if t.dtype == torch.bfloat16:
                try:
                    return cp.from_dlpack(t)
                except Exception:  # a CuPy without bfloat16 DLPack support
                    import ml_dtypes

                    return cp.from_dlpack(t.view(torch.int16)).view(ml_dtypes.bfloat16)
            return cp.from_dlpack(t)


def cupy_to_torch(x, stream=None):
    """Zero-copy view of a CuPy array as a torch tensor (uint8 stays uint8)."""
    torch = _torch_module()
    if torch is None:
        raise RuntimeError("cupy_to_torch needs torch to be imported")
    cp = require_gpu()
    with cp.cuda.Device(x.device.id):
        stream = stream or cp.cuda.get_current_stream()
        with stream:
            if x.dtype.name == "bfloat16":
                try:
                    return torch.from_dlpack(x)
                except Exception:
                    return torch.from_dlpack(x.view(cp.int16)).view(torch.bfloat16)
            return torch.from_dlpack(x)
