"""`linearize run`: load the teacher, convert, run the recipe's stages, save, and score teacher beside student.

The teacher is scored through `teacher_mode` on the converted model itself (bit-identical to the original,
see the tests), so one copy of the weights serves both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .config import Recipe
from .evaluate.perplexity import perplexity
from .hf.mixers import teacher_mode
from .loaders import load_teacher
from .outputs import atomic_folder, check_output
from .surgery import convert
from .textdata import read_text_source, token_windows


@dataclass
class Scores:
    """Held-out perplexity and a greedy continuation of the recipe's prompt."""

    perplexity: float
    generation: str


@dataclass
class RunResult:
    recipe: dict[str, Any]
    output: str
    teacher: Scores
    converted: Scores
    distilled: Scores | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

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
        }


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def score(model, tokenizer, recipe: Recipe, windows: torch.LongTensor) -> Scores:
    model.eval()
    return Scores(perplexity(model, windows), generate_text(model, tokenizer, recipe.eval.prompt, recipe.eval.max_new_tokens))


def heldout_windows(tokenizer, recipe: Recipe) -> torch.LongTensor:
    text = read_text_source(recipe.data.heldout)
    return token_windows(tokenizer, text, recipe.eval.seq_len, max_tokens=recipe.eval.perplexity_tokens)


def run(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Run a recipe end to end and save the converted (and distilled) model with its results.

    Example:
        >>> result = linearize.pipeline.run(linearize.config.load_recipe("quickstart"))
        >>> result.teacher.perplexity, result.converted.perplexity
    """
    started = time.time()
    out = Path(out or recipe.output)
    check_output(out, overwrite)
    torch.manual_seed(recipe.seed)
    log(f"loading teacher {recipe.teacher}")
    teacher, tokenizer = load_teacher(recipe.teacher, dtype=recipe.dtype)
    plan = recipe.convert
    log(f"converting to {plan.mixer}")
    student = convert(
        teacher,
        plan.mixer,
        keep_attention=plan.keep_attention,
        layers=plan.layers,
        hybrid=plan.hybrid,
        mixer_options=plan.mixer_options,
        source=recipe.teacher,
        **plan.options,
    )
    windows = heldout_windows(tokenizer, recipe)
    log(f"scoring teacher and converted model on {windows.numel()} held-out tokens")
    with teacher_mode(student):
        teacher_scores = score(student, tokenizer, recipe, windows)
    converted_scores = score(student, tokenizer, recipe, windows)
    result = RunResult(recipe.to_dict(), str(out), teacher_scores, converted_scores)
    log(f"saving to {out}")
    with atomic_folder(out, overwrite) as staging:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        result.seconds = time.time() - started
        (staging / "results.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
