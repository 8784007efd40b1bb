"""Gated DeltaNet built on the teacher's attention weights (the gated delta rule of Yang, Kautz & Hatamizadeh).

q, k and v are the teacher's projections through a short causal depthwise convolution; q and k are then
L2-normalised per head and kv heads expanded to the query heads. The state (D x D per head) is written with
the gated delta rule, read with scale 1 (a normalised query retrieves a stored value at its own size, as the
teacher's softmax returns a convex mix of values). New per layer: the convolution, the write strength
beta = sigmoid(W_beta x + b_beta) and the decay g = -exp(A_log) * softplus(W_a x + dt_bias), per head.

The start, chosen on SmolLM2-135M (2 x 256 tokens of prose, every layer's output against the teacher's):
- the convolutions are identities (all weight on the current token, no activation): q/k/v are the teacher's;
- W_beta = W_a = 0, beta = 0.5 and a per-token decay of 0.9: mean relative error 0.945, cosine 0.42;
  slower decays drift further (0.99: 1.02, 0.999: 1.17) and scale D^-0.5 only shrinks the output (0.99);
- no RoPE: with it the cosine drops to 0.36 (error 0.953). The delta rule compares keys with each other, and
  the convolution and decay carry position, as in Gated DeltaNet itself.
No start is close to softmax attention (a zero output has error 1.0); distillation does the rest.
With `window` > 0, each head returns s * (the teacher's softmax over the last `window` keys, with RoPE) +
(1 - s) * the delta rule's output, s = sigmoid(window_logit) learned per head from 0.5. With every layer of
SmolLM2-135M converted, window 64 takes the start's mean error to 0.40 and Persuasion's perplexity from 45,273
to 188 (`benchmarks/conversion_start.py`); starting s at 0.75 lowers the perplexity (97) but raises the error
(0.62) that attention transfer minimises.
Left padding is skipped exactly: pads write nothing, decay nothing and never enter the convolution state.
A decode step on CUDA (inference) runs as one fused Triton step, `triton_step.gated_deltanet_step`, where it can;
the PyTorch path below is the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_step
from .attention import AttentionSpec, compute_dtype, repeat_heads
from .errors import LinearizeError
from .gates import inverse_softplus, logit
from .kernel_dispatch import gated_delta_rule
from .mixers import FusedStepMixer, MixerCost, register_mixer
from .ops_delta import delta_rule_gates, step_gated_delta_rule
from .triton_conv import causal_conv, conv_prefill_problem
from .triton_step import gated_deltanet_step
from .windows import add_window, check_window, effective_window, window_cache_size


def short_conv(
    x: torch.Tensor, weight: torch.Tensor, cache: torch.Tensor | None, padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution of x (B, C, T) with weight (C, K), continuing from `cache` (B, C, K - 1).

    `cache` holds the K - 1 inputs before x (None: zeros). Left pads marked False in `padding_mask` (B, T)
    are removed from the stream, so a real token sees the real inputs before it and the pads leave no trace
    in the returned cache (the last K - 1 real inputs). Outputs at pad positions are meaningless.
    """
    batch, channels, length = x.shape
    kernel = weight.shape[-1]
    if cache is None:
        cache = x.new_zeros(batch, channels, kernel - 1)
    seq = torch.cat((cache.to(x.dtype), x), dim=-1)
    if padding_mask is not None:
        seq = _pads_first(seq, padding_mask, kernel, dim=2)
    weight = weight.to(x.dtype)
    # A few shifted multiply-adds: exact (the identity start returns x bit for bit) and faster than conv1d here;
    # a decode step's one output is a product and a sum.
    if length == 1:
        out = (seq * weight).sum(-1, keepdim=True)
    else:
        out = sum(seq[..., j : j + length] * weight[:, j, None] for j in range(kernel))
    # A copy: a view would keep a long prefill's whole (B, C, T) input alive in the cache.
    return out, seq[..., seq.shape[-1] - (kernel - 1) :].clone()


