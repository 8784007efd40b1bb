"""`linearize run` and `linearize distill`: load the teacher, convert, distill with the recipe's stages, save;
`run` also scores the teacher, the converted model before distillation and the distilled one.

The teacher is scored through `teacher_mode` on the converted model itself (bit-identical to the original,
see the tests), so one copy of the weights serves both. Checkpoints of an unfinished run live beside the
output, in `<output>.checkpoints/`, until the output folder is complete; `resume=True` continues from them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .config import Recipe
from .distillation.data import DistillData, load_data
from .distillation.driver import check_checkpoints, prepare_student, run_stages, start_checkpoints, validate_recipe
from .distillation.engine import Session, check_resume, make_accelerator
from .evaluate.perplexity import perplexity
from .evaluate.progress import progress_bar
from .hf.errors import LinearizeError
from .hf.mixers import teacher_mode
from .loaders import load_teacher
from .outputs import atomic_folder, check_output


@dataclass
class Scores:
    """Held-out perplexity and a greedy continuation of the recipe's prompt."""

    perplexity: float
    generation: str


@dataclass
class RunResult:
    """What a run measured. `converted` is the model straight after conversion (every layer converted when
    the kept layers are chosen automatically); `distilled` is after the stages (None when there are none)."""

    recipe: dict[str, Any]
    output: str
    teacher: Scores
    converted: Scores
    distilled: Scores | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    selection: dict[str, Any] | None = None
    data: str = ""

    def to_dict(self) -> dict[str, Any]:
        def scores(s):
            return None if s is None else vars(s)

        return {
            "recipe": self.recipe,
            "output": self.output,
            "teacher": scores(self.teacher),
            "converted": scores(self.converted),
            "distilled": scores(self.distilled),
            "stages": self.stages,
            "seconds": self.seconds,
            "selection": self.selection,
            "data": self.data,
        }


@dataclass
class DistillResult:
    """What `linearize distill` did: the saved folder, per-stage reports and the layer selection, if any."""

    recipe: dict[str, Any]
    output: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    selection: dict[str, Any] | None = None
    data: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def score(model, tokenizer, recipe: Recipe, windows: torch.LongTensor, label: str = "model", show: bool = False) -> Scores:
    """Held-out perplexity and the greedy continuation of the recipe's prompt, with a progress bar when `show`."""
    model.eval()
    with progress_bar(show) as bar:
        task = bar.add_task(f"perplexity of the {label}", total=windows.shape[0])
        value = perplexity(model, windows, on_batch=lambda n: bar.advance(task, n))
    return Scores(value, generate_text(model, tokenizer, recipe.eval.prompt, recipe.eval.max_new_tokens))


