"""Distillation: stages that train a converted model back towards its teacher, and the recipe that runs them.

Stages are plain functions `run(model, data, config, session=None) -> model`, each with a config dataclass
registered as a recipe stage kind: `attention_transfer` (stage 1) and `lora_kd` (stage 2).
"""

from .attention_transfer import AttentionTransferConfig, layer_errors
from .data import DistillData, load_data
from .driver import RUNNERS, distill, run_stages
from .engine import Session, TrainConfig
from .lora_kd import LoraKDConfig
from .selection import select_attention

__all__ = [
    "AttentionTransferConfig",
    "DistillData",
    "LoraKDConfig",
    "RUNNERS",
    "Session",
    "TrainConfig",
    "distill",
    "layer_errors",
    "load_data",
    "run_stages",
    "select_attention",
]
