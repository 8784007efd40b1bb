"""Reading a teacher's attention module: where its projections are, how it shapes heads, norms and RoPE.

Every mixer reuses the teacher's q/k/v/o through an `AttentionSpec`, so one reading serves all of them.
The reading is checked against the teacher itself at conversion time (see `linearize.surgery`), which is
how a family that computes attention some other way is refused instead of silently converted wrong.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import LinearizeError
from .triton_rope import rotary, rotary_problem

ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
OUTPUT_NAMES = ("o_proj", "dense", "out_proj")
NORM_NAMES = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))
# A decode step's SDPA backends by priority. On an H200 (torch 2.11) torch's own choice for one query is cuDNN, which
# builds an execution graph for every new key length: 37-66 ms of host time a call, against 37-70 us for flash
# (`benchmarks/sdpa_decode.py`, BENCHMARKS.md, twentieth session). With a mask (padding) flash declines and
# memory-efficient attention runs.
DECODE_SDPA_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
_SDPA_ENABLED = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
}
SUPPORTED = (
    "separate q_proj/k_proj/v_proj or fused qkv_proj / GPT-NeoX query_key_value projections, an o_proj/dense "
    "output, optional per-head or full-width q/k norms, rotate-half RoPE (full or partial)"
)


@dataclass(frozen=True)
class AttentionSpec:
    """How to compute a teacher attention module's q, k, v and output with its own weights."""

    layout: str  # "separate" | "fused" | "neox"
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    output: str
    q_norm: str | None
    k_norm: str | None
    norm_per_head: bool
    scaling: float
    sliding_window: int | None
    softcap: float | None

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def read(cls, attn: nn.Module, config, layer_idx: int) -> "AttentionSpec":
        """Inspect `attn` (layer `layer_idx`'s teacher attention) and its `config`; raise LinearizeError if unreadable."""
        kind = type(attn).__name__
        where = f"layer {layer_idx}: "
        if getattr(attn, "sinks", None) is not None or getattr(config, "clip_qkv", None):
            raise LinearizeError(f"{where}{kind} uses attention sinks or clipped qkv, which linearize cannot reuse; supported: {SUPPORTED}")
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
        head_dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if all(isinstance(getattr(attn, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj")):
            layout = "separate"
        elif isinstance(getattr(attn, "qkv_proj", None), nn.Module):
            layout = "fused"
        elif isinstance(getattr(attn, "query_key_value", None), nn.Module) and type(attn).__name__.startswith("GPTNeoX"):
            layout = "neox"
        else:
            children = ", ".join(n for n, _ in attn.named_children()) or "none"
            raise LinearizeError(f"{where}{kind} has no q/k/v projections linearize recognises (children: {children}); supported: {SUPPORTED}")
        output = next((n for n in OUTPUT_NAMES if isinstance(getattr(attn, n, None), nn.Module)), None)
        if output is None:
            raise LinearizeError(f"{where}{kind} has no output projection named {'/'.join(OUTPUT_NAMES)}; supported: {SUPPORTED}")
        q_norm = k_norm = None
        norm_per_head = True
        for qn, kn in NORM_NAMES:
            if isinstance(getattr(attn, qn, None), nn.Module):
                q_norm, k_norm = qn, kn
                weight = getattr(getattr(attn, qn), "weight", None)
                norm_per_head = weight is None or weight.shape[-1] == head_dim
        softcap = getattr(attn, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
        return cls(
            layout=layout,
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            output=output,
            q_norm=q_norm,
            k_norm=k_norm,
            norm_per_head=norm_per_head,
            scaling=float(getattr(attn, "scaling", head_dim**-0.5)),
            sliding_window=_sliding_window(attn, config, layer_idx),
            softcap=float(softcap) if softcap else None,
        )

    def project(self, attn: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, Hkv, T, D) after q/k norms and before RoPE, from the teacher's own modules."""
        batch, length, width = hidden_states.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # (B * T, C) rows: a projection of them is one matrix product, of (B, T, C) four operations (the same product).
        x = hidden_states.reshape(-1, width)
        if self.layout == "separate":
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        elif self.layout == "fused":
            q, k, v = attn.qkv_proj(x).split((h * d, hkv * d, hkv * d), dim=-1)
        else:  # GPT-NeoX interleaves q, k, v per head
            q, k, v = attn.query_key_value(x).view(batch, length, h, 3 * d).chunk(3, dim=-1)
        if self.q_norm is not None and not self.norm_per_head:
            q, k = getattr(attn, self.q_norm)(q), getattr(attn, self.k_norm)(k)
        q = q.reshape(batch, length, h, d)
        k = k.reshape(batch, length, hkv, d)
        v = v.reshape(batch, length, hkv, d)
        if self.q_norm is not None and self.norm_per_head:
            q, k = getattr(attn, self.q_norm)(q), getattr(attn, self.k_norm)(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def out(self, attn: nn.Module, heads: torch.Tensor) -> torch.Tensor:
        """Merge heads (B, H, T, D) and apply the teacher's output projection."""
        batch, _, length, _ = heads.shape
        return getattr(attn, self.output)(heads.transpose(1, 2).reshape(batch * length, -1)).view(batch, length, -1)

    def projections(self) -> tuple[str, ...]:
        """Names of the modules holding the reused weights (LoRA targets them)."""
        qkv = {"separate": ("q_proj", "k_proj", "v_proj"), "fused": ("qkv_proj",), "neox": ("query_key_value",)}
        return (*qkv[self.layout], self.output)


def _sliding_window(attn: nn.Module, config, layer_idx: int) -> int | None:
    # Families set it on the module (per layer type), or only in the config (then every layer slides, unless
    # `layer_types` says which do).
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def chunk_causal_mask(length: int, past: int, kv_length: int, device: torch.device | str) -> torch.Tensor:
    """(1, 1, length, kv_length) bool: query i of a chunk that follows `past` cached tokens sees keys 0 to past + i
    (slots beyond, a static cache's empty ones, are masked). One mask for the whole batch where no sequence is
    padded: SDPA's memory-efficient kernel turns a boolean mask into a float one of the mask's own shape, so a
    mask per sequence (transformers' expanded view) costs length x kv_length x 2 bytes a sequence, 268 MB for a
    4K chunk at 32K in bf16, and this one that once.
    """
    return (torch.arange(kv_length, device=device) <= torch.arange(past, past + length, device=device)[:, None])[None, None]


def decode_attention(device: torch.device | str, length: int) -> AbstractContextManager:
    """The SDPA backends for a forward of `length` new tokens on `device`: for an eager single-token step on CUDA,
    the backends enabled now (a caller's `sdpa_kernel` stays in force) in `DECODE_SDPA_ORDER`; otherwise torch's own
    choice. A compiled step keeps torch's: its key length is fixed, so cuDNN builds its graph once.

    Example (what a converted model's forward does; any eager decode loop can do the same):
        >>> with decode_attention(model.device, next_token.shape[1]):
        ...     out = model(next_token, past_key_values=cache, use_cache=True)
    """
    if torch.device(device).type != "cuda" or length != 1 or torch.compiler.is_compiling():
        return nullcontext()
    enabled = [backend for backend in DECODE_SDPA_ORDER if _SDPA_ENABLED[backend]()]
    return sdpa_kernel(enabled, set_priority=True) if enabled else nullcontext()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a model's matrix products run in for `x`: autocast's on x's device where it is on (mixed-precision
    training, whose hidden states stay in the weights' float32), else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def apply_rotary(q: torch.Tensor, k: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE on the first `cos.shape[-1]` dimensions of q and k (B, H, T, D); None means no RoPE. On CUDA
    one Triton kernel (`triton_rope.rotary`) where it takes them; this is its reference.

    Under autocast q and k come from the projections in autocast's dtype and cos and sin in the model's (float32):
    they rotate in q's dtype, as in a model of that dtype. Rotated in float32 they would leave float32, and the fused
    RoPE and window kernels, which take one dtype, would fall back to PyTorch in every mixed-precision training step."""
    if position_embeddings is None:
        return q, k
    cos, sin = position_embeddings
    if q.dtype == k.dtype == compute_dtype(q) != cos.dtype:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if rotary_problem(q, k, cos, sin) is None:
        return rotary(q, k, cos, sin)
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    rot = cos.shape[-1]
    if q.shape[2] == 1 and q.dtype == k.dtype and q.shape[0] == k.shape[0] and rot == q.shape[-1]:
        # One token: q's and k's heads rotated together, the same arithmetic in half the operations (a decode step off
        # the fused path is bound by their number).
        both = torch.cat((q, k), dim=1)
        return (both * cos + rotate_half(both) * sin).split((q.shape[1], k.shape[1]), dim=1)

    def rotate(x):
        if rot == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        x_rot = x_rot * cos + rotate_half(x_rot) * sin
        return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot

    return rotate(q), rotate(k)


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * groups, T, D), each kv head serving `groups` consecutive query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    window: int | None = None,
    softcap: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive causal softmax attention, the quadratic reference. q (B, H, T, D); k, v (B, H, S, D) with S >= T.

    Queries are the last T positions of the S keys. `window` keeps keys with t - window < s <= t;
    `key_mask` (B, S) marks valid keys. Computed in float32 (float64 for float64 inputs), returned in v's dtype.
    """
    length, total = q.shape[-2], k.shape[-2]
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhtd,bhsd->bhts", q.to(acc), k.to(acc)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    t = torch.arange(total - length, total, device=q.device)[:, None]
    s = torch.arange(total, device=q.device)[None, :]
    allowed = s <= t
    if window:
        allowed = allowed & (s > t - window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhts,bhsd->bhtd", probs, v.to(acc)).to(v.dtype)


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList holding a causal LM's decoder layers (the one whose length is the layer count)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise LinearizeError(
        f"found no list of {num_layers} decoder layers in {type(model).__name__}; linearize converts decoder-only "
        "causal LMs whose layers hold an attention module"
    )


def attention_slot(layer: nn.Module, where: str = "") -> str:
    """Name of the attention child inside one decoder layer."""
    for name in ATTENTION_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    children = ", ".join(n for n, _ in layer.named_children()) or "none"
    raise LinearizeError(
        f"{where}{type(layer).__name__} has no attention module named {'/'.join(ATTENTION_NAMES)} (children: {children}); "
        "linearize converts decoders whose layers all hold softmax attention"
    )


def reference_attention(spec: AttentionSpec, attn: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The teacher's causal softmax attention recomputed from `spec` (used to check a reading against the teacher)."""
    q, k, v = spec.project(attn, hidden_states)
    q, k = apply_rotary(q, k, position_embeddings)
    k, v = repeat_heads(k, spec.groups), repeat_heads(v, spec.groups)
    out = softmax_attention(q, k, v, spec.scaling, window=spec.sliding_window, softcap=spec.softcap)
    return spec.out(attn, out.to(hidden_states.dtype))


def l2_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


__all__ = [
    "AttentionSpec",
    "apply_rotary",
    "attention_slot",
    "decoder_layers",
    "l2_relative",
    "reference_attention",
    "repeat_heads",
    "softmax_attention",
]
