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
from typing import ClassVar

import torch
from torch import nn

from ...config import register_stage
from ...hf.errors import LinearizeError
from ...hf.mixers import mixers_in
from ..fsdp import is_fsdp
from ..loop import TrainConfig, train
from ..session import Session


@dataclass
class AttentionTransferConfig(TrainConfig):
    """Train the mixers' new parameters so each converted layer matches its teacher output (MSE, per layer)."""

    flops_per_parameter: ClassVar[int] = 4  # one forward (the teacher's attention inside it) and one backward

    kind: str = "attention_transfer"
    lr: float = 1e-2


class LayerRecord:
    """One mixer's transfer hook: keeps its layer's error and the teacher output's mean square from the last call.

    Each layer gets its own record, reached through its mixer, instead of one dict keyed by the layer index: under
    compilation an index read in the forward pass is a constant of the layer's graph, so every layer would be
    compiled anew, while the mixer and its record are inputs that one graph takes for all identical layers.
    """

    def __init__(self):
        self.error: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def __call__(self, mixer, student: torch.Tensor, teacher: torch.Tensor) -> None:
        # Gradient checkpointing runs this again in the backward pass; the recomputed values are the same.
        teacher = teacher.detach().float()
        self.error = (student.float() - teacher).pow(2).mean()
        self.scale = teacher.pow(2).mean()


class TransferProbe:
    """Sets a transfer hook on every mixer while active; holds each layer's error on the last forward pass.

    `errors[i]` is the mean squared error of layer i (with its graph, for training) and `scales[i]` the mean
    square of the teacher's output there (detached), which normalises errors across depth.
    """

    def __init__(self, model: nn.Module):
        self.mixers = sorted(mixers_in(model), key=lambda m: m.layer_idx)
        self.records = {m.layer_idx: LayerRecord() for m in self.mixers}

    @property
    def errors(self) -> dict[int, torch.Tensor]:
        return {i: r.error for i, r in self.records.items() if r.error is not None}

    @property
    def scales(self) -> dict[int, torch.Tensor]:
        return {i: r.scale for i, r in self.records.items() if r.scale is not None}

    def clear(self) -> None:
        for record in self.records.values():
            record.error = record.scale = None

    def __enter__(self) -> "TransferProbe":
        for mixer in self.mixers:
            mixer.transfer_hook = self.records[mixer.layer_idx]
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
                errors, scales = probe.errors, probe.scales
                for i in probe.layers:
                    squared[i] = squared.get(i, 0.0) + errors[i].item() * weight
                    scale[i] = scale.get(i, 0.0) + scales[i].item() * weight
    finally:
        model.train(was_training)
    count = windows.shape[0]
    return {
        i: {"mse": squared[i] / count, "teacher_mean_square": scale[i] / count, "normalized": squared[i] / max(scale[i], 1e-30)}
        for i in sorted(squared)
    }


def fsdp_backward_hooks(wrapped: nn.Module, errors: dict[int, torch.Tensor], layers: list[int], loss: torch.Tensor) -> None:
    """Give FSDP1 the hooks its units' outputs would have carried, on the tensors the loss really flows through.

    FSDP gathers a unit's parameters for the backward pass (and switches its gradients to the unit's flat
    parameter) in a pre-backward hook that it registers on the unit's forward outputs that require grad, and the
    root's first such hook queues the callback that ends the backward pass (the catch-all reshard and handing
    the sharded gradients to the parameters). Here no output requires grad: each layer passes the teacher's
    output on and the loss is the sum of the layers' own errors. So FSDP's own registration function is run
    after the forward pass on the loss, for the root, and on each trained layer's error, for the unit holding
    that layer. A tensor's hook runs before its own backward step, and a layer's student output feeds nothing
    but its error, so each unit is gathered before its student's backward unpacks the parameter views it saved
    (freed by the unit's reshard after forward). The graph, the values and the gradients are unchanged.
    """
    # FSDP's registration function (and the units' _is_root, _handle) are private, for want of a public way (torch
    # 2.11 to 2.13): FSDP1 puts these hooks only on a unit's own outputs, and torch's public module hooks
    # (register_full_backward_pre_hook, ...) fire only on outputs that carry a gradient, which none here does.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._runtime_utils import _register_pre_backward_hooks

    units = FSDP.fsdp_modules(wrapped)
    roots = [unit for unit in units if unit._is_root]
    if len(roots) != 1:
        raise LinearizeError(
            f"attention_transfer under FSDP needs one torch FullyShardedDataParallel (FSDP1) root around the model and found {len(roots)}; "
            "launch with recipes/accelerate/fsdp.yaml"
        )
    owner: dict[int, FSDP] = {}
    for unit in units:  # in module order, so a nested unit comes after the units around it and wins
        for module in unit.module.modules():
            if getattr(module, "is_linearize_mixer", False):
                owner[module.layer_idx] = unit
    root = roots[0]
    _register_pre_backward_hooks(root, root, loss, root._handle)
    for i in layers:
        unit = owner[i]
        _register_pre_backward_hooks(unit, unit, errors[i], unit._handle)


def transfer_loss(
    wrapped: nn.Module, batch: torch.Tensor, probe: TransferProbe, layers: list[int], fsdp: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass of `wrapped` (the model, as prepared for training) on `batch` with `probe` active: the
    loss (the sum of the errors of `layers`) and the per-layer metrics. `fsdp`: `wrapped` is an FSDP1 root, whose
    units then need hooks for the backward pass (see `fsdp_backward_hooks`)."""
    probe.clear()
    # Only the layers' own outputs matter here; logits for one position keep the head's cost negligible.
    wrapped(input_ids=batch, use_cache=False, logits_to_keep=1)
    errors, scales = probe.errors, probe.scales
    loss = torch.stack([errors[i] for i in layers]).sum()
    if fsdp:
        fsdp_backward_hooks(wrapped, errors, layers, loss)
    mse = torch.stack([errors[i].detach() for i in probe.layers])
    scale = torch.stack([scales[i] for i in probe.layers])
    return loss, {"layer_mse": mse, "layer_normalized": mse / scale.clamp_min(1e-30)}


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

    fsdp = is_fsdp(session.accelerator)

    def step_loss(wrapped: nn.Module, batch: torch.Tensor, weights: torch.Tensor | None):
        # Loss weights are for the next-token losses of KD: every layer output is matched alike.
        return transfer_loss(wrapped, batch, probe, trained_layers, fsdp)

    session.say(f"{where}: training {sum(p.numel() for p in params.values()):,} parameters in layers {trained_layers}")
    with probe:
        report = train(model, data, config, session, params, step_loss)
    report["layers"] = probe.layers
    session.reports.append(report)
    return model


register_stage("attention_transfer", AttentionTransferConfig, run)
