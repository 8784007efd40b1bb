"""What gets scored: a converted model is scored twice, as itself and as its own teacher (teacher_mode, same
weights, one copy in memory); any other model is scored once, as a teacher. Where distillation tuned the
teacher's own projections (LoRA merged), teacher_mode is no longer the original teacher, so the original is
loaded from the model's recorded source instead, and only where it cannot be is teacher_mode used, with a warning."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linearize.hf.errors import LinearizeError
from linearize.hf.mixers import mixers_in, teacher_mode

from .results import ModelEntry


@dataclass
class Scored:
    """One model as the scorers see it: a name, the weights, the tokenizer and the mode to run them in."""

    entry: ModelEntry
    model: Any
    tokenizer: Any
    as_teacher: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    def mode(self):
        """The context to score in: teacher_mode for the teacher view of a converted model, else nothing."""
        return teacher_mode(self.model) if self.as_teacher else nullcontext()

    @property
    def max_length(self) -> int | None:
        config = getattr(self.model.config, "text_config", None) or self.model.config
        return getattr(config, "max_position_embeddings", None)


def resolve_device(device: str | None) -> str:
    """`auto` (or None) is CUDA when there is one, else CPU; anything else must name a usable device."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LinearizeError(f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise LinearizeError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def _display_name(source: Any, model: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return path.resolve().name if path.exists() else str(source)
    config = model.config
    # In memory, a model is named after where its teacher came from: the last part of a path or Hub id.
    origin = getattr(config, "source", None) or getattr(config, "_name_or_path", None)
    if not origin:
        return type(model).__name__
    short = Path(str(origin)).name or str(origin)
    return f"{short} (converted)" if getattr(config, "source", None) else short


def scored_models(
    model_or_source: Any,
    tokenizer: Any = None,
    *,
    teacher: bool = True,
    name: str | None = None,
    dtype: Any = None,
    device: str | None = None,
    need_tokenizer: bool = True,
) -> list[Scored]:
    """The models to score for one argument: a loaded model (with its tokenizer) or any `load_teacher` source
    (a converted folder, a model folder, a .gguf file, an alias, a Hub id).

    A converted model gives [teacher view, student] unless `teacher` is False. Speed runs feed random token
    ids, so they pass need_tokenizer=False.
    """
    if isinstance(model_or_source, (str, os.PathLike)):
        from linearize.loaders import load_teacher

        model, loaded_tokenizer = load_teacher(model_or_source, dtype=dtype)
        tokenizer = tokenizer or loaded_tokenizer
        source = os.fspath(model_or_source)
    else:
        model, source = model_or_source, None
        if tokenizer is None and need_tokenizer:
            raise LinearizeError("scoring a model object needs its tokenizer: pass tokenizer=... (the one load_teacher returned)")
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device is not None:
        model.to(resolve_device(device))
    name = name or _display_name(model_or_source, model)
    if not mixers_in(model):
        return [Scored(ModelEntry(name=name, role="teacher", source=source, via="original"), model, tokenizer)]
    config = model.config
    student = ModelEntry(
        name=name,
        role="student",
        source=getattr(config, "source", None) or source,
        mixers=dict(Counter(config.mixer_names())),
    )
    scored = [Scored(student, model, tokenizer)]
    if teacher:
        student.teacher = f"teacher of {name}"
        original = _original_teacher(config, model, dtype) if getattr(config, "tuned_projections", False) else None
        if original is not None:
            view = ModelEntry(name=student.teacher, role="teacher", source=student.source, via="original")
            scored.insert(0, Scored(view, original, tokenizer))
        else:
            view = ModelEntry(name=student.teacher, role="teacher", source=student.source, via="teacher_mode")
            scored.insert(0, Scored(view, model, tokenizer, as_teacher=True))
    return scored


def _original_teacher(config: Any, model: Any, dtype: Any) -> Any | None:
    """The unconverted teacher from `config.source`, on the student's device; None (with a warning) when it
    cannot be loaded, and the teacher is then the student's teacher_mode on its tuned projections."""
    from linearize.loaders import load_teacher

    try:
        if not config.source:
            raise LinearizeError("the model records no teacher source")
        original, _ = load_teacher(config.source, dtype=dtype or next(model.parameters()).dtype)
    except (LinearizeError, OSError) as error:
        warnings.warn(
            f"distillation tuned this model's q/k/v/o, and its original teacher could not be loaded ({error}); the "
            "teacher figures use teacher_mode on the tuned projections: score the original teacher as its own MODEL",
            stacklevel=3,
        )
        return None
    return original.to(next(model.parameters()).device).eval()
