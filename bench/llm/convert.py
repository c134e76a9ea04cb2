"""transformers LLaMA / Mixtral models -> the weights the runner holds.

Every linear layer (q, k, v, o, gate, up, down, the experts and the lm head) becomes NVFP4 through
``cuflash.nvfp4.quantize``, one global scale per tensor (per expert for the experts). Embeddings stay
bf16 (kept as their uint16 bit patterns: CuPy has no bf16 arithmetic), RMSNorm weights, the MoE router
and the RoPE frequencies stay float32 holding the model's own values (the model is rounded to bf16 at
build time, so these are exactly the bf16 checkpoint values).

Conversion reads torch tensors once; nothing here runs in the generation loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

import cuflash
from cuflash import interop

ARCHS = ("llama", "mixtral")
NORM_JITTER = 0.1  # random init leaves RMSNorm weights at 1: perturb them so a misapplied norm weight shows


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a model; ``experts == 0`` is the dense (LLaMA) MLP."""

    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_eps: float
    experts: int = 0
    top_k: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


# Shapes the tests and the benchmark use (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab).
# Every GEMM K (hidden, heads * head_dim, intermediate) is a multiple of 64, as cuflash's GEMMs need.
TINY_LLAMA = dict(vocab=512, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=256)
TINY_MIXTRAL = dict(vocab=512, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=128,
                    experts=8, top_k=2)
# Llama-3.2-1B (its llama3-scaled RoPE and tied embeddings included); the vocabulary is cut from 128256
# to 32000 to keep the fp32 reference and the logits copies small (see bench_llm.py).
LLAMA_1B = dict(vocab=32000, hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
                rope_theta=500000.0, tie=True,
                rope_scaling=dict(rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                  original_max_position_embeddings=8192))
# Mixtral-8x7B's layer (hidden 4096, 32/8 heads of 128, 8 experts of 14336, top-2, vocab 32000) with 4
# layers instead of 32.
MIXTRAL_4L = dict(vocab=32000, hidden=4096, layers=4, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                  experts=8, top_k=2, rope_theta=1e6)


