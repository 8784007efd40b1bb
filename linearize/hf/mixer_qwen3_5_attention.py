"""Softmax attention as transformers' `qwen3_5` runs it, on the teacher's attention weights: a layer that exports.

`Qwen3_5Attention` differs from a Llama layer in two places, and this mixer adds both so that distillation trains
exactly what `linearize export --to qwen3_5` serves:
- per-head RMSNorm on q and k (weight 1 + w, eps: the teacher's `rms_norm_eps`) before RoPE. A teacher that has
  per-head q/k norms (Qwen3) keeps its own, which export maps exactly (w = weight - 1); for other teachers the
  norms are new, start at w = 0, and are where the layer differs from the teacher (no start reproduces a
  Llama layer's per-token score scale);
- an output gate per head, sigmoid(W_g x), packed by qwen3_5 beside q in `q_proj`. Here it is 2 * sigmoid(W_g x)
  with W_g = 0 at the start, exactly 1: the export folds the 2 into `o_proj` (a multiplication by 2 is exact).
Keys and values are kept for every token (this layer's state grows with the context, as a kept softmax layer's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionSpec, apply_rotary, chunk_causal_mask
from .errors import LinearizeError
from .mixer_qwen3_5_gdn import resolve_eps
from .mixers import Mixer, MixerCost, register_mixer


def zero_centred_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """qwen3_5's RMSNorm: x / rms(x) * (1 + weight), computed in float32 (float64 for float64 inputs)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(acc), x.shape[-1:], 1.0 + weight.to(acc), eps).type_as(x)


@dataclass
class Qwen35AttentionOptions:
    """eps: the q/k norms' epsilon (default: the teacher's `rms_norm_eps`, which the exported model uses)."""

    eps: float | None = None


@register_mixer
class Qwen35Attention(Mixer):
    name = "qwen3_5_attention"
    anchor = "gated softmax attention (Qwen3.5)"
    summary = "softmax attention with per-head q/k norms and an output gate, as qwen3_5 runs it (exports with `linearize export --to qwen3_5`)"
    Options = Qwen35AttentionOptions
    state_grows = True

    def __init__(self, attn, spec: AttentionSpec, options, layer_idx: int):
        super().__init__(attn, spec, options, layer_idx)
        reference = next(attn.parameters())
        factory = dict(dtype=reference.dtype, device=reference.device)
        h, d = spec.num_heads, spec.head_dim
        self.gate_proj = nn.Linear(spec.hidden_size, h * d, bias=False, **factory)
        nn.init.zeros_(self.gate_proj.weight)
        if spec.q_norm is None:
            self.q_norm_weight = nn.Parameter(torch.zeros(d, **factory))
            self.k_norm_weight = nn.Parameter(torch.zeros(d, **factory))

    @classmethod
    def resolve(cls, options, spec: AttentionSpec, config):
        if spec.q_norm is not None and not spec.norm_per_head:
            raise LinearizeError(
                f"mixer {cls.name!r} needs per-head q/k norms or none; this teacher normalises q and k across all heads "
                "(OLMo-2 style), which qwen3_5 cannot express; use gated_deltanet or keep_attention instead"
            )
        if spec.softcap is not None or spec.sliding_window:
            raise LinearizeError(
                f"mixer {cls.name!r} is full softmax attention without logit soft-capping; this teacher's layer "
                "slides or soft-caps its scores, which qwen3_5 cannot express; use keep_attention instead"
            )
        return resolve_eps(options, config, cls.name)

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        h, d = spec.num_heads, spec.head_dim
        norms = 0 if spec.q_norm is not None else 2 * d
        return MixerCost(new_parameters=spec.hidden_size * h * d + norms, state_fixed=0, state_per_token=2 * spec.num_kv_heads * d)

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state) -> torch.Tensor:
        if self.spec.q_norm is None:  # a teacher's own per-head norms were applied by spec.project
            q = zero_centred_rms_norm(q, self.q_norm_weight, self.options.eps)
            k = zero_centred_rms_norm(k, self.k_norm_weight, self.options.eps)
        q, k = apply_rotary(q, k, position_embeddings)
        batch, _, length, _ = q.shape
        # Which keys are real, kept only once a padded token has been seen: eager code passes `padding_mask` only
        # where there is padding, and reading a mask costs SDPA's caller a host sync at every decode step.
        mask = padding_mask
        if state is not None and state.tensors:
            past = state.tensors["k"].shape[2]
            k, v = state.append("k", k), state.append("v", v)
            if mask is not None or "mask" in state.tensors:
                mask = torch.cat((_real_keys(state.tensors.get("mask"), batch, past, q.device), _real_keys(mask, batch, length, q.device)), dim=1)
        if state is not None:
            state.write({"k": k, "v": v} if mask is None else {"k": k, "v": v, "mask": mask})
        out = causal_attention(q, k, v, mask, self.spec.scaling)
        gate = self.gate_proj(hidden_states).reshape(batch, length, -1, q.shape[-1]).transpose(1, 2)
        out = out * (2 * torch.sigmoid(gate.to(out.dtype)))
        return out if padding_mask is None else out * padding_mask[:, None, :, None]


def _real_keys(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """`mask`, or one that marks all `length` keys of every sequence real where there is none."""
    return mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=device)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """SDPA for q (B, H, T, D), the last T positions of keys k, v (B, Hkv, S, D); `key_mask` (B, S) marks real keys
    (None: all are).

    No mask is built when every key is real (the kernel's own causal path, or none for one query), and one mask for
    the whole batch for a chunk after cached keys (`chunk_causal_mask`); a query that sees no real key returns 0.
    A decode step's query heads are packed by kv head, (B, Hkv, groups, D), so that SDPA attends over the kv heads as
    they are, without `enable_gqa` and without repeating keys and values, as transformers' SDPA integration packs one
    query (by its own account, CUDA's fused kernels do not take `enable_gqa` with a mask)."""
    length, total = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    every_key_real = key_mask is None or bool(key_mask.all())
    if length == 1 and gqa:
        batch, heads, _, dim = q.shape
        packed = q.reshape(batch, k.shape[1], heads // k.shape[1], dim)
        seen = None if every_key_real else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(packed, k, v, attn_mask=seen, scale=scaling).reshape(batch, heads, 1, v.shape[-1])
        return out if seen is None else out.nan_to_num(0.0) * seen.any(-1, keepdim=True)
    if every_key_real and (length == 1 or length == total):
        return F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=scaling, enable_gqa=gqa)
    allowed = chunk_causal_mask(length, total - length, total, q.device)
    if every_key_real:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    allowed = allowed & key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    return out.nan_to_num(0.0) * allowed.any(-1, keepdim=True)
