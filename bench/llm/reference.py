"""The reference: the same transformers model holding exactly the runner's weights, run by transformers in fp32.

Every linear weight becomes its NVFP4-dequantized value ``(q * s) / gs`` (computed here in torch from the
packed codes, bit for bit what cuflash.nvfp4.dequantize gives), embeddings, norms and the router keep
their bf16 values. The runner and the reference then differ only in kernel numerics (fp16 activations,
fp16 KV, accumulation order), not in quantization error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from cuflash import nvfp4

from . import check
from .convert import QuantWeight, to_numpy
from .model import bf16_bits_to_f32


def _torch(x, device):
    """A torch tensor on ``device`` from a numpy array (copied) or a CuPy / torch array (DLPack)."""
    import torch

    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return torch.from_dlpack(x).to(device)


def dequantize_torch(w: QuantWeight, device="cpu"):
    """float32 [..., N, K] = (q * s) / gs, one gs per tensor or per expert (leading axis)."""
    import torch

    data = _torch(w.data, device)
    codes = torch.stack([data & 0xF, data >> 4], dim=-1).reshape(*data.shape[:-1], data.shape[-1] * 2)
    q = torch.as_tensor(nvfp4.E2M1_VALUES, device=device)[codes.long()]
    s = _torch(w.scales, device).view(torch.float8_e4m3fn).float().repeat_interleave(nvfp4.SCALE_BLOCK, dim=-1)
    gs = torch.as_tensor(w.global_scale, device=device)
    if gs.dim():  # experts: one scale per leading index
        gs = gs.reshape(-1, 1, 1)
    return (q * s) / gs  # q * s is exact in float32; one correctly rounded division, as cuflash's dequantize


def reference_model(model, weights, *, inplace: bool = False):
    """A float32 copy of ``model`` (or the model itself, inplace) holding the runner's weights, with fp32 RoPE
    frequencies however the model's buffers were rounded before.

    Tied embeddings are untied (the lm head is NVFP4, the embedding bf16); MoE experts run transformers'
    plain per-expert loop ("eager") where the implementation can be chosen.
    """
    import torch

    ref = model if inplace else copy.deepcopy(model)
    ref = ref.float().eval()
    dev = next(ref.parameters()).device
    inner = ref.model
    # The RoPE frequencies are a floating-point buffer: a model once moved to bf16 keeps them rounded to bf16
    # (a relative error of ~4e-3 in every angle, growing with position). Rebuild them in fp32 from the config.
    inner.rotary_emb = type(inner.rotary_emb)(config=ref.config).to(device=dev, dtype=torch.float32)

    def put(param, w: QuantWeight):
        param.data.copy_(dequantize_torch(w, dev).reshape(param.shape))

    with torch.no_grad():
        emb = bf16_bits_to_f32(np, to_numpy(weights.embed_bf16))
        inner.embed_tokens.weight.data.copy_(torch.from_numpy(emb))
        ref.lm_head.weight = torch.nn.Parameter(dequantize_torch(weights.lm_head, dev))
        ref.config.tie_word_embeddings = False
        inner.norm.weight.data.copy_(torch.from_numpy(weights.final_norm))
        for layer, lw in zip(inner.layers, weights.layers):
            at = layer.self_attn
            layer.input_layernorm.weight.data.copy_(torch.from_numpy(lw.attn_norm))
            layer.post_attention_layernorm.weight.data.copy_(torch.from_numpy(lw.mlp_norm))
            for proj, w in ((at.q_proj, lw.q), (at.k_proj, lw.k), (at.v_proj, lw.v), (at.o_proj, lw.o)):
                put(proj.weight, w)
            if lw.router is not None:
                layer.mlp.gate.weight.data.copy_(torch.from_numpy(lw.router))
                if hasattr(layer.mlp.experts, "gate_up_proj"):  # transformers >= 5: fused 3-D parameters
                    put(layer.mlp.experts.gate_up_proj, lw.experts_gate_up)
                    put(layer.mlp.experts.down_proj, lw.experts_down)
                else:  # per-expert modules (older transformers)
                    gu, dn = dequantize_torch(lw.experts_gate_up, dev), dequantize_torch(lw.experts_down, dev)
                    inter = gu.shape[1] // 2
                    for e, ex in enumerate(layer.mlp.experts):
                        ex.w1.weight.data.copy_(gu[e, :inter])
                        ex.w3.weight.data.copy_(gu[e, inter:])
                        ex.w2.weight.data.copy_(dn[e])
            else:
                put(layer.mlp.gate_proj.weight, lw.gate)
                put(layer.mlp.up_proj.weight, lw.up)
                put(layer.mlp.down_proj.weight, lw.down)
    if hasattr(ref, "set_experts_implementation") and weights.spec.experts:
        ref.set_experts_implementation("eager")
    return ref


def exact_fp32():
    """Keep torch's fp32 matmuls in fp32 on the GPU (no TF32): the reference must be the accurate side."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


