"""Stage 1, attention transfer: every converted layer learns to reproduce its own teacher attention output.

Each mixer computes the teacher's output itself, under no_grad, and passes it on (`Mixer.transfer_hook`), so
every layer sees the teacher's own inputs and all layers train together in one forward pass. The loss is the
mean squared error between each layer's output and the teacher's, summed over layers; a layer's parameters
reach only its own term, so the sum trains the layers independently. Only the parameters the mixers added
train (feature maps, gates, convolutions); mixers that added none pass the teacher output on untouched.

Not implemented: LoLCATs' optional cross-entropy between attention weights. It needs every mixer to expose its
attention weights (T x T per head, with window and feature-map parts combined), which the mixers do not do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import register_stage
from ..hf.errors import LinearizeError
from ..hf.mixers import mixers_in
from .engine import Session, TrainConfig, train


@register_stage("attention_transfer")
@dataclass
class AttentionTransferConfig(TrainConfig):
    """Train the mixers' new parameters so each converted layer matches its teacher output (MSE, per layer)."""

    kind: str = "attention_transfer"
    lr: float = 1e-2


class TransferProbe:
    """Sets the transfer hook on every mixer while active; holds each layer's error on the last forward pass.

    `errors[i]` is the mean squared error of layer i (with its graph, for training) and `scales[i]` the mean
    square of the teacher's output there (detached), which normalises errors across depth.
    """

    def __init__(self, model: nn.Module):
        self.mixers = sorted(mixers_in(model), key=lambda m: m.layer_idx)
        self.errors: dict[int, torch.Tensor] = {}
        self.scales: dict[int, torch.Tensor] = {}

    def hook(self, mixer, student: torch.Tensor, teacher: torch.Tensor) -> None:
        # Gradient checkpointing runs this again in the backward pass; the recomputed values are the same.
        teacher = teacher.detach().float()
        self.errors[mixer.layer_idx] = (student.float() - teacher).pow(2).mean()
        self.scales[mixer.layer_idx] = teacher.pow(2).mean()

    def __enter__(self) -> "TransferProbe":
        for mixer in self.mixers:
            mixer.transfer_hook = self.hook
        return self

    def __exit__(self, *exc) -> None:
        for mixer in self.mixers:
            mixer.transfer_hook = None

    @property
    def layers(self) -> list[int]:
        return [m.layer_idx for m in self.mixers]


@torch.no_grad()
def layer_errors(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[int, dict[str, float]]:
    """Per converted layer on `windows`: the raw MSE to the teacher output, the teacher output's mean square,
    and their ratio (`normalized`), each layer fed the teacher's inputs.

    Example:
        >>> errors = layer_errors(student, data.heldout_windows(512, 8192))
        >>> max(errors, key=lambda i: errors[i]["normalized"])
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    squared: dict[int, float] = {}
    scale: dict[int, float] = {}
    try:
        with TransferProbe(model) as probe:
            for batch in windows.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False, logits_to_keep=1)
                weight = batch.shape[0]
                for i in probe.layers:
                    squared[i] = squared.get(i, 0.0) + probe.errors[i].item() * weight
                    scale[i] = scale.get(i, 0.0) + probe.scales[i].item() * weight
    finally:
        model.train(was_training)
    count = windows.shape[0]
    return {
        i: {"mse": squared[i] / count, "teacher_mean_square": scale[i] / count, "normalized": squared[i] / max(scale[i], 1e-30)}
        for i in sorted(squared)
    }


def run(model: nn.Module, data, config: AttentionTransferConfig, session: Session | None = None) -> nn.Module:
    """Attention transfer on `data.train`; returns the same model with its mixers' new parameters trained.

    Example:
        >>> student = attention_transfer.run(student, data, AttentionTransferConfig(tokens=2_000_000))
    """
    session = session or Session()
    probe = TransferProbe(model)
    if not probe.mixers:
        raise LinearizeError("attention_transfer needs a converted model and found no mixers; convert it first with linearize.convert")
    trained = [m for m in probe.mixers if m.new_parameters()]
    idle = [m for m in probe.mixers if not m.new_parameters()]
    where = f"stages[{session.stage_index}] (attention_transfer)"
    if idle:
        names = ", ".join(sorted({m.name for m in idle}))
        session.say(f"{where}: layers {[m.layer_idx for m in idle]} ({names}) add no parameters; they pass the teacher output on untrained")
    if not trained:
        session.say(f"{where}: no converted layer has parameters of its own, so there is nothing to train; skipped")
        session.reports.append({"stage": session.stage_index, "kind": config.kind, "steps": 0, "skipped": "no new parameters"})
        return model

    own = {id(p) for m in trained for p in m.new_parameters()}
    params = {name: p for name, p in model.named_parameters() if id(p) in own}
    trained_layers = [m.layer_idx for m in trained]

    def step_loss(wrapped: nn.Module, batch: torch.Tensor):
        probe.errors.clear()
        # Only the layers' own outputs matter here; logits for one position keep the head's cost negligible.
        wrapped(input_ids=batch, use_cache=False, logits_to_keep=1)
        loss = torch.stack([probe.errors[i] for i in trained_layers]).sum()
        mse = torch.stack([probe.errors[i].detach() for i in probe.layers])
        scales = torch.stack([probe.scales[i] for i in probe.layers])
        return loss, {"layer_mse": mse, "layer_normalized": mse / scales.clamp_min(1e-30)}

    session.say(f"{where}: training {sum(p.numel() for p in params.values()):,} parameters in layers {trained_layers}")
    with probe:
        report = train(model, data, config, session, params, step_loss)
    report["layers"] = probe.layers
    session.reports.append(report)
    return model
