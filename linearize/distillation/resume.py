"""The checkpoint folder of a run: which recipe and model wrote it, and what a resumed run may change.

Checkpoint folders belong to one recipe and one model: `run.json` records both (the recipe without the keys
that do not change training, and a fingerprint of the converted model), and `--resume` refuses anything else,
except the settings of stages that have not finished: such a stage starts again after the finished ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..config import Recipe
from ..hf.errors import LinearizeError
from .checkpoints import latest_checkpoint

# Keys that may change between a run and its resumption: they do not change what is trained.
RESUMABLE_CHANGES = ("output", "eval", "checkpoint_every", "log_every")
RUN_FILE = "run.json"


def resume_key(recipe: Recipe) -> dict[str, Any]:
    """The part of a recipe that decides what is trained (compared when resuming)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in RESUMABLE_CHANGES}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(recipe.to_dict())


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{path}.{i}")
            if found:
                return found
        return None
    return None if old == new else f"{path}: {old!r} then, {new!r} now"


def model_fingerprint(model: nn.Module) -> str:
    """Architecture (parameter names and shapes, the layer plan) and a sample of the embedding weights."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}{tuple(p.shape)}".encode())
    digest.update(json.dumps(model.config.to_dict().get("layers")).encode())
    weight = model.get_input_embeddings().weight.detach().flatten()
    digest.update(weight[:: max(1, weight.numel() // 4096)][:4096].double().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def finished_stages(folder: Path) -> set[int]:
    """Stages whose last step is checkpointed in `folder` (`stage<i>-<kind>/step-*/state.json`)."""
    done = set()
    for stage_dir in folder.glob("stage*-*"):
        checkpoint = latest_checkpoint(stage_dir)
        if checkpoint is not None:
            state = json.loads((checkpoint / "state.json").read_text())
            if state.get("step") == state.get("total_steps"):
                done.add(state["stage"])
    return done


def changed_stages(folder: Path, recipe: Recipe) -> list[tuple[int, str]]:
    """(stage, first difference) for each unfinished stage whose settings differ from the run that wrote `folder`;
    raises LinearizeError for any other difference (teacher, conversion, data, a finished stage), which a resumed run
    cannot take."""
    old, new = json.loads((folder / RUN_FILE).read_text())["recipe"], resume_key(recipe)
    outside = first_difference({k: v for k, v in old.items() if k != "stages"}, {k: v for k, v in new.items() if k != "stages"})
    old_stages, new_stages = old.get("stages", []), new.get("stages", [])
    if outside is None and len(old_stages) != len(new_stages):
        outside = f"stages: {len(old_stages)} then, {len(new_stages)} now"
    finished, changed = finished_stages(folder), []
    for index, (before, now) in enumerate(zip(old_stages, new_stages)):
        difference = first_difference(before, now, f"stages.{index}")
        if difference and outside is None:
            if index in finished or before.get("kind") != now.get("kind"):
                outside = f"{difference}, in stage {index}, which {'has finished' if index in finished else 'changed kind'}"
            else:
                changed.append((index, difference))
    if outside:
        raise LinearizeError(
            f"the checkpoints in {folder} were written by a different recipe ({outside}); a resumed run may change only "
            "the stages that have not finished: resume with the same recipe otherwise, or start again with --overwrite"
        )
    return changed


def check_checkpoints(folder: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Before anything is loaded: a new run needs no unfinished checkpoints there (or --overwrite); --resume
    needs checkpoints written by this recipe, up to the settings of stages that have not finished. Reads only."""
    if resume:
        if not (folder / RUN_FILE).is_file():
            raise LinearizeError(f"nothing to resume: {folder} holds no checkpoints of an unfinished run; start without --resume")
        changed_stages(folder, recipe)
    elif folder.exists() and any(folder.iterdir()) and not overwrite:
        raise LinearizeError(f"{folder} holds checkpoints of an unfinished run; continue it with --resume, or start again with --overwrite")


def start_checkpoints(folder: Path, recipe: Recipe, model: nn.Module, resume: bool, log: Callable[[str], None] = print) -> None:
    """Once the model is built, just before training: a new run starts an empty folder recording the recipe and
    the model's fingerprint; a resumed one checks the fingerprint, and an unfinished stage whose settings changed
    loses its checkpoints, so that it starts again from the end of the stages before it."""
    run_file = folder / RUN_FILE
    fingerprint = model_fingerprint(model)
    if resume:
        recorded = json.loads(run_file.read_text())["model"]
        if recorded != fingerprint:
            raise LinearizeError(
                f"the checkpoints in {folder} were written for a different model (fingerprint {recorded}, this one {fingerprint}); "
                "resume with the same teacher, or start again with --overwrite"
            )
        for index, difference in changed_stages(folder, recipe):
            for stage_dir in folder.glob(f"stage{index}-*"):
                shutil.rmtree(stage_dir)
            log(f"stages[{index}] changed since its checkpoints were written ({difference}): it starts again")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    run_file.write_text(json.dumps({"recipe": resume_key(recipe), "model": fingerprint}, indent=2))