def checkpoint_folder(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoints"


@dataclass
class _Started:
    session: Session
    student: Any
    tokenizer: Any
    data: DistillData
    keep: int | None
    out: Path


def _start(recipe: Recipe, out: str | Path | None, overwrite: bool, resume: bool, log: Callable[[str], None]) -> _Started:
    """Everything before the stages: checks that need nothing loaded first, then teacher, student and data."""
    if resume and overwrite:
        raise LinearizeError("--resume continues a run and --overwrite starts it again; pass one of them")
    accelerator = make_accelerator(recipe.precision)
    check_resume(accelerator, resume)
    session = Session(accelerator, None, log, progress=True)
    say = session.say  # under `accelerate launch`, only the main process speaks
    validate_recipe(recipe, accelerator.num_processes)
    out = check_output(Path(out or recipe.output), overwrite)
    checkpoints = checkpoint_folder(out) if recipe.stages else None
    if checkpoints is not None:
        check_checkpoints(checkpoints, recipe, resume, overwrite)
    elif resume:
        raise LinearizeError("nothing to resume: this recipe has no distillation stages")
    torch.manual_seed(recipe.seed)
    say(f"loading teacher {recipe.teacher}")
    teacher, tokenizer = load_teacher(recipe.teacher, dtype=recipe.dtype)
    say(f"converting to {recipe.convert.mixer}")
    student, keep = prepare_student(teacher, recipe, say)
    student.to(accelerator.device)
    data = load_data(recipe.data, tokenizer, train=bool(recipe.stages), seed=recipe.seed)
    say(f"data: {data.description}")
    # Nothing is written before this point, so a mistake found while loading leaves no trace on disk.
    if checkpoints is not None:
        if accelerator.is_main_process:
            start_checkpoints(checkpoints, recipe, student, resume, say)
        accelerator.wait_for_everyone()
    session.checkpoints = checkpoints
    return _Started(session, student, tokenizer, data, keep, out)


def _save(started: _Started, model, recipe: Recipe, overwrite: bool, results: dict[str, Any]) -> None:
    """Write the output folder atomically (main process), then drop the checkpoints it supersedes."""
    session = started.session
    if hasattr(model, "merge_and_unload"):
        # A lora_kd stage with merge: false hands back the peft model; the saved folder must not need peft.
        session.say("merging the LoRA adapters before saving (merge: false applies to the Python API)")
        model = model.merge_and_unload()
    if session.main:
        session.say(f"saving to {started.out}")
        with atomic_folder(started.out, overwrite) as staging:
            model.save_pretrained(staging)
            started.tokenizer.save_pretrained(staging)
            (staging / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            (staging / "results.json").write_text(json.dumps(results, indent=2))
            if session.records:
                (staging / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in session.records))
        if session.checkpoints is not None:
            shutil.rmtree(session.checkpoints, ignore_errors=True)
    session.accelerator.wait_for_everyone()


def distill(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, resume: bool = False, log: Callable[[str], None] = print) -> DistillResult:
    """Convert the recipe's teacher (or take an already converted folder as `teacher`), run the stages, save.

    Example:
        >>> linearize.pipeline.distill(linearize.config.load_recipe("lolcats", ["data.seq_len=1024"]))
    """
    started_at = time.time()
    started = _start(recipe, out, overwrite, resume, log)
    model = run_stages(started.student, started.data, recipe, started.session, started.keep)
    result = DistillResult(
        recipe.to_dict(), str(started.out), started.session.reports, selection=getattr(model.config, "selection", None), data=started.data.description
    )
    result.seconds = round(time.time() - started_at, 1)
    _save(started, model, recipe, overwrite, result.to_dict())
    return result


def run(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, log: Callable[[str], None] = print, resume: bool = False) -> RunResult:
    """Run a recipe end to end, scoring teacher, converted and distilled models, and save with the results.

    Example:
        >>> result = linearize.pipeline.run(linearize.config.load_recipe("quickstart"))
        >>> result.teacher.perplexity, result.converted.perplexity, result.distilled.perplexity
    """
    started_at = time.time()
    started = _start(recipe, out, overwrite, resume, log)
    student, tokenizer = started.student, started.tokenizer
    windows = started.data.heldout_windows(recipe.eval.seq_len, recipe.eval.perplexity_tokens)
    started.session.say(f"scoring teacher and converted model on {windows.numel()} held-out tokens")
    show = started.session.progress and started.session.main
    with teacher_mode(student):
        teacher_scores = score(student, tokenizer, recipe, windows, "teacher", show)
    converted_scores = score(student, tokenizer, recipe, windows, "converted model", show)
    model = run_stages(student, started.data, recipe, started.session, started.keep)
    distilled = None
    if recipe.stages or started.keep is not None:
        started.session.say("scoring the distilled model")
        distilled = score(model, tokenizer, recipe, windows, "distilled model", show)
    result = RunResult(
        recipe.to_dict(),
        str(started.out),
        teacher_scores,
        converted_scores,
        distilled,
        started.session.reports,
        selection=getattr(model.config, "selection", None),
        data=started.data.description,
    )
    result.seconds = round(time.time() - started_at, 1)
    _save(started, model, recipe, overwrite, result.to_dict())
    return result
