"""Mamba-2's selective state-space layer initialised from attention, as in Mamba in the Llama (Wang et al.).

The SSD form with one scalar decay per head: the teacher's projections supply x <- V, B <- K and C <- Q
(as projected, without RoPE; grouped kv heads repeated to the query heads), and per head

    h_t = exp(dt_t * A) h_{t-1} + dt_t * B_t^T x_t,    y_t = scaling * C_t h_t + D * x_t,

with dt_t = softplus(W_dt x_t + dt_bias), A = -exp(A_log) and the teacher's softmax `scaling`, so C_t B_s^T
is the teacher's attention logit; y goes out through the teacher's o_proj. Only W_dt, dt_bias, A_log and D
are new. It runs on the scalar-gate GLA ops (k' = dt * B, g = dt * A). Pads get dt = 0: no write, no decay.

The start, chosen on SmolLM2-135M (2 x 256 tokens of prose, every layer's output against the teacher's):
W_dt = 0, dt = 0.001 and A = 30 give a slow decay (0.97 per token) whose weights sum to about 1/A, so the
signed logits do not swamp the output; D = 0.25 adds a little of the current value, which alone has cosine
~0.4 with the teacher's output. Mean relative error 0.98, cosine 0.43, against 1.0 for a zero output; D = 0
gives 0.995 / 0.31, Mamba's D = 1 error 2.3, A = 1 with dt = 0.01 error 3.3, and no logit scaling 9 or more.
Distillation does the rest.
With `window` > 0, each head returns s * (the teacher's softmax over the last `window` keys, with RoPE) +
(1 - s) * y, s = sigmoid(window_logit) learned per head from 0.5: with every layer converted, window 64 takes
the start's mean error to 0.52 and Persuasion's perplexity from 25,568 to 232 (`benchmarks/conversion_start.py`).
A decode step on CUDA (inference) runs as one fused Triton step, `triton_step.mamba2_step`, where it can, and on the
CPU as `cpu_step.mamba2_step`; the PyTorch path below is the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import cpu_step
from .attention import AttentionSpec, repeat_heads
from .gates import inverse_softplus, logit
from .kernel_dispatch import simple_gla
from .mixers import FusedStepMixer, MixerCost, register_mixer
from .ops_gated import ssd_steps
from .triton_step import mamba2_step
from .windows import add_window, check_window, effective_window, window_cache_size


@dataclass
class Mamba2Options:
    """window: > 0 mixes in the teacher's softmax over the last `window` keys, with a learned share per head."""

    window: int = 0


@register_mixer
class Mamba2Mixer(FusedStepMixer):
    name = "mamba2"
    drops_window = True
    anchor = "Mamba in the Llama"
    summary = "Mamba-2 SSD layer with x, B, C taken from the teacher's v, k, q and a learned step dt per head"
    Options = Mamba2Options
    step_tensors = ("ssm",)
    cpu_steps = True

    # The start (see the module docstring for why).
    initial_dt = 0.001
    initial_A = 30.0
    initial_D = 0.25
    initial_window_share = 0.5

    def __init__(self, attn, spec: AttentionSpec, options, layer_idx: int):
        super().__init__(attn, spec, options, layer_idx)
        reference = next(attn.parameters())
        factory = dict(dtype=reference.dtype, device=reference.device)
        h = spec.num_heads
        self.dt_proj = nn.Linear(spec.hidden_size, h, bias=False, **factory)
        nn.init.zeros_(self.dt_proj.weight)
        self.dt_bias = nn.Parameter(torch.full((h,), inverse_softplus(self.initial_dt), **factory))
        self.A_log = nn.Parameter(torch.full((h,), math.log(self.initial_A), **factory))
        self.D = nn.Parameter(torch.full((h,), self.initial_D, **factory))
        self.window = effective_window(options.window, spec)
        if self.window:
            self.window_logit = nn.Parameter(torch.full((h,), logit(self.initial_window_share), **factory))

    @classmethod
    def resolve(cls, options, spec: AttentionSpec, config):
        check_window(options.window, config, cls.name, low=0)
        return options

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        h = spec.num_heads
        window = effective_window(options.window, spec)
        params = spec.hidden_size * h + 3 * h + (h if window else 0)
        return MixerCost(new_parameters=params, state_fixed=h * spec.head_dim**2 + window_cache_size(window, spec), state_per_token=0)

    def steps(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """dt (B, H, T), zero at pads so they neither write nor decay (`ops_gated.ssd_steps`)."""
        return ssd_steps(hidden_states, self.dt_proj.weight, self.dt_bias, padding_mask)

    def kernel(self):
        return "simple_gla", (self.spec.head_dim, self.spec.head_dim)  # a window, if any, runs beside it (windows.py: flex_attention on CUDA)

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state) -> torch.Tensor:
        if self.fuses_step(hidden_states, q, k, v, position_embeddings, state):
            return self.fused_step(hidden_states, q, k, v, position_embeddings, padding_mask, state)
        dtype = torch.promote_types(q.dtype, torch.float32)
        groups = self.spec.groups
        c, b, x = q.to(dtype), repeat_heads(k, groups).to(dtype), repeat_heads(v, groups).to(dtype)
        dt = self.steps(hidden_states, padding_mask)
        g = -self.A_log.to(dtype).exp()[:, None] * dt
        tensors = state.tensors if state is not None else None
        initial = tensors.get("ssm") if tensors is not None else None
        decode = state is not None and q.shape[2] == 1
        y, ssm = simple_gla(
            c, b * dt[..., None], x, g, self.spec.scaling, initial, decode=decode, output_state=state is not None, dtype=q.dtype
        )
        new = {"ssm": ssm}
        y = y + self.D.to(dtype)[:, None, None] * x
        if self.window:
            share = torch.sigmoid(self.window_logit.to(dtype))
            y, cache = add_window(self.spec, self.window, y, share, q, k, v, position_embeddings, padding_mask, tensors, self.dropped_window())
            new.update(cache)
        if state is not None:
            state.write(new)
        if padding_mask is not None:
            y = y * padding_mask[:, None, :, None]
        return y

    def fresh_step_state(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, h, _, d = q.shape
        return {"ssm": torch.zeros(batch, h, d, d, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))}

    def launch_step(self, hidden_states, q, k, v, cos, sin, real, tensors) -> torch.Tensor:
        step = mamba2_step if self.launches_triton(hidden_states, q, k, v, cos, sin, tensors) else cpu_step.mamba2_step
        return step(
            hidden_states, q, k, v, cos, sin, real, self.dt_proj.weight, self.dt_bias, self.A_log, self.D,
            self.window_logit if self.window else None, tensors["ssm"], tensors.get("k"), tensors.get("v"),
            tensors.get("mask"), self.spec.scaling, self.spec.softcap,
        )
