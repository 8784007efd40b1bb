"""What the stages of one distillation share: the accelerator (one per process), the checkpoint folder, the
metric records and the log; and the checks on how the processes were launched."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..hf.errors import LinearizeError
from .fsdp import is_fsdp


def make_accelerator(precision: str = "auto"):
    """One Accelerator per process: `auto` is bf16 autocast on a CUDA GPU that supports it, else full precision.

    Under `accelerate launch --mixed_precision ...` the launcher's choice wins over `auto`.
    """
    from accelerate import Accelerator

    if precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            precision = None
        else:
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    try:
        accelerator = Accelerator(mixed_precision=precision)
    except ValueError as error:
        raise LinearizeError(f"cannot set up precision {precision!r}: {str(error).splitlines()[0]}") from None
    check_launch(accelerator.num_processes)
    return accelerator


def check_launch(processes: int) -> None:
    """Refuse a multi-process launch that accelerate set up as independent single processes (torchrun on CPU
    without ACCELERATE_USE_CPU): each would train alone on its own slice and overwrite the others' output."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and processes != launched:
        raise LinearizeError(
            f"launched as {launched} processes but accelerate joined {processes}: on CPU set ACCELERATE_USE_CPU=true "
            "(e.g. `ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 cli.py distill RECIPE`), on GPUs give each process one"
        )


def check_resume(accelerator, resume: bool) -> None:
    """Under FSDP no checkpoints are written (they would hold one process's shards), so there is none to resume."""
    if resume and is_fsdp(accelerator):
        raise LinearizeError("--resume is not supported under FSDP, which writes no checkpoints; resume a DDP run under DDP (recipes/accelerate/ddp.yaml), or start again with --overwrite")


@dataclass
class Session:
    """What the stages of one distillation share: the accelerator, the checkpoint folder, metrics and the log.

    `checkpoints` None keeps nothing on disk (notebook use); metric records are always kept in `records`, and the
    text of each profiled stage (`profile_steps`) in `profiles`, by the file name a saved run gives it.
    """

    accelerator: Any = None
    checkpoints: Path | None = None
    log: Callable[[str], None] = print
    progress: bool = True
    stage_index: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.accelerator is None:
            self.accelerator = make_accelerator()
        if self.checkpoints is not None:
            self.checkpoints = Path(self.checkpoints)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        if self.main:
            self.log(message)

    @property
    def metrics_path(self) -> Path | None:
        return None if self.checkpoints is None else self.checkpoints / "metrics.jsonl"

    def record(self, entry: dict[str, Any]) -> None:
        """Keep a metric record and append it to metrics.jsonl beside the checkpoints."""
        self.records.append(entry)
        if self.main and self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def keep_records(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop records that a resumed stage is about to write again (the file and memory agree afterwards)."""
        path = self.metrics_path
        if path is not None and path.is_file():
            self.records = [r for r in map(json.loads, path.read_text().splitlines()) if keep(r)]
            if self.main:
                path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        else:
            self.records = [r for r in self.records if keep(r)]

    def stage_dir(self, kind: str) -> Path | None:
        return None if self.checkpoints is None else self.checkpoints / f"stage{self.stage_index}-{kind}"