def _pads_first(seq: torch.Tensor, padding_mask: torch.Tensor, kernel: int, dim: int) -> torch.Tensor:
    """seq, the K - 1 cached inputs then T new ones along `dim` (batch first), with each row's left pads (False in
    `padding_mask` (B, T)) moved to the front as zeros: [cache, pads, real] -> [pads, cache, real]."""
    pads = (~padding_mask).sum(-1, keepdim=True)  # (B, 1); pads are on the left
    index = torch.arange(seq.shape[dim], device=seq.device)
    source = torch.where(index >= pads + kernel - 1, index, index - pads).clamp_min(0)
    keep = index >= pads
    shape = [1] * seq.dim()
    shape[0], shape[dim] = seq.shape[0], seq.shape[dim]
    return seq.gather(dim, source.view(shape).expand(seq.shape)) * keep.view(shape)


def check_conv_size(conv_size: int, name: str) -> None:
    """Refuse a short convolution's kernel below 1 (the option every mixer with one takes)."""
    if conv_size < 1:
        raise LinearizeError(f"option 'conv_size' of mixer {name!r} must be at least 1 (1: no mixing across tokens), got {conv_size}")


def fresh_delta_rule_state(q: torch.Tensor, conv_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A gated delta rule's decode state before any token, for q's batch (B, H, 1, D): the short convolution's cache
    (B, C, K - 1) for conv_weight (C, K) and the state (B, H, D, D), zeros in float32 (or wider, as q)."""
    batch, h, _, d = q.shape
    channels, taps = conv_weight.shape
    zeros = dict(device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
    return {"conv": torch.zeros(batch, channels, taps - 1, **zeros), "recurrent": torch.zeros(batch, h, d, d, **zeros)}


def convolve_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    padding_mask: torch.Tensor | None,
    cache: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`short_conv` over the channels of q (B, H, T, D), k and v (B, Hkv, T, D), concatenated in that order
    (weight: (C, K) with C = (H + 2 Hkv) D), in float32 or wider. Returns q, k, v and the new convolution cache
    (B, C, K - 1), as `short_conv` leaves it.

    A prefill is computed time-major, (B, T, C), the projections' own layout: the concatenation is the one copy before
    the K shifted products, which read the inputs in their own dtype (the cache holds earlier inputs, exact in it), and
    the heads come back as views with a contiguous last dimension. A decode step is `short_conv` itself, on the
    heads' channel-major view. Either way the products and their sums are `short_conv`'s, in the same order, so the
    outputs are the same to the bit; but an inference prefill on CUDA takes one Triton kernel (`triton_conv.causal_conv`:
    the same sums, within an ulp of float32 where it fuses a product into its sum).
    """
    batch, h, length, d = q.shape
    hkv = k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    kernel = weight.shape[-1]
    if length == 1:  # a decode step: `short_conv` itself, channel-major (a (B, C, 1) view of the heads)
        out, cache = short_conv(torch.cat((q, k, v), dim=1).to(dtype).reshape(batch, -1, 1), weight, cache, padding_mask)
        return (*out.view(batch, -1, 1, d).split((h, hkv, hkv), dim=1), cache)
    x = torch.cat([t.transpose(1, 2).reshape(batch, length, -1) for t in (q, k, v)], dim=-1)
    head = x.new_zeros(batch, kernel - 1, x.shape[-1]) if cache is None else cache.transpose(1, 2).to(x.dtype)
    seq = torch.cat((head, x), dim=1)
    if padding_mask is not None:
        seq = _pads_first(seq, padding_mask, kernel, dim=1)
    taps = weight.to(dtype).t()  # (K, C)
    if conv_prefill_problem(seq, taps) is None:  # one Triton kernel, inference on CUDA (triton_conv.py)
        out = causal_conv(seq, taps, length)
    else:
        out = seq[:, :length] * taps[0]
        for j in range(1, kernel):
            out = out + seq[:, j : j + length] * taps[j]
    # A copy: a view would keep a long prefill's whole input alive in the cache.
    cache = seq[:, seq.shape[1] - (kernel - 1) :].transpose(1, 2).to(dtype, copy=True, memory_format=torch.contiguous_format)
    q, k, v = out.split((h * d, hkv * d, hkv * d), dim=-1)
    return (*(t.reshape(batch, length, -1, d).transpose(1, 2) for t in (q, k, v)), cache)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x divided by its L2 norm over the last dimension (at least 1e-12), as `F.normalize` does."""
    return F.normalize(x, dim=-1)


def delta_rule_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    tensors: dict[str, torch.Tensor],
    padding_mask: torch.Tensor | None,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    silu: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One decode step of a gated delta rule layer off the fused path, after the teacher's projections q (B, H, 1, D),
    k and v (B, Hkv, 1, D): the short convolution (continuing from `tensors`' "conv"), SiLU where `silu`, q and k
    normalised together by `normalize`, q scaled by `scale`, and the one-token update `step_gated_delta_rule` of
    "recurrent" with beta and g (B, H, 1) on (batch x head) rows. Returns the heads (B, H, 1, D) in float32 (or
    wider) and the new "conv" and "recurrent". The general path's arithmetic in about half its operations: such a
    step on the CPU is bound by their number (BENCHMARKS.md)."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    rows, conv = short_conv(torch.cat((q, k, v), dim=1).to(acc).view(b, -1, 1), conv_weight, tensors.get("conv"), padding_mask)
    rows = rows.view(b, -1, d)
    if silu:
        rows = F.silu(rows)
    qk = normalize(rows[:, : h + hkv])
    cq = qk[:, :h].reshape(b * h, 1, d)
    ck, cv = (repeat_heads(x, h // hkv).reshape(b * h, 1, d) for x in (qk[:, h:], rows[:, h + hkv :]))
    recurrent = tensors.get("recurrent")
    recurrent = rows.new_zeros(b * h, d, d) if recurrent is None else recurrent.to(acc).view(b * h, d, d)
    out, recurrent = step_gated_delta_rule(
        cq if scale == 1.0 else cq * scale, ck, cv, g.exp().view(b * h, 1, 1), beta.reshape(b * h, 1, 1), recurrent
    )
    return out.view(b, h, 1, d), {"conv": conv, "recurrent": recurrent.view(b, h, d, d)}


@dataclass
class GatedDeltaNetOptions:
    """conv_size: kernel of the short causal convolution on q, k and v (1: a per-channel scale only);
    window: > 0 mixes in the teacher's softmax over the last `window` keys, with a learned share per head."""

    conv_size: int = 4
    window: int = 0


@register_mixer
class GatedDeltaNetMixer(FusedStepMixer):
    name = "gated_deltanet"
    drops_window = True
    anchor = "Gated DeltaNet"
    summary = "gated delta rule on the teacher's q/k/v with short convolutions and learned write strength and decay"
    Options = GatedDeltaNetOptions
    step_tensors = ("conv", "recurrent")
    cpu_steps = True

    # The start (see the module docstring for why).
    initial_beta = 0.5
    initial_decay = 0.9  # per token
    initial_window_share = 0.5

    def __init__(self, attn, spec: AttentionSpec, options, layer_idx: int):
        super().__init__(attn, spec, options, layer_idx)
        reference = next(attn.parameters())
        factory = dict(dtype=reference.dtype, device=reference.device)
        h, d = spec.num_heads, spec.head_dim
        self.channels = (spec.num_heads + 2 * spec.num_kv_heads) * d
        conv = torch.zeros(self.channels, options.conv_size, **factory)
        conv[:, -1] = 1.0
        self.conv_weight = nn.Parameter(conv)
        self.beta_proj = nn.Linear(spec.hidden_size, h, **factory)
        self.decay_proj = nn.Linear(spec.hidden_size, h, bias=False, **factory)
        nn.init.zeros_(self.beta_proj.weight)
        nn.init.constant_(self.beta_proj.bias, logit(self.initial_beta))
        nn.init.zeros_(self.decay_proj.weight)
        self.A_log = nn.Parameter(torch.zeros(h, **factory))
        self.dt_bias = nn.Parameter(torch.full((h,), inverse_softplus(-math.log(self.initial_decay)), **factory))
        self.window = effective_window(options.window, spec)
        if self.window:
            self.window_logit = nn.Parameter(torch.full((h,), logit(self.initial_window_share), **factory))

    @classmethod
    def resolve(cls, options, spec: AttentionSpec, config):
        check_conv_size(options.conv_size, cls.name)
        check_window(options.window, config, cls.name, low=0)
        return options

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        h, d, kernel = spec.num_heads, spec.head_dim, options.conv_size
        channels = (spec.num_heads + 2 * spec.num_kv_heads) * d
        window = effective_window(options.window, spec)
        params = channels * kernel + 2 * spec.hidden_size * h + 3 * h + (h if window else 0)
        state = h * d * d + channels * (kernel - 1) + window_cache_size(window, spec)
        return MixerCost(new_parameters=params, state_fixed=state, state_per_token=0)

    def convolve(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None, cache: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The short convolution on q (B, H, T, D), k and v (B, Hkv, T, D); returns them and the new cache."""
        return convolve_heads(q, k, v, self.conv_weight, padding_mask, cache)

    def gates(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """beta and the log-decay g, both (B, H, T); zero at pads so they neither write nor decay."""
        return delta_rule_gates(hidden_states, self.beta_proj.weight, self.beta_proj.bias, self.decay_proj.weight, self.A_log, self.dt_bias, padding_mask)

    def kernel(self):
        return "gated_delta_rule", (self.spec.head_dim, self.spec.head_dim)  # a window, if any, runs beside it (windows.py: flex_attention on CUDA)

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state) -> torch.Tensor:
        if self.fuses_step(hidden_states, q, k, v, position_embeddings, state):
            return self.fused_step(hidden_states, q, k, v, position_embeddings, padding_mask, state)
        tensors = state.tensors if state is not None else {}
        beta, g = self.gates(hidden_states, padding_mask)
        if state is not None and q.shape[2] == 1:
            out, new = delta_rule_decode(q, k, v, self.conv_weight, beta, g, 1.0, tensors, padding_mask, unit_rows)
        else:
            cq, ck, cv, conv = self.convolve(q, k, v, padding_mask, tensors.get("conv"))
            cq, ck = unit_rows(cq), unit_rows(ck)
            groups = self.spec.groups
            ck, cv = repeat_heads(ck, groups), repeat_heads(cv, groups)
            out, recurrent = gated_delta_rule(
                cq, ck, cv, g, beta, 1.0, tensors.get("recurrent"), output_state=state is not None, dtype=compute_dtype(hidden_states)
            )
            new = {"conv": conv, "recurrent": recurrent}
        if self.window:
            share = torch.sigmoid(self.window_logit.to(out.dtype))
            out, cache = add_window(
                self.spec, self.window, out, share, q, k, v, position_embeddings, padding_mask, None if state is None else tensors, self.dropped_window()
            )
            new.update(cache)
        if state is not None:
            state.write(new)
        if padding_mask is not None:
            out = out * padding_mask[:, None, :, None]
        return out

    def fresh_step_state(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        return fresh_delta_rule_state(q, self.conv_weight)

    def launch_step(self, hidden_states, q, k, v, cos, sin, real, tensors) -> torch.Tensor:
        step = gated_deltanet_step if self.launches_triton(hidden_states, q, k, v, cos, sin, tensors) else cpu_step.gated_deltanet_step
        return step(
            hidden_states, q, k, v, cos, sin, real, self.conv_weight, self.beta_proj.weight, self.beta_proj.bias,
            self.decay_proj.weight, self.A_log, self.dt_bias, self.window_logit if self.window else None,
            tensors["conv"], tensors["recurrent"], tensors.get("k"), tensors.get("v"), tensors.get("mask"),
            self.spec.scaling, self.spec.softcap,
        )
