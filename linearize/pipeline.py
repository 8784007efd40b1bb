"""`linearize run` and `linearize distill` as Python calls: a `Run` (setup, stages, save), and for `run` the
scores of the teacher, the converted model before distillation and the distilled one.

The teacher is scored through `teacher_mode` on the converted model itself (bit-identical to the original,
see the tests), so one copy of the weights serves both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .config import Recipe
from .evaluate.perplexity import perplexity
from .evaluate.progress import progress_bar
from .hf.mixers import teacher_mode
from .record import RunRecord, Scores
from .run import Run


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


def train(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, resume: bool = False, log: Callable[[str], None] = print) -> RunRecord:
    """Convert the recipe's teacher (or take an already converted folder as `teacher`), run the stages, save to
    `out` (default: the recipe's `output`). Returns the run record saved there as results.json.

    Example:
        >>> linearize.pipeline.train(linearize.config.load_recipe("lolcats", ["data.seq_len=1024"]))
    """
    run = Run(recipe, out=out or recipe.output, overwrite=overwrite, resume=resume, log=log).setup()
    run.train()
    record = run.record()
    run.save(record)
    return record


def run(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, log: Callable[[str], None] = print, resume: bool = False) -> RunRecord:
    """Run a recipe end to end, scoring teacher, converted and distilled models, and save with the results.

    Example:
        >>> record = linearize.pipeline.run(linearize.config.load_recipe("quickstart"))
        >>> record.teacher.perplexity, record.converted.perplexity, record.distilled.perplexity
    """
    run = Run(recipe, out=out or recipe.output, overwrite=overwrite, resume=resume, log=log).setup()
    student, tokenizer, session = run.model, run.tokenizer, run.session
    windows = run.data.heldout_windows(recipe.eval.seq_len, recipe.eval.perplexity_tokens)
    session.say(f"scoring teacher and converted model on {windows.numel()} held-out tokens")
    show = session.progress and session.main
    with teacher_mode(student):
        teacher = score(student, tokenizer, recipe, windows, "teacher", show)
    converted = score(student, tokenizer, recipe, windows, "converted model", show)
    model = run.train()
    distilled = None
    if recipe.stages or run.keep is not None:
        session.say("scoring the distilled model")
        distilled = score(model, tokenizer, recipe, windows, "distilled model", show)
    record = run.record(teacher=teacher, converted=converted, distilled=distilled)
    run.save(record)
    return record