class RouteForcing:
    """Forward hooks on the reference's MoE routers that make it route like the runner at near ties.

    Use as a context manager around forwards of ONE sequence from position 0 (no KV cache), after setting
    ``routes`` (the runner's ``model.Routes`` of that sequence) and ``valid`` (how many leading positions
    share the runner's context: only those have the runner's routes). Each router's logits go through
    ``check.align_routes``; ``stats`` adds up what it found. Works with transformers' router modules that
    return (logits, top-k weights, top-k indices) (>= 5) and with plain linear gates (logits only).
    """

    def __init__(self, ref, margin_rtol: float):
        self.gates = [layer.mlp.gate for layer in ref.model.layers if hasattr(layer.mlp, "gate")]
        self.top_k = ref.config.num_experts_per_tok
        self.margin_rtol = float(margin_rtol)
        self.routes, self.valid = None, 0
        self.stats = check.RouteStats()
        self._handles = []

    def __enter__(self):
        self._handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: int):
        def hook(module, args, output):
            return self._force(layer, output)
        return hook

    def _force(self, layer: int, output):
        import torch

        logits = output[0] if isinstance(output, tuple) else output
        n = min(int(logits.shape[0]), int(self.valid))
        if self.routes is None or n == 0:
            return None
        host = logits[:n].detach().double().cpu().numpy()
        new, stats = check.align_routes(host, self.routes.experts[:n, layer], self.margin_rtol,
                                        self.routes.logits[:n, layer])
        self.stats.add(stats)
        if not stats.forced:
            return None
        logits = logits.clone()
        logits[:n] = torch.from_numpy(new).to(device=logits.device, dtype=logits.dtype)
        if not isinstance(output, tuple):
            return logits
        # transformers' MixtralTopKRouter: softmax in fp32, top k, renormalised
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        return (logits, (top / top.sum(dim=-1, keepdim=True)).to(output[1].dtype), idx) + tuple(output[3:])


def _forcing(forcing, routes, valid: int):
    if forcing is not None:
        forcing.routes, forcing.valid = routes, valid


def teacher_forced_logits(ref, prompt, tokens, forcing: RouteForcing | None = None, routes=None) -> np.ndarray:
    """float32 [n, V]: the reference's logits for each of the runner's n tokens given the same context
    (the prompt and the runner's earlier tokens), in one forward. With ``forcing`` (an entered
    RouteForcing) and the runner's ``routes`` of this sequence, routed like the runner at near ties."""
    import torch

    dev = next(ref.parameters()).device
    ctx = np.concatenate([np.asarray(prompt), np.asarray(tokens)[:-1]])
    _forcing(forcing, routes, len(ctx))
    ids = torch.as_tensor(ctx, device=dev)[None]
    with torch.no_grad():
        logits = ref(input_ids=ids).logits[0, len(prompt) - 1:]
    _forcing(forcing, None, 0)
    return logits.float().cpu().numpy()


def greedy_forced(ref, prompt, n: int, forcing: RouteForcing, routes, tokens) -> tuple[np.ndarray, np.ndarray]:
    """The reference's own greedy generation (tokens [n], logits [n, V]) by full forwards, routed like the
    runner at near ties for as long as its context is the runner's (prompt + the runner's ``tokens``)."""
    import torch

    dev = next(ref.parameters()).device
    prompt, tokens = np.asarray(prompt), np.asarray(tokens)
    out_t, out_l = [], []
    for i in range(n):
        differ = np.flatnonzero(np.asarray(out_t, dtype=np.int64) != tokens[:len(out_t)])
        _forcing(forcing, routes, len(prompt) + (int(differ[0]) if differ.size else len(out_t)))
        ids = torch.as_tensor(np.concatenate([prompt, np.asarray(out_t, dtype=prompt.dtype)]), device=dev)[None]
        with torch.no_grad():
            last = ref(input_ids=ids).logits[0, -1].float().cpu().numpy()
        out_t.append(int(last.argmax()))
        out_l.append(last)
    _forcing(forcing, None, 0)
    return np.asarray(out_t, dtype=np.int64), np.stack(out_l)


@dataclass
class PromptAgreement:
    teacher_forced: check.TeacherForced
    free_running: check.FreeRunning
    scale: float  # max(1, max |reference logit|): what the tolerances are relative to
    routes: check.RouteStats | None  # the teacher-forced forward's routing decisions (MoE with forcing)


def prompt_agreement(ref, prompt, tokens, logits, margin_rtol: float, forcing: RouteForcing | None = None,
                     routes=None) -> PromptAgreement:
    """Both views of one prompt's generation (tokens [n], logits [n, V] of the runner) against ``ref``, token
    swaps excused below ``margin_rtol`` x max(1, max |reference logit|). With ``forcing`` (an entered
    RouteForcing) and the runner's ``routes``, the reference routes like the runner at router near ties."""
    if forcing is not None:
        forcing.stats = check.RouteStats()
    ref_logits = teacher_forced_logits(ref, prompt, tokens, forcing, routes)
    stats = None if forcing is None else forcing.stats
    scale = max(1.0, float(np.abs(ref_logits).max()))
    margin = margin_rtol * scale
    tf = check.teacher_forced(tokens, logits, ref_logits, margin)
    if forcing is not None:
        forcing.stats = check.RouteStats()  # (the free run's forwards repeat positions: not counted)
        ref_tokens, ref_gen_logits = greedy_forced(ref, prompt, len(tokens), forcing, routes, tokens)
    else:
        ref_tokens, ref_gen_logits = greedy(ref, prompt, len(tokens))
    fr = check.free_running(tokens, ref_tokens, ref_gen_logits, margin)
    return PromptAgreement(tf, fr, scale, stats)


def greedy(ref, prompt, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's own greedy generation of one prompt through ``model.generate``: (tokens [n],
    logits [n, V]). End-of-sequence is disabled so all n steps run."""
    import torch

    dev = next(ref.parameters()).device
    ids = torch.as_tensor(np.asarray(prompt), device=dev)[None]
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    toks = out.sequences[0, ids.shape[1]:].cpu().numpy()
    return toks, torch.stack(out.logits, dim=1)[0].float().cpu().numpy()
