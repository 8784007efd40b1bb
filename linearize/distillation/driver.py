"""A recipe's distillation end to end: validate, convert, run the stages in order, select layers, resume.

Checkpoint folders belong to one recipe and one model: `run.json` records both (the recipe without the keys
that do not change training, and a fingerprint of the converted model), and `--resume` refuses anything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..config import Recipe, load_recipe
from ..hf.errors import LinearizeError
from ..hf.mixers import get_mixer
from ..surgery import convert
from . import attention_transfer, lora_kd
from .data import DistillData, check_source, load_data
from .engine import Session, check_resume, count_steps, latest_checkpoint, make_accelerator
from .selection import apply_selection, auto_amount, auto_count, select_attention

RUNNERS: dict[str, Callable[..., nn.Module]] = {
    "attention_transfer": attention_transfer.run,
    "lora_kd": lora_kd.run,
}
# Keys that may change between a run and its resumption: they do not change what is trained.
RESUMABLE_CHANGES = ("output", "eval", "checkpoint_every", "log_every")


def validate_recipe(recipe: Recipe, processes: int = 1, check_data: bool = True) -> None:
    """Checks that need nothing loaded: mixer, option and stage names, the auto selection, the data sources
    (unless `check_data` is false) and that every stage's budget pays for at least one step on `processes`."""
    plan = recipe.convert
    for name in [plan.mixer, *plan.hybrid, *plan.mixer_options]:
        get_mixer(name)
    for name, options in [(plan.mixer, plan.options), *plan.mixer_options.items()]:
        takes = {f.name for f in dataclasses.fields(get_mixer(name).Options)}
        unknown = sorted(set(options) - takes)
        if unknown:
            raise LinearizeError(
                f"convert: mixer {name!r} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(takes)) or 'no options'}"
            )
    auto_amount(plan.keep_attention)
    for index, stage in enumerate(recipe.stages):
        if stage.kind not in RUNNERS:
            raise LinearizeError(f"stages[{index}]: no runner for stage kind {stage.kind!r}; available: {', '.join(RUNNERS)}")
        count_steps(stage, recipe.data.seq_len, processes, f"stages[{index}] ({stage.kind})")
    if check_data and (recipe.stages or not recipe.data.heldout):
        check_source(recipe.data.train)
    if check_data and recipe.data.heldout:
        check_source(recipe.data.heldout)


