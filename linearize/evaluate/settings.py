"""What `linearize.evaluate` measures and how: one dataclass, whose defaults are `linearize eval`'s too."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Sequence

from linearize.hf.errors import LinearizeError

from .longcontext import DEFAULT_DEPTHS, RULER_KINDS

DEFAULT_SUITE = "local"
DEFAULT_TEXT = "persuasion"


@dataclass
class EvalSettings:
    """With nothing asked for (no tasks, suite, perplexity or retrieval), the offline default: suite "local"
    and perplexity on the packaged Persuasion.

    tasks, suite: lm-eval task names (`NAME` or `NAME:METRIC`, a list or comma-separated) and suite names
        (linearize/suites/suites.yaml); `limit` examples per task, `num_fewshot` for all, lm-eval `batch_size`.
    perplexity: texts (`load_text` sources: a packaged name, a file, a folder, a Hub dataset id, read from
        `split` / `dataset_config` / `text_field`) measured in strided windows at each of `contexts`, over the
        first `max_tokens` tokens (at least one window of the longest context); `stride` defaults to half the context.
    passkey, needle: retrieval over `lengths` x `depths`, `trials` prompts per cell, built from `seed`; `ruler`
        adds RULER's multi-key needle, key-value retrieval and variable tracking (see `longcontext`).
    allow_longer: lengths beyond the model's max_position_embeddings are refused unless set.
    """

    tasks: Any = ()
    suite: Any = ()
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    perplexity: Any = ()
    contexts: Sequence[int] = (512,)
    stride: int | None = None
    max_tokens: int = 4096
    split: str = "test"
    dataset_config: str | None = None
    text_field: str = "text"
    passkey: bool = False
    needle: bool = False
    ruler: bool = False
    lengths: Sequence[int] = (256, 512, 1024)
    depths: Sequence[float] = DEFAULT_DEPTHS
    trials: int = 2
    seed: int = 0
    allow_longer: bool = False

    def __post_init__(self):
        if self.trials < 1:
            raise LinearizeError(f"trials must be at least 1, got {self.trials}")
        if not (self.tasks or self.suite or self.perplexity or self.retrieval):
            self.suite, self.perplexity = DEFAULT_SUITE, DEFAULT_TEXT

    @property
    def texts(self) -> list[str]:
        if not self.perplexity:
            return []
        return list(self.perplexity) if isinstance(self.perplexity, (list, tuple)) else [self.perplexity]

    @property
    def retrieval(self) -> list[str]:
        wanted = {"passkey": self.passkey, "needle": self.needle, **dict.fromkeys(RULER_KINDS, self.ruler)}
        return [kind for kind, on in wanted.items() if on]

    def recorded(self, tasks: list[Any]) -> dict[str, Any]:
        """The settings a results file records (`tasks`: the resolved task specs)."""
        return dict(
            tasks=[vars(s) for s in tasks], limit=self.limit, num_fewshot=self.num_fewshot, perplexity=self.texts,
            contexts=list(self.contexts), stride=self.stride, max_tokens=self.max_tokens, lengths=list(self.lengths),
            depths=list(self.depths), trials=self.trials, seed=self.seed,
        )


def eval_settings(settings: EvalSettings | None = None, **changes: Any) -> EvalSettings:
    """`settings` (default: the defaults) with `changes`; an unknown name is a one-line error naming the closest."""
    names = [f.name for f in dataclasses.fields(EvalSettings)]
    for key in changes:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise LinearizeError(f"evaluate() got an unknown setting {key!r}; {hint}settings: {', '.join(names)}")
    return dataclasses.replace(settings, **changes) if settings is not None else EvalSettings(**changes)
