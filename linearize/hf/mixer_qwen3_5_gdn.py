"""Gated DeltaNet as transformers' `qwen3_5` runs it, on the teacher's attention weights: a layer that exports.

Every operation is the one `Qwen3_5GatedDeltaNet` performs, so `linearize export --to qwen3_5` writes this
layer's weights into that architecture and the exported model computes the same function:
- q, k and v are the teacher's projections (without its q/k norms, if it has them) through a short causal depthwise convolution and SiLU;
- q and k are L2-normalised per head (x / sqrt(|x|^2 + 1e-6)) and q is scaled by D^-0.5;
- kv heads are expanded to the query heads (the export repeats the k and v rows of `in_proj_qkv`);
- the state is written with the gated delta rule: beta = sigmoid(W_b x), g = -exp(A_log) * softplus(W_a x + dt_bias);
- each head's output goes through an RMSNorm (eps: the teacher's `rms_norm_eps`) gated by SiLU(W_z x), then
  the teacher's output projection.
Unlike `gated_deltanet` there is no sliding window and no bias on the write strength: qwen3_5 has neither.
On CUDA an inference decode step runs in one Triton kernel after the projections, gated norm included
(`triton_step.qwen3_5_gdn_step`, the gated_deltanet step's kernel in qwen3_5's variant), on the CPU as
`cpu_step.qwen3_5_gdn_step`; the PyTorch path (`delta_rule`, then `gated_rms_norm`) takes every other call.

The start keeps what can be kept: identity convolutions (the teacher's q/k/v before the SiLU), beta = 0.5 and a
per-token decay of 0.9 as in `gated_deltanet`, unit norm weights. The gate has no exact start (SiLU(W_z x)
cannot be a constant): W_z starts small and random (std 0.02, as transformers initialises linear layers), so
every parameter has a gradient from the first step. Distillation does the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_step
from .attention import AttentionSpec, compute_dtype, repeat_heads
from .errors import LinearizeError
from .gates import inverse_softplus
from .kernel_dispatch import gated_delta_rule
from .mixer_gated_deltanet import check_conv_size, convolve_heads, delta_rule_decode, fresh_delta_rule_state
from .mixers import FusedStepMixer, MixerCost, register_mixer
from .norms import gated_rms_norm
from .ops_delta import delta_rule_gates, l2_normalize
from .triton_step import qwen3_5_gdn_step

def resolve_eps(options, config, name: str):
    """Fill `options.eps` with the teacher's `rms_norm_eps` (what the exported model's norms use) and check it."""
    if options.eps is None:
        options.eps = float(getattr(config, "rms_norm_eps", None) or 1e-6)
    if not options.eps > 0:
        raise LinearizeError(f"option 'eps' of mixer {name!r} must be positive, got {options.eps}")
    return options


@dataclass
class Qwen35GatedDeltaNetOptions:
    """conv_size: kernel of the causal convolution on q, k and v (qwen3_5's `linear_conv_kernel_dim`);
    eps: the output norm's epsilon (default: the teacher's `rms_norm_eps`, which the exported model uses)."""

    conv_size: int = 4
    eps: float | None = None


@register_mixer
class Qwen35GatedDeltaNet(FusedStepMixer):
    name = "qwen3_5_gdn"
    anchor = "Gated DeltaNet (Qwen3.5)"
    summary = "Gated DeltaNet exactly as transformers' qwen3_5 runs it (exports with `linearize export --to qwen3_5`)"
    Options = Qwen35GatedDeltaNetOptions
    step_tensors = ("conv", "recurrent")
    cpu_steps = True
    window = 0

    initial_beta = 0.5
    initial_decay = 0.9  # per token
    gate_std = 0.02

    def __init__(self, attn, spec: AttentionSpec, options, layer_idx: int):
        super().__init__(attn, spec, options, layer_idx)
        reference = next(attn.parameters())
        factory = dict(dtype=reference.dtype, device=reference.device)
        h, d = spec.num_heads, spec.head_dim
        conv = torch.zeros((h + 2 * spec.num_kv_heads) * d, options.conv_size, **factory)
        conv[:, -1] = 1.0
        self.conv_weight = nn.Parameter(conv)
        self.b_proj = nn.Linear(spec.hidden_size, h, bias=False, **factory)
        self.a_proj = nn.Linear(spec.hidden_size, h, bias=False, **factory)
        self.z_proj = nn.Linear(spec.hidden_size, h * d, bias=False, **factory)
        nn.init.zeros_(self.b_proj.weight)
        nn.init.zeros_(self.a_proj.weight)
        with torch.no_grad():
            self.z_proj.weight.normal_(0.0, self.gate_std)
        self.A_log = nn.Parameter(torch.zeros(h, **factory))
        self.dt_bias = nn.Parameter(torch.full((h,), inverse_softplus(-math.log(self.initial_decay)), **factory))
        self.norm_weight = nn.Parameter(torch.ones(d, **factory))

    @classmethod
    def resolve(cls, options, spec: AttentionSpec, config):
        check_conv_size(options.conv_size, cls.name)
        return resolve_eps(options, config, cls.name)

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        h, d, kernel = spec.num_heads, spec.head_dim, options.conv_size
        channels = (spec.num_heads + 2 * spec.num_kv_heads) * d
        params = channels * kernel + spec.hidden_size * (2 * h + h * d) + 2 * h + d
        return MixerCost(new_parameters=params, state_fixed=h * d * d + channels * (kernel - 1), state_per_token=0)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's q/k/v projections without its q/k norms, if it has them: qwen3_5's layer has none."""
        return replace(self.spec, q_norm=None, k_norm=None).project(self.attn, hidden_states)

    def kernel(self):
        return "gated_delta_rule", (self.spec.head_dim, self.spec.head_dim)

    def gates(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """beta and the log-decay g, both (B, H, T); zero at pads so they neither write nor decay."""
        return delta_rule_gates(hidden_states, self.b_proj.weight, None, self.a_proj.weight, self.A_log, self.dt_bias, padding_mask)

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state) -> torch.Tensor:
        if self.fuses_step(hidden_states, q, k, v, position_embeddings, state):
            out = self.fused_step(hidden_states, q, k, v, position_embeddings, padding_mask, state)  # gated norm included
        else:
            out = self.delta_rule(hidden_states, q, k, v, padding_mask, state)
            batch, heads, length, d = out.shape
            z = self.z_proj(hidden_states).reshape(batch, length, heads, d).transpose(1, 2)
            out = gated_rms_norm(out.to(hidden_states.dtype), z, self.norm_weight, self.options.eps)
        if padding_mask is not None:
            out = out * padding_mask[:, None, :, None]
        return out

    def delta_rule(self, hidden_states, q, k, v, padding_mask, state) -> torch.Tensor:
        """The PyTorch path's heads (B, H, T, D) before the gated norm: convolution, SiLU, L2 norms, the rule."""
        tensors = state.tensors if state is not None else {}
        beta, g = self.gates(hidden_states, padding_mask)
        if state is not None and q.shape[2] == 1:
            out, new = delta_rule_decode(q, k, v, self.conv_weight, beta, g, self.spec.head_dim**-0.5, tensors, padding_mask, l2_normalize, silu=True)
            state.write(new)
            return out
        cq, ck, cv, conv = convolve_heads(q, k, v, self.conv_weight, padding_mask, tensors.get("conv"))
        cq, ck, cv = l2_normalize(F.silu(cq)), l2_normalize(F.silu(ck)), F.silu(cv)
        groups = self.spec.groups
        ck, cv = repeat_heads(ck, groups), repeat_heads(cv, groups)
        out, recurrent = gated_delta_rule(
            cq, ck, cv, g, beta, self.spec.head_dim**-0.5, tensors.get("recurrent"), output_state=state is not None, dtype=compute_dtype(hidden_states)
        )
        if state is not None:
            state.write({"conv": conv, "recurrent": recurrent})
        return out

    def fresh_step_state(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        return fresh_delta_rule_state(q, self.conv_weight)

    def launch_step(self, hidden_states, q, k, v, cos, sin, real, tensors) -> torch.Tensor:
        step = qwen3_5_gdn_step if self.launches_triton(hidden_states, q, k, v, cos, sin, tensors) else cpu_step.qwen3_5_gdn_step
        return step(
            hidden_states, q, k, v, real, self.z_proj(hidden_states), self.conv_weight, self.b_proj.weight, self.a_proj.weight,
            self.A_log, self.dt_bias, self.norm_weight, tensors["conv"], tensors["recurrent"], self.spec.head_dim**-0.5, self.options.eps,
        )