def is_converted(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "linearized"


def prepare_student(model: nn.Module, recipe: Recipe, log: Callable[[str], None] = print) -> tuple[nn.Module, int | None]:
    """Convert a teacher as the recipe says (every layer, when the kept layers are chosen automatically);
    a model that is already converted is used as it is. Returns the student and the number of layers to keep."""
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if positions and recipe.data.seq_len > positions and not recipe.data.allow_longer:
        raise LinearizeError(
            f"data.seq_len={recipe.data.seq_len} is beyond the model's {positions} positions (max_position_embeddings); "
            "train on shorter windows, or set data.allow_longer=true to train past them"
        )
    plan = recipe.convert
    if is_converted(model):
        log("the model is already converted: the recipe's convert section is not used")
        return model, None
    amount = auto_amount(plan.keep_attention)
    count = None if amount is None else auto_count(amount, model.config.num_hidden_layers)
    student = convert(
        model,
        plan.mixer,
        keep_attention=() if amount is not None else plan.keep_attention,
        layers=plan.layers,
        hybrid=plan.hybrid,
        mixer_options=plan.mixer_options,
        source=recipe.teacher,
        **plan.options,
    )
    return student, count


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
    digest.update(json.dumps(getattr(model.config, "layers", None)).encode())
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
    old, new = json.loads((folder / "run.json").read_text())["recipe"], resume_key(recipe)
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
    run_file = folder / "run.json"
    if resume:
        if not run_file.is_file():
            raise LinearizeError(f"nothing to resume: {folder} holds no checkpoints of an unfinished run; start without --resume")
        changed_stages(folder, recipe)
    elif folder.exists() and any(folder.iterdir()) and not overwrite:
        raise LinearizeError(f"{folder} holds checkpoints of an unfinished run; continue it with --resume, or start again with --overwrite")


def start_checkpoints(folder: Path, recipe: Recipe, model: nn.Module, resume: bool, log: Callable[[str], None] = print) -> None:
    """Once the model is built, just before training: a new run starts an empty folder recording the recipe and
    the model's fingerprint; a resumed one checks the fingerprint, and an unfinished stage whose settings changed
    loses its checkpoints, so that it starts again from the end of the stages before it."""
    run_file = folder / "run.json"
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
        run_file.write_text(json.dumps({"recipe": resume_key(recipe), "model": fingerprint}, indent=2))
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    run_file.write_text(json.dumps({"recipe": resume_key(recipe), "model": fingerprint}, indent=2))


def run_stages(model: nn.Module, data: DistillData, recipe: Recipe, session: Session, keep: int | None = None) -> nn.Module:
    """The recipe's stages in order; with `keep` (auto selection) the layers are chosen after the first
    attention_transfer stage, or before the first stage when there is none."""
    from accelerate.utils import set_seed

    kinds = [stage.kind for stage in recipe.stages]
    select_after = kinds.index("attention_transfer") if "attention_transfer" in kinds else -1
    if keep is not None and select_after == -1:
        select(model, data, recipe, session, keep)
    for index, stage in enumerate(recipe.stages):
        session.stage_index = index
        # Each stage starts from its own seed, so a resumed run builds every stage (e.g. the LoRA init) as an unbroken one.
        set_seed(recipe.seed + index)
        model = RUNNERS[stage.kind](model, data, stage, session)
        if keep is not None and index == select_after:
            select(model, data, recipe, session, keep)
    return model


def select(model: nn.Module, data: DistillData, recipe: Recipe, session: Session, keep: int) -> dict[str, Any]:
    """Auto selection, or its replay from the checkpoint folder when resuming; logged and recorded."""
    saved = None if session.checkpoints is None else session.checkpoints / "selection.json"
    if saved is not None and saved.is_file():
        selection = json.loads(saved.read_text())
        apply_selection(model, selection)
        session.say(f"selection (from {saved}): softmax attention kept in layers {selection['kept_attention']}")
        return selection
    windows = data.heldout_windows(max_tokens=recipe.convert.selection.tokens)
    selection = select_attention(model, windows, keep, recipe.convert.selection)
    session.record({"event": "selection", **selection})
    if saved is not None and session.main:
        saved.write_text(json.dumps(selection, indent=2))
    rows = ", ".join(
        f"{f['layer']}: {f['normalized']:.3g}" + (f"/kl {f['kl']:.3g}" if "kl" in f else "") for f in selection["layers"]
    )
    session.say(f"selection by {selection['method']}: softmax attention kept in layers {selection['kept_attention']} (per layer {rows})")
    return selection


def as_recipe(recipe: Recipe | str | Path, overrides: list[str] = ()) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            raise LinearizeError("overrides apply to a recipe name or path; change the Recipe object's fields instead")
        return recipe
    return load_recipe(recipe, list(overrides))


def as_data(data: Any, recipe: Recipe, tokenizer) -> DistillData:
    if isinstance(data, DistillData):
        return data
    if tokenizer is None:
        raise LinearizeError("pass tokenizer=... to distill() so the data can be tokenised, or pass a prepared DistillData")
    if data is None:
        return load_data(recipe.data, tokenizer, seed=recipe.seed)
    if isinstance(data, (str, Path)):
        return load_data(dataclasses.replace(recipe.data, train=str(data)), tokenizer, seed=recipe.seed)
    return load_data(recipe.data, tokenizer, seed=recipe.seed, dataset=data)


def distill(
    model: nn.Module,
    data: Any = None,
    recipe: Recipe | str | Path = "quickstart",
    *,
    tokenizer=None,
    overrides: list[str] = (),
    checkpoints: str | Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> nn.Module:
    """Convert `model` as the recipe says (unless it is already converted) and run the recipe's stages on `data`.

    `data` is a packaged name, a file, a folder or a Hub id (tokenised with `tokenizer`), a `datasets` dataset,
    a `DistillData`, or None for the recipe's own data. With `checkpoints` a folder, stages checkpoint there and
    `resume=True` continues an interrupted call. Returns the distilled model, in memory; save it yourself.

    Example:
        >>> teacher, tokenizer = linearize.load_teacher("smollm2-135m")
        >>> student = linearize.distill(teacher, "prideprejudice", "quickstart", tokenizer=tokenizer)
        >>> student.save_pretrained("out/smollm2-distilled")
    """
    recipe = as_recipe(recipe, overrides)
    accelerator = make_accelerator(recipe.precision)
    check_resume(accelerator, resume)
    if isinstance(data, DistillData):  # its windows, not the recipe's data section, set the step size
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, seq_len=data.seq_len))
    validate_recipe(recipe, accelerator.num_processes, check_data=data is None)
    folder = Path(checkpoints) if checkpoints is not None else None
    if folder is not None:
        check_checkpoints(folder, recipe, resume, overwrite=False)
    session = Session(accelerator, None, log, progress)
    student, keep = prepare_student(model, recipe, session.say)
    student.to(accelerator.device)
    data = as_data(data, recipe, tokenizer)
    if folder is not None:
        if accelerator.is_main_process:
            start_checkpoints(folder, recipe, student, resume, session.say)
        accelerator.wait_for_everyone()
        session.checkpoints = folder
    return run_stages(student, data, recipe, session, keep)


__all__ = ["RUNNERS", "distill", "prepare_student", "run_stages", "validate_recipe"]
