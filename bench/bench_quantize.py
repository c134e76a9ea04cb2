"""NVFP4 quantization of activations on the GPU against the copy-bandwidth ceiling.

Quantizing is memory-bound: it reads x once (2 bytes a value for fp16/bf16) and writes half a byte
a value plus one scale byte per 16 values. With a calibrated global scale (the on-the-fly activation
case, ``check_finite=False``) that is one pass; without one, an amax pass reads x once more.

    python bench/bench_quantize.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse

from common import Record, Results, environment, measure_ceilings, require_gpu_or_exit, time_fn

SHAPES = [(16, 7168), (256, 7168), (4096, 7168), (16384, 8192)]
QUICK_SHAPES = [(256, 7168)]


def torch_quantize(x, gs):
    """The recipe in plain PyTorch (what users do today), for comparison."""
    import torch

    xb = x.float().reshape(-1, 16)
    amax = xb.abs().amax(dim=1)
    s = (gs * (amax / 6)).clamp(max=448).to(torch.float8_e4m3fn)
    sf = s.float()
    inv = torch.where(sf != 0, gs / sf, torch.zeros_like(sf))
    y = (xb * inv[:, None]).clamp(-6, 6)
    # nearest e2m1 value by thresholds (ties are not even-rounded here; a timing peer only)
    mag = y.abs()
    code = sum((mag > t).to(torch.uint8) for t in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0))
    code = code | ((y < 0).to(torch.uint8) << 3)
    code = code.reshape(x.shape[0], -1)
    return code[:, 0::2] | (code[:, 1::2] << 4), s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cp = require_gpu_or_exit()
    import numpy as np

    from cuflash import nvfp4

    try:
        import torch
    except ImportError:
        torch = None
    ceilings = measure_ceilings(torch_available=torch is not None)
    res = Results()
    rng = np.random.default_rng(0)
    for m, k in QUICK_SHAPES if args.quick else SHAPES:
        case = f"M={m} K={k} fp16"
        x_host = rng.standard_normal((m, k)).astype(np.float16)
        x = cp.asarray(x_host)
        want = nvfp4.quantize(x_host, global_scale=3.0)
        got = nvfp4.quantize(x, global_scale=3.0, check_finite=False)
        if not (np.array_equal(got.data.get(), want.data) and np.array_equal(got.scales.get(), want.scales.view(np.uint8))):
            raise SystemExit(f"{case}: GPU quantize differs from the CPU path; not timing it")
        one_pass = m * k * 2 + m * k // 2 + m * k // 16
        t = time_fn(lambda: nvfp4.quantize(x, global_scale=3.0, check_finite=False))
        r = res.add("quantize", case, "cuflash (global scale given)", t, nbytes=one_pass)
        r.extra["fraction_of_copy"] = round(r.tbps / ceilings["copy_TBps"], 3)
        t = time_fn(lambda: nvfp4.quantize(x, check_finite=False))
        res.add("quantize", case, "cuflash (amax pass + quantize)", t, nbytes=one_pass + m * k * 2)
        if torch is not None:
            xt = torch.from_numpy(x_host).cuda()
            ext = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
            t = time_fn(lambda: torch_quantize(xt, 3.0), stream=ext)
            res.add("quantize", case, "torch recipe", t, nbytes=one_pass)
        copy_us = one_pass / (ceilings["copy_TBps"] * 1e12) * 1e6
        res.records.append(Record("quantize", case, "floor (bytes / copy bandwidth)", round(copy_us, 2), round(copy_us, 2), round(copy_us, 2)))
    print(f"ceilings: copy {ceilings['copy_TBps']:.2f} TB/s" + (f", fp16 matmul {ceilings['fp16_TFLOPs']:.0f} TFLOP/s" if "fp16_TFLOPs" in ceilings else ""))
    print(res.table())
    if args.json:
        res.write_json(args.json, {"env": environment(), "ceilings": ceilings})


if __name__ == "__main__":
    main()
