"""Several GPUs: every op runs on the GPU its inputs live on, whatever the current device, and the
loader's caches are safe to use from one thread per GPU. Skipped (with the reason) below 2 GPUs."""

import threading

import numpy as np
import pytest

import test_attention as TA
import test_gemm as TG
from cuflash import _jit, attention, gemm, nvfp4, reference

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


def _on_both_gpus(work):
    """work(0) and work(1) in two threads at once; returns when both are done."""
    threads = [threading.Thread(target=work, args=(d,)) for d in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


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

    _on_both_gpus(work)
    assert not errors, errors


def _gemm_case(rng):
    """Host inputs and float64 reference of a small W4A4 group GEMM."""
    ms, n, k = [5, 33], 136, 128
    a = [TG.rand_packed(rng, m, k) for m in ms]
    sa = [TG.rand_scales(rng, (m, k // 16)) for m in ms]
    b = [TG.rand_packed(rng, n, k) for _ in ms]
    sb = [TG.rand_scales(rng, (n, k // 16)) for _ in ms]
    return (a, b, sa, sb), reference.group_gemm(a, b, sa, sb)


def _attention_case(rng):
    """Host inputs of a small mixed prefill/decode batch on a paged cache."""
    kv_lens, q_lens = [40, 97], [7, 1]
    kp, vp, table = TA.make_cache(rng, kv_lens, page_size=16, kv_heads=2, head_dim=64, dtype="float16")
    q = TA.make_q(rng, sum(q_lens), 8, 64, "float16")
    indptr = np.array([0, 7, 8], np.int32)
    return (q, kp, vp, table, np.array(kv_lens, np.int32), indptr)


def _run_gemm(cp, host):
    return gemm.group_gemm(*[[cp.asarray(x) for x in xs] for xs in host])


def _run_attention(cp, host):
    q, kp, vp, table, lens, indptr = (cp.asarray(x) for x in host)
    return attention.paged_attention(q, kp, vp, table, lens, q_indptr=indptr)


def test_gemm_and_attention_run_on_the_inputs_gpu(two_gpus, rng):
    cp = two_gpus
    ghost, gref = _gemm_case(rng)
    ahost = _attention_case(rng)
    with cp.cuda.Device(1):
        gin = [[cp.asarray(x) for x in xs] for xs in ghost]
        ain = [cp.asarray(x) for x in ahost]
    with cp.cuda.Device(0):  # current device 0, data on 1
        outs = gemm.group_gemm(*gin)
        out = attention.paged_attention(*ain[:5], q_indptr=ain[5])
    assert all(o.device.id == 1 for o in outs) and out.device.id == 1
    for o, r in zip(outs, gref):
        TG._check(TG._to_np(cp, o), r, "float16")
    q, kp, vp, table, lens, indptr = ahost
    TA.check_close(out.get(), None, q, kp, vp, table, lens, indptr, "float16")


def test_gemm_inputs_on_two_gpus_are_refused(two_gpus, rng):
    cp = two_gpus
    (a, b, sa, sb), _ = _gemm_case(rng)
    with cp.cuda.Device(0):
        a0 = [cp.asarray(x) for x in a]
    with cp.cuda.Device(1):
        rest = [[cp.asarray(x) for x in xs] for xs in (b, sa, sb)]
    with pytest.raises(ValueError, match="must live on one GPU"):
        gemm.group_gemm(a0, *rest)


def test_two_threads_loop_gemm_and_attention_on_two_gpus(two_gpus, rng):
    cp = two_gpus
    cases = [(_gemm_case(rng), _attention_case(rng)) for _ in range(2)]
    errors = []

    def work(dev):
        try:
            (ghost, gref), ahost = cases[dev]
            with cp.cuda.Device(dev):
                for _ in range(20):
                    for o, r in zip(_run_gemm(cp, ghost), gref):
                        TG._check(TG._to_np(cp, o), r, "float16")
                    q, kp, vp, table, lens, indptr = ahost
                    TA.check_close(_run_attention(cp, ahost).get(), None, q, kp, vp, table, lens, indptr, "float16")
        except Exception as exc:  # reported by the main thread
            errors.append((dev, exc))

    _on_both_gpus(work)
    assert not errors, errors


def test_ragged_dual_decode_and_cache_run_on_the_inputs_gpu(two_gpus, rng):
    """The other op forms with their data on GPU 1 and GPU 0 current: the ragged MoE GEMM (16-token
    tiles) and the dual GEMM with fp16 tokens, a decode-shaped W4A4 group GEMM (tokens dequantized by a
    first kernel, then a programmatic launch on sm_90), split-KV decode without a work list, and a
    PagedKVCache made for GPU 1 (append, prefill, decode)."""
    cp = two_gpus
    rows, n, k = [0, 5, 16, 1, 37], 200, 704
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    a = TG.rand_acts(rng, int(offsets[-1]), k, "float16")
    b = rng.integers(0, 256, size=(len(rows), n, k // 2), dtype=np.uint8)
    sb = TG.rand_scales(rng, (len(rows), n, k // 16))
    ragged_ref = reference.group_gemm_ragged(a, b, None, sb, offsets)
    m2, n2, k2 = 33, 300, 256
    a2 = TG.rand_acts(rng, m2, k2, "float16")
    b1, b2 = TG.rand_packed(rng, n2, k2), TG.rand_packed(rng, n2, k2)
    s1, s2 = TG.rand_scales(rng, (n2, k2 // 16)), TG.rand_scales(rng, (n2, k2 // 16))
    dual_ref = reference.dual_gemm(a2, b1, b2, None, s1, s2)
    A4, B4, SA4, SB4 = TG._group_inputs(rng, [1, 16, 7], [200, 130, 64], [576, 1152, 256], "nvfp4")
    decode_refs = reference.group_gemm(A4, B4, SA4, SB4)
    kv_lens = [2049, 1, 130]
    kp, vp, table = TA.make_cache(rng, kv_lens, page_size=16, kv_heads=2, head_dim=128, dtype="bfloat16")
    q = TA.make_q(rng, len(kv_lens), 8, 128, "bfloat16")
    lens = np.array(kv_lens, np.int32)
    with cp.cuda.Device(1):
        g = lambda xs: [cp.asarray(x) for x in xs]  # noqa: E731
        ragged_in = (cp.asarray(a), cp.asarray(b), None, cp.asarray(sb), cp.asarray(offsets))
        dual_in = (cp.asarray(a2), cp.asarray(b1), cp.asarray(b2), None, cp.asarray(s1), cp.asarray(s2))
        decode_in = (g(A4), g(B4), g(SA4), g(SB4))
        attn_in = g((q, kp, vp, table, lens))
        cache = attention.PagedKVCache(num_pages=40, page_size=5, num_kv_heads=2, head_dim=64, dtype="float16",
                                       max_pages_per_seq=20)
    assert cache.device_id == 1
    with cp.cuda.Device(0):  # current device 0, data on 1
        outs = [gemm.group_gemm_ragged(*ragged_in), gemm.dual_gemm(*dual_in), *gemm.group_gemm(*decode_in),
                attention.paged_attention(*attn_in)]
        assert all(o.device.id == 1 for o in outs)
        TG._check(TG._to_np(cp, outs[0]), ragged_ref, "float16")
        TG._check(TG._to_np(cp, outs[1]), dual_ref, "float16")
        for o, r in zip(outs[2:5], decode_refs):
            TG._check(TG._to_np(cp, o), r, "float16")
        TA.check_close(outs[5].get(), None, q, kp, vp, table, lens, None, "bfloat16")

        s = cache.add_sequence()
        with cp.cuda.Device(1):
            kv = [cp.asarray(rng.standard_normal((12, 2, 64)).astype(np.float16)) for _ in range(2)]
            qp = cp.asarray(TA.make_q(rng, 12, 8, 64, "float16"))
        cache.append([s], kv[0], kv[1], [12])
        out = cache.attention([s], qp, [12])
        assert out.device.id == 1
        tb, ln = (x.get() for x in cache.tables([s]))
        TA.check_close(out.get(), None, qp.get(), cache.k_pages[0].get(), cache.v_pages[0].get(), tb, ln,
                       np.array([0, 12], np.int32), "float16")
