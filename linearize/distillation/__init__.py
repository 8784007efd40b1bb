"""Distillation: stages that train a converted model back towards its teacher (`linearize.run.Run` runs a recipe's).

Stages are plain functions `run(model, data, config, session=None) -> model`, one module each in `stages/`, each
registered with its config dataclass as a recipe stage kind (`linearize.config.stage_kinds()`):
`attention_transfer` (stage 1) and `lora_kd` (stage 2).
"""

from .data import DistillData, load_data
from .loop import TrainConfig
from .selection import select_attention
from .session import Session
from .stages.attention_transfer import AttentionTransferConfig, layer_errors
from .stages.lora_kd import LoraKDConfig

__all__ = [
    "AttentionTransferConfig",
    "DistillData",
    "LoraKDConfig",
    "Session",
    "TrainConfig",
    "layer_errors",
    "load_data",
    "select_attention",
]
