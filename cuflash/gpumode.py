"""Drop-ins for the GPU MODE NVFP4 contracts (see shared/GPUMODE.md), on Hopper.

- ``group_gemm(data)``: ``data = (abc_tensors, sfasfb_tensors, sfasfb_reordered_tensors,
  problem_sizes)``; writes every ``c`` and returns the list of all of them.
- ``dual_gemm(data)``: ``data = (a, b1, b2, sfa, sfb1, sfb2, sfa_permuted, sfb1_permuted,
  sfb2_permuted, c)``; writes ``c = silu(A @ B1^T) * (A @ B2^T)`` (fp16) and returns it.

Both read the scales from the GPU-resident blocked ("reordered"/"permuted") tensors, whose
``(32, 4, RB, 4, CB, L)`` views sit over contiguous ``[L, RB, CB, 32, 4, 4]`` storage: no copy.
Tensors are torch CUDA tensors (a, b as ``float4_e2m1fn_x2 [rows, K/2, L]``, c as ``float16
[M, N, L]``); one launch per call.
"""

from __future__ import annotations

from . import gemm, nvfp4


def group_gemm(data):
    """GPU MODE nvfp4_group_gemm: returns the list of all G outputs ``c [M_i, N_i, L]``."""
    abc_tensors, _sfasfb_cpu, sfasfb_reordered, _problem_sizes = data
    a = [t[0] for t in abc_tensors]
    b = [t[1] for t in abc_tensors]
    c = [t[2] for t in abc_tensors]
    sfa = [nvfp4.gpumode_to_blocked(s[0]) for s in sfasfb_reordered]
    sfb = [nvfp4.gpumode_to_blocked(s[1]) for s in sfasfb_reordered]
    return gemm.group_gemm(a, b, sfa, sfb, out=c, scale_layout="blocked")


def dual_gemm(data):
    """GPU MODE nvfp4_dual_gemm: returns ``c [M, N, L]`` = silu(A @ B1^T) * (A @ B2^T) in fp16."""
    a, b1, b2, _sfa, _sfb1, _sfb2, sfa_p, sfb1_p, sfb2_p, c = data
    return gemm.dual_gemm(
        a, b1, b2,
        nvfp4.gpumode_to_blocked(sfa_p), nvfp4.gpumode_to_blocked(sfb1_p), nvfp4.gpumode_to_blocked(sfb2_p),
        out=c, scale_layout="blocked",
    )
