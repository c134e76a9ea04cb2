"""End-to-end LLaMA- and Mixtral-style generation on cuflash kernels, checked against transformers.

- ``convert``: a transformers model -> NVFP4 linear weights (cuflash.nvfp4.quantize), bf16 norms and embeddings;
- ``ops``: the kernel backends the runner calls: ``CuflashOps`` (CuPy + cuflash, the GPU) and ``NumpyOps``
  (cuflash.reference in float64, or with the GPU path's fp16 rounding emulated);
- ``model``: the runner shared by both backends (embedding, RMSNorm, RoPE, paged attention plumbing, SwiGLU MLP,
  top-k routing with the ragged expert layout, batched greedy generation with chunked prefill);
- ``reference``: the same transformers model with every weight replaced by what the runner holds, in fp32;
- ``check``: token agreement with the top-2-margin exception rule and logit errors (numpy only).
"""
