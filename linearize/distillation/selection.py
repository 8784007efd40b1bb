"""Choosing which layers keep softmax attention (`convert.keep_attention: auto:N`).

Each converted layer is scored by how much converting it hurts: its attention-transfer error on held-out text,
normalised by the mean square of the teacher's output in that layer. The raw error is a poor guide, because
the residual stream (and with it every layer's output) grows with depth, so raw errors rank deep layers first
whatever their quality. Optionally each layer is also scored end to end, by the KL divergence of the logits
when only that layer is converted. The N worst layers go back to the teacher's attention.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..config import SelectionConfig
from ..hf.errors import LinearizeError
from ..hf.mixers import mixers_in, teacher_mode
from ..surgery import revert_to_attention
from .stages.attention_transfer import layer_errors
from .kd import kd_losses

AUTO = re.compile(r"auto:([0-9]*\.?[0-9]+)")


def auto_amount(keep_attention: Any) -> float | None:
    """The N or fraction F of `auto:N` / `auto:F`; None when keep_attention is not automatic."""
    if not isinstance(keep_attention, str) or not keep_attention.strip().startswith("auto"):
        return None
    match = AUTO.fullmatch(keep_attention.strip())
    amount = float(match.group(1)) if match else 0.0
    if amount <= 0 or (amount >= 1 and amount != int(amount)):
        raise LinearizeError(
            f"keep_attention: cannot read {keep_attention!r}; use auto:N for N layers (e.g. auto:4) or auto:F for a fraction (e.g. auto:0.25)"
        )
    return amount


def auto_count(amount: float, num_layers: int) -> int:
    count = round(amount * num_layers) if amount < 1 else int(amount)
    if not 1 <= count < num_layers:
        raise LinearizeError(
            f"keep_attention: auto:{amount:g} keeps {count} of {num_layers} layers; keep at least one and convert at least one"
        )
    return count


@torch.no_grad()
def single_layer_kl(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """Per converted layer: KL(teacher || model) of the logits when only that layer is converted, per token."""
    device = next(model.parameters()).device
    mixers = sorted(mixers_in(model), key=lambda m: m.layer_idx)
    totals = {m.layer_idx: 0.0 for m in mixers}
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        with teacher_mode(model):
            teacher = model(input_ids=batch, use_cache=False).logits
            for mixer in mixers:
                mixer.teacher = False
                student = model(input_ids=batch, use_cache=False).logits
                mixer.teacher = True
                totals[mixer.layer_idx] += kd_losses(student, teacher, batch, 1.0)[0].item() * batch.shape[0]
    return {index: total / windows.shape[0] for index, total in totals.items()}


def select_attention(model: nn.Module, windows: torch.Tensor, count: int, config: SelectionConfig) -> dict[str, Any]:
    """Score every converted layer on `windows`, revert the `count` worst to softmax attention, and record the
    choice and the per-layer figures in `model.config.selection` (saved with the model). Returns that record.

    Example:
        >>> select_attention(student, data.heldout_windows(max_tokens=16384), 4, SelectionConfig())["kept_attention"]
    """
    was_training = model.training
    model.eval()
    errors = layer_errors(model, windows, config.batch_size)
    kl = single_layer_kl(model, windows, config.batch_size) if config.kl else None
    model.train(was_training)
    if count >= len(errors):
        raise LinearizeError(f"keep_attention: auto keeps {count} layers but only {len(errors)} are converted; keep fewer")
    score = kl if kl is not None else {i: e["normalized"] for i, e in errors.items()}
    ranked = sorted(errors, key=lambda i: score[i], reverse=True)
    keep = sorted(ranked[:count])
    figures = [{"layer": i, **errors[i], **({"kl": kl[i]} if kl is not None else {}), "rank": ranked.index(i) + 1} for i in sorted(errors)]
    selection = {
        "method": "single-layer logit KL" if kl is not None else "attention-transfer MSE / teacher output mean square",
        "kept_attention": keep,
        "tokens": int(windows.numel()),
        "layers": figures,
    }
    revert_to_attention(model, keep)
    model.config.selection = selection
    return selection


def apply_selection(model: nn.Module, selection: dict[str, Any]) -> None:
    """Replay a recorded selection (a resumed run reuses the choice instead of measuring again)."""
    revert_to_attention(model, selection["kept_attention"])
    model.config.selection = selection
