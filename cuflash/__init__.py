"""cuflash: NVFP4 block-scaled GEMMs and paged causal attention for Hopper, compiled at run time.

``import cuflash`` needs numpy alone; the GPU entry points need CuPy and a CUDA GPU and say so
clearly when either is missing.
"""

__version__ = "0.1.0"

from . import attention, gemm, gpumode, nvfp4, reference  # noqa: E402
from ._jit import CuflashUnavailableError  # noqa: E402
from .gemm import (  # noqa: E402
    GemmPlan, dual_gemm, group_gemm, group_gemm_ragged, plan_dual_gemm, plan_group_gemm, plan_group_gemm_ragged,
)
from .attention import AttentionPlan, PagedBatch, PagedKVCache, append_paged_kv, paged_attention  # noqa: E402
from .nvfp4 import NVFP4Tensor, dequantize, quantize  # noqa: E402

__all__ = [
    "__version__", "nvfp4", "reference", "attention", "gemm", "gpumode", "CuflashUnavailableError",
    "group_gemm", "group_gemm_ragged", "dual_gemm",
    "GemmPlan", "plan_group_gemm", "plan_group_gemm_ragged", "plan_dual_gemm",
    "NVFP4Tensor", "quantize", "dequantize",
    "PagedKVCache", "PagedBatch", "AttentionPlan", "paged_attention", "append_paged_kv",
]
