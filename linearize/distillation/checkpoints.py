"""Step checkpoints of a stage: only what training changes (the trainable weights, the optimizer and scheduler,
each process's RNG, the step). The data position is a function of the step, so resuming replays the run exactly.

A checkpoint is written into a temporary folder and renamed into place, `state.json` last, so a folder that an
interruption left half written is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hf.errors import LinearizeError
from .session import Session

STEP_PREFIX = "step-"


def latest_checkpoint(stage_dir: Path | None) -> Path | None:
    """The newest complete checkpoint of a stage (written folders only; temporary ones start with a dot)."""
    if stage_dir is None or not stage_dir.is_dir():
        return None
    done = sorted(p for p in stage_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file())
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(session: Session, stage_dir: Path, state: dict[str, Any], params: dict[str, nn.Parameter], optimizer, scheduler) -> Path:
    """Write a checkpoint into a temporary folder, rename it into place, then drop the older ones of the stage."""
    from safetensors.torch import save_file

    acc = session.accelerator
    final = stage_dir / f"{STEP_PREFIX}{state['step']:07d}"
    staging = stage_dir / f".{final.name}.partial"
    if session.main:
        # Leftovers of a write that was interrupted are never checkpoints; clear them with this one.
        for stale in stage_dir.glob(f".{STEP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file({name: p.detach().to("cpu").contiguous() for name, p in params.items()}, str(staging / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    acc.wait_for_everyone()
    torch.save(_rng_state(), staging / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if session.main:
        # state.json last: a folder without it is never taken for a checkpoint.
        (staging / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in stage_dir.iterdir():
            if old.is_dir() and old.name.startswith(STEP_PREFIX) and old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(session: Session, path: Path, params: dict[str, nn.Parameter], optimizer, scheduler) -> dict[str, Any]:
    """Put a checkpoint's weights, optimizer, scheduler and this process's RNG back; returns its state."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights))[:2] or sorted(set(weights) - set(params))[:2]
        raise LinearizeError(
            f"checkpoint {path} holds other trainable weights than this stage trains (e.g. {', '.join(missing)}); "
            "it belongs to another recipe or model: start again with --overwrite"
        )
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise LinearizeError(f"checkpoint {path}: {name} has shape {tuple(weights[name].shape)}, the model {tuple(p.shape)}; start again with --overwrite")
            p.copy_(weights[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng-{session.accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return state
