"""Several GPUs: every op runs on the GPU its inputs live on, whatever the current device, and the
loader's caches are safe to use from one thread per GPU. Skipped (with the reason) below 2 GPUs."""

import threading

import numpy as np
import pytest

from cuflash import _jit, nvfp4

pytestmark = pytest.mark.gpu


@pytest.fixture
def two_gpus(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs (run on nvidia-h200-x2)")
    return cp


def test_quantize_runs_on_the_inputs_gpu(two_gpus, rng):
    cp = two_gpus
    x_host = rng.standard_normal((64, 256)).astype(np.float16)
    with cp.cuda.Device(1):
        x = cp.asarray(x_host)
    with cp.cuda.Device(0):  # the current device is 0; the data lives on 1
        t = nvfp4.quantize(x)
        deq = nvfp4.dequantize(t)
    assert t.data.device.id == 1 and t.scales.device.id == 1 and deq.device.id == 1
    want = nvfp4.quantize(x_host)
    np.testing.assert_array_equal(t.data.get(), want.data)
    cfg = nvfp4.NVFP4KernelConfig("float16")
    k1 = _jit.get_kernel(cfg, "cuflash::nvfp4_quantize<__half>", 1)
    k0 = _jit.get_kernel(cfg, "cuflash::nvfp4_quantize<__half>", 0)
    assert k0 is not k1 and k0.device_id == 0 and k1.device_id == 1


def test_torch_tensor_on_cuda1_runs_there(two_gpus, rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((8, 64)).astype(np.float32)).to("cuda:1")
    t = nvfp4.quantize(x)
    assert t.data.device == x.device


def test_inputs_on_two_gpus_are_refused(two_gpus):
    cp = two_gpus
    with cp.cuda.Device(0):
        data = cp.zeros((2, 8), cp.uint8)
    with cp.cuda.Device(1):
        scales = cp.zeros((2, 1), cp.uint8)
        gs = cp.ones((), cp.float32)
    with pytest.raises(ValueError, match="must live on one GPU"):
        nvfp4.dequantize(nvfp4.NVFP4Tensor(data, scales, gs))


def test_two_threads_two_gpus(two_gpus, rng):
    cp = two_gpus
    inputs = [rng.standard_normal((128, 512)).astype(np.float16) for _ in range(2)]
    wants = [nvfp4.quantize(x) for x in inputs]
    errors = []

    def work(dev):
        try:
            with cp.cuda.Device(dev):
                x = cp.asarray(inputs[dev])
                for _ in range(50):
                    t = nvfp4.quantize(x)
                    if not np.array_equal(t.data.get(), wants[dev].data):
                        raise AssertionError(f"GPU {dev}: wrong result")
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
