"""Mamba-2 as transformers' `bamba` runs it, initialised from the teacher's attention: a layer that exports.

Every operation is the one `BambaMixer` performs (Mamba-2 with n_groups = heads and d_state = head_dim), so
`linearize export --to bamba` writes this layer's weights into that architecture and the exported model computes
the same function. Per head h of the teacher's H query heads (head size D):
- x, B and C are the teacher's v, k and q projections (without its q/k norms, if it has them; kv heads repeated
  to the query heads), which the export stacks into `in_proj` beside the gate z and the step dt;
- a causal depthwise convolution (kernel `conv_size`, with bias) over the 3 H D channels of x, B and C, then SiLU;
- dt_t = softplus(W_dt u_t + dt_bias) from the layer input u, A = -exp(A_log), and the state (D x D per head)
  S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, read as y_t = S_t C_t + D_h x_t;
- the output RMSNorm of each head's y * SiLU(z), z = W_z u (normalised after the gate, per head because the groups
  are the heads; eps: the teacher's `rms_norm_eps`), times a weight per channel, then the teacher's o_proj.
Pads have dt = 0 (no write, no decay) and never enter the convolution state, as a fresh state sees them in bamba.
On CUDA an inference decode step runs, gated norm included, in one Triton kernel (`triton_step.bamba_mamba2_step`; z's
projection before it), on the CPU as `cpu_step.bamba_mamba2_step`; the PyTorch path takes every other call.

The start, chosen on SmolLM2-135M (2 x 256 tokens of Persuasion, every layer's attention-transfer error normalised
by the teacher's output; 1.0 is a zero output's):
- the convolution taps start at 0.25 on the current token and 0 elsewhere, so SiLU(0.25 v) is near its linear range
  and C B^T ~ q k^T / 64; dt and A are mamba2's step and decay (0.001 and 30: 0.97 per token), dt taking the 64 and
  the teacher's softmax scaling into the write, so C B^T dt is mamba2's start;
- the gate has no exact start (SiLU(W_z u) cannot be a constant) and decides the rest. W_z starts at std 1, where
  SiLU(z) is near a ReLU: y keeps its sign on the channels with z > 0 and the others are zeroed; a small W_z (std
  0.02, SiLU(z) ~ z / 2) flips the signs at random instead. The norm sets the output's size whatever y is, so its
  weight starts at 0.05, and D at 0.
Mean error 0.96 (layers 0.85 to 1.01); W_z of std 0.02: 1.00, and 4.1 with a norm weight of 1; D = 0.25 (mamba2's):
0.98. No start is close to softmax attention; distillation does the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_step
from .attention import AttentionSpec, compute_dtype, repeat_heads
from .gates import inverse_softplus
from .kernel_dispatch import simple_gla
from .mixer_gated_deltanet import check_conv_size, short_conv
from .mixer_qwen3_5_gdn import resolve_eps
from .mixers import FusedStepMixer, MixerCost, register_mixer
from .norms import gated_group_rms_norm
from .ops_gated import ssd_steps
from .triton_step import bamba_mamba2_step


@dataclass
class BambaMamba2Options:
    """conv_size: kernel of the causal convolution on x, B and C (bamba's `mamba_d_conv`);
    eps: the output norm's epsilon (default: the teacher's `rms_norm_eps`, which the exported model uses)."""

    conv_size: int = 4
    eps: float | None = None


@register_mixer
class BambaMamba2(FusedStepMixer):
    name = "bamba_mamba2"
    anchor = "Mamba-2 (Bamba)"
    summary = "Mamba-2 exactly as transformers' bamba runs it, x, B, C from the teacher's v, k, q (exports with `linearize export --to bamba`)"
    Options = BambaMamba2Options
    step_tensors = ("conv", "ssm")
    cpu_steps = True
    window = 0

    # The start (see the module docstring for why).
    initial_tap = 0.25
    initial_dt = 0.001
    initial_A = 30.0
    initial_D = 0.0
    gate_std = 1.0
    initial_norm = 0.05

    def __init__(self, attn, spec: AttentionSpec, options, layer_idx: int):
        super().__init__(attn, spec, options, layer_idx)
        reference = next(attn.parameters())
        factory = dict(dtype=reference.dtype, device=reference.device)
        h, d = spec.num_heads, spec.head_dim
        conv = torch.zeros(3 * h * d, options.conv_size, **factory)
        conv[:, -1] = self.initial_tap
        self.conv_weight = nn.Parameter(conv)
        self.conv_bias = nn.Parameter(torch.zeros(3 * h * d, **factory))
        self.z_proj = nn.Linear(spec.hidden_size, h * d, bias=False, **factory)
        self.dt_proj = nn.Linear(spec.hidden_size, h, bias=False, **factory)
        with torch.no_grad():
            self.z_proj.weight.normal_(0.0, self.gate_std)
        nn.init.zeros_(self.dt_proj.weight)
        # SiLU(tap * x) ~ tap * x / 2 on each of x, B and C: dt takes the (tap / 2)^2 of C B^T back into the write
        # (and the teacher's softmax scaling into it, as mamba2 reads attention); A keeps mamba2's decay dt * A.
        dt = self.initial_dt * spec.scaling / (self.initial_tap / 2) ** 2
        self.dt_bias = nn.Parameter(torch.full((h,), inverse_softplus(dt), **factory))
        self.A_log = nn.Parameter(torch.full((h,), math.log(self.initial_A * self.initial_dt / dt), **factory))
        self.D = nn.Parameter(torch.full((h,), self.initial_D, **factory))
        self.norm_weight = nn.Parameter(torch.full((h, d), self.initial_norm, **factory))

    @classmethod
    def resolve(cls, options, spec: AttentionSpec, config):
        check_conv_size(options.conv_size, cls.name)
        return resolve_eps(options, config, cls.name)

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        h, d, kernel = spec.num_heads, spec.head_dim, options.conv_size
        channels = 3 * h * d
        params = channels * (kernel + 1) + spec.hidden_size * (h * d + h) + 3 * h + h * d
        return MixerCost(new_parameters=params, state_fixed=h * d * d + channels * (kernel - 1), state_per_token=0)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's q/k/v projections without its q/k norms, if it has them: bamba's in_proj has none."""
        return replace(self.spec, q_norm=None, k_norm=None).project(self.attn, hidden_states)

    def kernel(self):
        return "simple_gla", (self.spec.head_dim, self.spec.head_dim)

    def steps(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """dt (B, H, T), zero at pads so they neither write nor decay (`ops_gated.ssd_steps`)."""
        return ssd_steps(hidden_states, self.dt_proj.weight, self.dt_bias, padding_mask)

    def convolve(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None, cache: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, B, C (B, H, T, D each) from v, k, q after the convolution and SiLU, and the new convolution cache
        (B, 3 H D, K - 1: always K - 1 inputs, zeros before the first token)."""
        groups, (batch, h, length, d) = self.spec.groups, q.shape
        dtype = torch.promote_types(q.dtype, torch.float32)
        xbc = torch.cat((repeat_heads(v, groups), repeat_heads(k, groups), q), dim=1).to(dtype)
        out, cache = short_conv(xbc.transpose(2, 3).reshape(batch, -1, length), self.conv_weight, cache, padding_mask)
        out = F.silu(out + self.conv_bias.to(dtype)[:, None])
        x, b, c = out.reshape(batch, 3 * h, d, length).transpose(2, 3).split(h, dim=1)
        return x, b, c, cache

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state) -> torch.Tensor:
        if self.fuses_step(hidden_states, q, k, v, position_embeddings, state):
            return self.fused_step(hidden_states, q, k, v, position_embeddings, padding_mask, state)
        tensors = state.tensors if state is not None else {}
        x, b, c, conv = self.convolve(q, k, v, padding_mask, tensors.get("conv"))
        dt = self.steps(hidden_states, padding_mask)
        g = -self.A_log.to(dt.dtype).exp()[:, None] * dt
        decode = state is not None and q.shape[2] == 1
        y, ssm = simple_gla(
            c, b * dt[..., None], x, g, 1.0, tensors.get("ssm"), decode=decode, output_state=state is not None, dtype=compute_dtype(hidden_states)
        )
        if state is not None:
            state.write({"conv": conv, "ssm": ssm})
        y = y + self.D.to(x.dtype)[:, None, None] * x
        batch, heads, length, d = y.shape
        z = self.z_proj(hidden_states).reshape(batch, length, heads, d).transpose(1, 2)
        out = gated_group_rms_norm(y, z, self.norm_weight, self.options.eps)
        if padding_mask is not None:
            out = out * padding_mask[:, None, :, None]
        return out

    def fresh_step_state(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, h, _, d = q.shape
        zeros = dict(device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
        return {"conv": torch.zeros(batch, 3 * h * d, self.conv_weight.shape[1] - 1, **zeros), "ssm": torch.zeros(batch, h, d, d, **zeros)}

    def launch_step(self, hidden_states, q, k, v, cos, sin, real, tensors) -> torch.Tensor:
        step = bamba_mamba2_step if self.launches_triton(hidden_states, q, k, v, cos, sin, tensors) else cpu_step.bamba_mamba2_step
        return step(
            hidden_states, q, k, v, real, self.z_proj(hidden_states), self.conv_weight, self.conv_bias, self.dt_proj.weight,
            self.dt_bias, self.A_log, self.D, self.norm_weight, tensors["conv"], tensors["ssm"], self.options.eps,
        )