def hf_config(arch: str, *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
              intermediate: int, experts: int = 0, top_k: int = 0, rope_theta: float = 10000.0,
              rope_scaling: dict | None = None, tie: bool = False, max_positions: int = 8192,
              attn_implementation: str = "sdpa"):
    """A transformers LlamaConfig / MixtralConfig (transformers >= 5: RoPE settings in rope_parameters)."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling:
        rope.update(rope_scaling)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                  rope_parameters=rope, tie_word_embeddings=tie, max_position_embeddings=max_positions,
                  rms_norm_eps=1e-5, attn_implementation=attn_implementation)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=top_k,
                                          sliding_window=None)
    raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")


def build_hf_model(config, *, seed: int = 0, device: str = "cpu"):
    """A randomly initialised transformers model in float32 whose weights are bf16 values.

    Rounding to bf16 first makes "the original bf16 model" (the benchmark's peer) and the fp32 model the
    conversion reads hold the same numbers. RMSNorm weights get a +-NORM_JITTER perturbation.
    """
    import torch
    import transformers

    cls = transformers.MixtralForCausalLM if config.model_type == "mixtral" else transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                jitter = (torch.rand(p.shape, generator=gen) * 2 - 1) * NORM_JITTER
                p.add_(jitter.to(p.device))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model.eval()


def spec_from_config(config) -> ModelSpec:
    moe = config.model_type == "mixtral"
    return ModelSpec(
        arch="mixtral" if moe else "llama", vocab=config.vocab_size, hidden=config.hidden_size,
        layers=config.num_hidden_layers, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim or config.hidden_size // config.num_attention_heads,
        intermediate=config.intermediate_size, rms_eps=float(config.rms_norm_eps),
        experts=config.num_local_experts if moe else 0, top_k=config.num_experts_per_tok if moe else 0,
    )


# ----------------------------------------------------------------------------------------------
# Converted weights
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantWeight:
    """An NVFP4 weight W [N, K] (or experts [E, N, K]): ``W = (q * s) / global_scale``.

    data: uint8 [..., N, K/2] packed e2m1; scales: uint8 [..., N, K/16] e4m3 bit patterns;
    global_scale: float32 [] or [E] (encode form, host). Arrays are numpy or CuPy.
    """

    data: Any
    scales: Any
    global_scale: np.ndarray

    @property
    def alpha(self):
        """What a W4A16 GEMM multiplies by: 1/gs (a float, or a list of E floats for experts)."""
        a = (np.float32(1) / self.global_scale).astype(np.float32)
        return float(a) if a.ndim == 0 else [float(v) for v in a]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.scales.nbytes + self.global_scale.nbytes)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # float32 [H]
    mlp_norm: np.ndarray  # float32 [H]
    q: QuantWeight  # [heads * D, H]
    k: QuantWeight  # [kv_heads * D, H]
    v: QuantWeight
    o: QuantWeight  # [H, heads * D]
    gate: QuantWeight | None = None  # dense: [I, H]
    up: QuantWeight | None = None  # dense: [I, H]
    down: QuantWeight | None = None  # dense: [H, I]
    router: np.ndarray | None = None  # MoE: float32 [E, H] (kept in high precision, as NVFP4 checkpoints do)
    experts_gate_up: QuantWeight | None = None  # MoE: [E, 2I, H], rows 0..I-1 gate, I..2I-1 up
    experts_down: QuantWeight | None = None  # MoE: [E, H, I]


@dataclass
class ModelWeights:
    spec: ModelSpec
    embed_bf16: Any  # uint16 [V, H]: bf16 bit patterns
    final_norm: np.ndarray  # float32 [H]
    lm_head: QuantWeight  # [V, H]
    rope_inv_freq: np.ndarray  # float32 [D/2], as transformers computed it (default or llama3 RoPE)
    rope_scale: float  # transformers' attention_scaling applied to cos and sin
    layers: list = field(default_factory=list)

    def quant_weights(self):
        """Every QuantWeight, the lm head included."""
        for lw in self.layers:
            for name in ("q", "k", "v", "o", "gate", "up", "down", "experts_gate_up", "experts_down"):
                w = getattr(lw, name)
                if w is not None:
                    yield w
        yield self.lm_head

    def nbytes(self) -> dict:
        """Bytes of the weights by kind (what the runner keeps on the GPU)."""
        quant = sum(w.nbytes for w in self.quant_weights())
        high = int(self.embed_bf16.nbytes + self.final_norm.nbytes)
        for lw in self.layers:
            high += int(lw.attn_norm.nbytes + lw.mlp_norm.nbytes + (0 if lw.router is None else lw.router.nbytes))
        return {"nvfp4_linear": quant, "bf16_fp32_other": high, "total": quant + high}

    def map_arrays(self, fn) -> "ModelWeights":
        """A copy with fn applied to every device-bound array (data, scales, embeddings)."""
        def q(w):
            return None if w is None else QuantWeight(fn(w.data), fn(w.scales), w.global_scale)

        layers = [replace(lw, q=q(lw.q), k=q(lw.k), v=q(lw.v), o=q(lw.o), gate=q(lw.gate), up=q(lw.up),
                          down=q(lw.down), experts_gate_up=q(lw.experts_gate_up), experts_down=q(lw.experts_down))
                  for lw in self.layers]
        return replace(self, embed_bf16=fn(self.embed_bf16), lm_head=q(self.lm_head), layers=layers)


def to_numpy(x):
    """A host copy of a numpy, CuPy or torch array."""
    if interop.is_cupy_array(x):
        return x.get()
    if interop.is_torch_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _bf16_bits(t) -> np.ndarray:
    import torch

    return t.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def _f32(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float32)


def quantize_weight(t, on_gpu: bool) -> QuantWeight:
    """NVFP4 of a torch weight [N, K] (one global scale) or [E, N, K] (one per expert).

    on_gpu: quantize with cuflash's GPU kernels (the tensor must be on a CUDA device) and keep the result
    on the GPU as CuPy arrays; else cuflash's numpy path, numpy out.
    """
    import torch

    def one(w):
        if on_gpu:
            import cupy as cp

            t_q = cuflash.quantize(w.detach().float().contiguous())
            data = cp.array(cp.from_dlpack(t_q.data))  # own the memory (torch's allocator keeps its own)
            scales = cp.array(cp.from_dlpack(t_q.scales))
            return data, scales, np.float32(to_numpy(t_q.global_scale))
        t_q = cuflash.quantize(w.detach().float().cpu().numpy())
        return t_q.data, np.asarray(t_q.scales).view(np.uint8), np.float32(t_q.global_scale)

    if t.dim() == 2:
        d, s, g = one(t)
        return QuantWeight(d, s, np.array(g, dtype=np.float32))
    parts = [one(t[e]) for e in range(t.shape[0])]
    xp = __import__("cupy") if on_gpu else np
    with torch.no_grad():
        return QuantWeight(xp.stack([p[0] for p in parts]), xp.stack([p[1] for p in parts]),
                           np.array([p[2] for p in parts], dtype=np.float32))


def _experts(mlp):
    """(gate_up [E, 2I, H], down [E, H, I]) torch tensors of a Mixtral MoE block, for both layouts
    transformers has used: fused 3-D parameters (>= 5) and per-expert w1 (gate), w3 (up), w2 (down)."""
    import torch

    ex = mlp.experts
    if hasattr(ex, "gate_up_proj"):
        return ex.gate_up_proj, ex.down_proj
    gate_up = torch.stack([torch.cat([e.w1.weight, e.w3.weight], 0) for e in ex])
    return gate_up, torch.stack([e.w2.weight for e in ex])


def convert(model, *, on_gpu: bool = False) -> ModelWeights:
    """The runner's weights from a transformers LlamaForCausalLM / MixtralForCausalLM."""
    import torch

    spec = spec_from_config(model.config)
    inner = model.model
    rotary = inner.rotary_emb
    with torch.no_grad():
        mw = ModelWeights(
            spec=spec, embed_bf16=_bf16_bits(inner.embed_tokens.weight), final_norm=_f32(inner.norm.weight),
            lm_head=quantize_weight(model.lm_head.weight, on_gpu), rope_inv_freq=_f32(rotary.inv_freq),
            rope_scale=float(rotary.attention_scaling),
        )
        for layer in inner.layers:
            at = layer.self_attn
            lw = LayerWeights(
                attn_norm=_f32(layer.input_layernorm.weight), mlp_norm=_f32(layer.post_attention_layernorm.weight),
                q=quantize_weight(at.q_proj.weight, on_gpu), k=quantize_weight(at.k_proj.weight, on_gpu),
                v=quantize_weight(at.v_proj.weight, on_gpu), o=quantize_weight(at.o_proj.weight, on_gpu),
            )
            if spec.experts:
                gate_up, down = _experts(layer.mlp)
                lw.router = _f32(layer.mlp.gate.weight)
                lw.experts_gate_up = quantize_weight(gate_up, on_gpu)
                lw.experts_down = quantize_weight(down, on_gpu)
            else:
                lw.gate = quantize_weight(layer.mlp.gate_proj.weight, on_gpu)
                lw.up = quantize_weight(layer.mlp.up_proj.weight, on_gpu)
                lw.down = quantize_weight(layer.mlp.down_proj.weight, on_gpu)
            mw.layers.append(lw)
    return mw
