"""Choosing which layers keep softmax attention (`convert.keep_attention: auto:N`).

Each converted layer is scored by how much converting it hurts: its attention-transfer error on held-out text,
normalised by the mean square of the teacher's output in that layer. The raw error is a poor guide, because
the residual stream (and with it every layer's output) grows with depth, so raw errors rank deep layers first
whatever their quality. Optionally each layer is also scored end to end: by the KL divergence of the logits when
only that layer is converted (`kl`), or by how much the KL of the fully converted model falls when that layer
alone goes back to softmax attention (`restore`, as fla-org's hybrid distillation chooses). The N worst layers
go back to the teacher's attention; with `restore`, each scorer proposes N layers and the proposal whose model
is measured closest to the teacher wins.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..config import SelectionConfig
from ..hf.errors import LinearizeError
from ..hf.mixers import mixers_in, teacher_mode
from ..hf.plan import ATTENTION
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
def _kl(model: nn.Module, windows: torch.Tensor, batch_size: int, restored: list[set[int]]) -> list[float]:
    """KL(teacher || model) per token on `windows` for each set of layers in `restored` put back on softmax
    attention (the teacher's logits computed once per batch)."""
    device = next(model.parameters()).device
    mixers = mixers_in(model)
    totals = [0.0] * len(restored)
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        with teacher_mode(model):
            teacher = model(input_ids=batch, use_cache=False).logits
            for n, layers in enumerate(restored):
                for mixer in mixers:
                    mixer.teacher = mixer.layer_idx in layers
                student = model(input_ids=batch, use_cache=False).logits
                totals[n] += kd_losses(student, teacher, batch, 1.0)[0].item() * batch.shape[0]
    return [total / windows.shape[0] for total in totals]


def single_layer_kl(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """Per converted layer: KL(teacher || model) of the logits when only that layer is converted, per token."""
    layers = sorted(m.layer_idx for m in mixers_in(model))
    return dict(zip(layers, _kl(model, windows, batch_size, [set(layers) - {i} for i in layers])))


def restore_gains(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> tuple[float, dict[int, float]]:
    """The KL of the fully converted model, and per layer how much it falls when that layer alone is restored."""
    layers = sorted(m.layer_idx for m in mixers_in(model))
    converted, *each = _kl(model, windows, batch_size, [set()] + [{i} for i in layers])
    return converted, {i: converted - kl for i, kl in zip(layers, each)}


METHODS = {"error": "attention-transfer MSE / teacher output mean square", "kl": "single-layer logit KL", "restore": "restore-one-layer KL gain"}


def select_attention(
    model: nn.Module, windows: torch.Tensor, count: int, config: SelectionConfig, keep_as: str = ATTENTION, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Score every converted layer on `windows`, revert the `count` worst to softmax attention (the teacher's layer,
    or the mixer `keep_as` with `options`: see `revert_to_attention`), and record the
    choice and the per-layer figures in `model.config.selection` (saved with the model). Returns that record.
    With `config.restore`, each scorer proposes its layers and the proposal whose restored model has the lowest
    KL to the teacher wins (`candidates` records each proposal and its KL).

    Example:
        >>> select_attention(student, data.heldout_windows(max_tokens=16384), 4, SelectionConfig())["kept_attention"]
    """
    was_training = model.training
    model.eval()
    errors = layer_errors(model, windows, config.batch_size)
    if count >= len(errors):
        model.train(was_training)
        raise LinearizeError(f"keep_attention: auto keeps {count} layers but only {len(errors)} are converted; keep fewer")
    scores = {"error": {i: e["normalized"] for i, e in errors.items()}}
    if config.kl:
        scores["kl"] = single_layer_kl(model, windows, config.batch_size)
    if config.restore:
        converted, scores["restore"] = restore_gains(model, windows, config.batch_size)
    proposals = {name: sorted(sorted(errors, key=lambda i: score[i], reverse=True)[:count]) for name, score in scores.items()}
    candidates = None
    if config.restore:
        measured = _kl(model, windows, config.batch_size, [set(keep) for keep in proposals.values()])
        candidates = {name: {"kept_attention": keep, "kl": kl} for (name, keep), kl in zip(proposals.items(), measured)}
        method = min(candidates, key=lambda name: candidates[name]["kl"])
    else:
        method = "kl" if config.kl else "error"
    model.train(was_training)
    ranked = sorted(errors, key=lambda i: scores[method][i], reverse=True)
    extra = {"kl": "kl", "restore": "restore_gain"}
    figures = [
        {"layer": i, **errors[i], **{extra[name]: score[i] for name, score in scores.items() if name in extra}, "rank": ranked.index(i) + 1}
        for i in sorted(errors)
    ]
    selection = {"method": METHODS[method], "kept_attention": proposals[method], "tokens": int(windows.numel()), "layers": figures}
    if candidates is not None:
        selection.update(converted_kl=converted, candidates={METHODS[name]: c for name, c in candidates.items()})
    revert_to_attention(model, proposals[method], keep_as, options)
    model.config.selection = selection
    return selection


def apply_selection(model: nn.Module, selection: dict[str, Any], keep_as: str = ATTENTION, options: dict[str, Any] | None = None) -> None:
    """Replay a recorded selection (a resumed run reuses the choice instead of measuring again)."""
    revert_to_attention(model, selection["kept_attention"], keep_as, options)
    model.config.selection = selection
