"""Gated linear attention built from the teacher's own weights, adding no parameters (Liger).

q and k go through a parameter-free feature map, softmax over the head dimension, and the per-channel decay
gate is derived from the reused key itself: gate = logsigmoid(k) / gate_normalizer, so decays start close to
1 and the layer trains with the teacher's q/k/v/o alone. With `window` > 0 it is Liger attention, the fixed
mix 0.5 * (the teacher's softmax over the last `window` keys) + 0.5 * GLA.

Two choices differ from a plain GLA layer, both to start close to the teacher:
- No RoPE before the feature map: softmax features of rotated vectors score absolute positions rather than
  distances; the decay gate already supplies recency, so the linear part stays position-free (the softmax
  window, which scores like the teacher, does use RoPE).
- A normaliser: the output is divided by the gated sum of feature-mapped keys (a ones column appended to v),
  so, like the teacher's softmax, it is a weighted mean of values at the teacher's output scale rather than a
  sum that grows with the decay's memory length; it also keeps the two halves of the window mix comparable.
A decode step on CUDA (inference) runs as one fused Triton step, `triton_step.gla_step`, where it can, and on the CPU
as `cpu_step.gla_step`; the PyTorch path below is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_step
from .attention import AttentionSpec
from .errors import LinearizeError
from .kernel_dispatch import gla
from .mixers import FusedStepMixer, MixerCost, register_mixer
from .triton_step import gla_step
from .windows import add_window, check_window, effective_window, window_cache_size


@dataclass
class GLAOptions:
    """gate_normalizer: divides logsigmoid(k), higher = slower decay; window: > 0 adds a softmax window half (Liger attention)."""

    gate_normalizer: float = 16.0
    window: int = 0


@register_mixer
class GLAMixer(FusedStepMixer):
    name = "gla"
    drops_window = True
    anchor = "Liger"
    summary = "gated linear attention reusing the teacher's q/k/v/o, no new parameters; optional softmax window half"
    Options = GLAOptions
    step_tensors = ("S",)
    cpu_steps = True

    def __init__(self, attn, spec: AttentionSpec, options, layer_idx: int):
        super().__init__(attn, spec, options, layer_idx)
        self.window = effective_window(options.window, spec)

    @classmethod
    def resolve(cls, options, spec: AttentionSpec, config):
        if not options.gate_normalizer > 0:
            raise LinearizeError(
                f"option 'gate_normalizer' of mixer {cls.name!r} must be positive, got {options.gate_normalizer}; 16 is the usual value"
            )
        check_window(options.window, config, cls.name, low=0)
        return options

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        d = spec.head_dim
        # The gated state is the same for every query head of a kv group, so it is kept once per kv head.
        state = spec.num_kv_heads * d * (d + 1) + window_cache_size(effective_window(options.window, spec), spec)
        return MixerCost(new_parameters=0, state_fixed=state, state_per_token=0)

    def linear_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None, state: torch.Tensor | None, decode: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised GLA heads and the final state (B, Hkv, D, D + 1), continuing from `state` when given."""
        dtype, acc = q.dtype, torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        fq, fk = torch.softmax(q, dim=-1), torch.softmax(k, dim=-1)
        gate = F.logsigmoid(k) / self.options.gate_normalizer
        if padding_mask is not None:
            # A padded key adds nothing and a zero gate does not decay: padding leaves the state as it was.
            real = padding_mask[:, None, :, None].to(acc)
            fk, gate = fk * real, gate * real
        values = torch.cat((v, torch.ones_like(v[..., :1])), dim=-1)
        # The gated state is one per kv head, which the group's query heads read (grouped queries).
        out, final = gla(fq, fk, values, gate, scale=1.0, initial_state=state, decode=decode, output_state=True, dtype=dtype)
        num, den = out[..., :-1], out[..., -1:]
        # den is 0 where no real key has been seen yet (under left padding), and num with it.
        return num / torch.where(den > 0, den, torch.ones_like(den)), final

    def kernel(self):
        return "gla", (self.spec.head_dim, self.spec.head_dim + 1)  # a window, if any, runs beside it (windows.py: flex_attention on CUDA)

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state):
        if self.fuses_step(hidden_states, q, k, v, position_embeddings, state):
            return self.fused_step(hidden_states, q, k, v, position_embeddings, padding_mask, state)
        tensors = {} if state is None else state.tensors
        decode = state is not None and q.shape[2] == 1
        heads, final = self.linear_heads(q, k, v, padding_mask, tensors.get("S"), decode)
        new = {"S": final}
        if self.window:
            heads, cache = add_window(
                self.spec, self.window, heads, 0.5, q, k, v, position_embeddings, padding_mask, None if state is None else tensors, self.dropped_window()
            )
            new.update(cache)
        if state is not None:
            state.write(new)
        return heads.to(v.dtype)

    def fresh_step_state(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.spec.head_dim
        return {"S": torch.zeros(q.shape[0], self.spec.num_kv_heads, d, d + 1, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))}

    def launch_step(self, hidden_states, q, k, v, cos, sin, real, tensors) -> torch.Tensor:
        step = gla_step if self.launches_triton(hidden_states, q, k, v, cos, sin, tensors) else cpu_step.gla_step
        return step(
            q, k, v, cos, sin, real, tensors["S"], tensors.get("k"), tensors.get("v"), tensors.get("mask"),
            self.options.gate_normalizer, self.spec.scaling, self.spec.softcap,
        )
