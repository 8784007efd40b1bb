"""The gated RMSNorms that close qwen3_5's Gated DeltaNet layer and bamba's Mamba-2 layer, as transformers runs them:
the PyTorch path's, which the CPU decode steps (`cpu_step`) call too."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dimension, times `weight`, times SiLU(gate): qwen3_5's `RMSNormGated` (in float32,
    or float64 for float64 inputs)."""
    dtype, acc = x.dtype, torch.promote_types(x.dtype, torch.float32)
    normed = F.rms_norm(x.to(acc), x.shape[-1:], None, eps)
    return ((weight * normed.to(dtype)) * F.silu(gate.to(acc))).to(dtype)


def gated_group_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """bamba's `BambaRMSNormGated` per head: RMSNorm over the last dimension of y * SiLU(gate) (B, H, T, D), times
    `weight` (H, D), in float32 (float64 for float64 inputs)."""
    acc = torch.promote_types(y.dtype, torch.float32)
    gated = y.to(acc) * F.silu(gate.to(acc))
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(acc)[:, None, :] * normed
