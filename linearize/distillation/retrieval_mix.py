"""Retrieval tasks mixed into the training windows: a set share of them becomes a passkey, needle, multi-key
needle, key-value or variable-tracking prompt with its answer, so distillation sees what long context is for.

The tasks come from `linearize.evaluate.longcontext` in its training pool (Pride and Prejudice as filler, other
place names, answers of 4, 6 or 7 digits), so no training task repeats an evaluation probe. Which windows become tasks, and
which tasks, is a function of the window's index and the seed: a resumed run, or another process, builds the
same ones.
"""

from __future__ import annotations

import random

import torch

from ..evaluate.longcontext import KINDS, make_probe
from ..hf.errors import LinearizeError


def check_kinds(kinds: list[str]) -> None:
    """`data.retrieval_kinds` names at least one task kind, and only known ones."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise LinearizeError(f"data.retrieval_kinds: unknown or no kinds {unknown}; use some of {', '.join(KINDS)}")


class RetrievalMix:
    """`windows` (PackedWindows or StreamedWindows) with `share` of them replaced by retrieval tasks of `kinds`,
    each ending in its answer; the task's prompt is preceded by the window's own first tokens to fill the length.
    The positions that predict an answer weigh `weight` times a prose position in the KD losses."""

    def __init__(self, windows, tokenizer, seq_len: int, share: float, kinds: list[str], seed: int, weight: float = 1.0):
        check_kinds(kinds)
        self.windows, self.tokenizer, self.seq_len, self.share, self.kinds, self.seed = windows, tokenizer, seq_len, share, list(kinds), seed
        self.weight, self.streaming = weight, windows.streaming
        for kind in self.kinds:  # a length too short for a kind is refused now, not at its first window
            task_window(tokenizer, kind, seq_len, 0.5, random.Random(seed), torch.zeros(seq_len, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.windows)

    def rewindowed(self, seq_len: int) -> "RetrievalMix":
        return RetrievalMix(self.windows.rewindowed(seq_len), self.tokenizer, seq_len, self.share, self.kinds, self.seed, self.weight)

    def take(self, start: int, count: int) -> torch.Tensor:
        return self.take_weighted(start, count)[0]

    def take_weighted(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The windows `start` to `start + count`, and their positions' loss weights (None when `weight` is 1)."""
        batch = self.windows.take(start, count).clone()
        weights = None if self.weight == 1 else torch.ones(batch.shape, dtype=torch.float32)
        for row, index in enumerate(range(start, start + count)):
            rng = random.Random(f"{self.seed}:{index}")
            if rng.random() < self.share:
                batch[row], asks = task_window(self.tokenizer, rng.choice(self.kinds), self.seq_len, rng.random(), rng, batch[row])
                if weights is not None:
                    weights[row, asks] = self.weight
        return batch, weights


def task_window(tokenizer, kind: str, seq_len: int, depth: float, rng: random.Random, window: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """A retrieval task of the training pool ending in its answer (with its full stop), filled up to `seq_len` tokens
    with the first tokens of `window`; and the positions that predict the answer's tokens (position i predicts token
    i + 1, so the answer's last tokens are predicted by the positions just before them)."""
    probe = make_probe(tokenizer, kind, seq_len - 8, depth, rng, pool="train")
    answer = tokenizer(f" {probe.answer}.", add_special_tokens=False, verbose=False)["input_ids"]
    ids = (probe.prompt_ids + answer)[-seq_len:]
    task = torch.cat((window[: seq_len - len(ids)], torch.tensor(ids, dtype=window.dtype)))
    return task, slice(seq_len - len(answer) - 1, seq_len - 1)


def with_retrieval(windows, config, tokenizer, seed: int) -> tuple[object, str]:
    """The training windows with `config.retrieval` of them made retrieval tasks (unchanged at 0), and the words
    the data description gains."""
    if not config.retrieval:
        return windows, ""
    try:
        mixed = RetrievalMix(windows, tokenizer, config.seq_len, config.retrieval, config.retrieval_kinds, seed, config.retrieval_weight)
    except LinearizeError as error:
        if "too short" not in str(error):
            raise
        raise LinearizeError(f"data.retrieval: {error}; raise data.seq_len or leave out that kind (data.retrieval_kinds)") from None
    weighed = f", answers weighing {config.retrieval_weight:g}x" if config.retrieval_weight != 1 else ""
    return mixed, f", {config.retrieval:.0%} of them retrieval tasks ({', '.join(mixed.kinds)}{weighed})"


def take_weighted(windows, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training windows and their positions' loss weights: None unless retrieval answers weigh more."""
    if hasattr(windows, "take_weighted"):  # RetrievalMix, or a wrapper of windows (teacher_logits.KeyedWindows)
        return windows.take_weighted(start, count)
    return windows.take(start, count), None
