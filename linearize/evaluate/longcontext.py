"""Long-context retrieval made on the fly, nothing downloaded: passkey, needle, and RULER's multi-key needle,
key-value retrieval and variable tracking.

passkey:  a 5-digit key hidden in a repeated filler sentence (as in Mohtashami & Jaggi, 2023).
needle:   "the special magic number for CITY is N" hidden in real prose (the packaged Persuasion), as in RULER's
          single-needle task.
multikey: four such lines for four places in the prose; the question asks for the one at `depth` (RULER's
          multi-key needle: the others are distractors).
kv:       the haystack is a list of key-value pairs ("key 3f9a1c2e has value N"), no prose; the question asks
          for the value of the pair at `depth` (RULER's key-value retrieval).
vt:       "VAR ABCDE = N." at `depth`, then three assignments that copy it along a chain of variables, later in
          the prose; the question asks for the value of the chain's last variable (RULER's variable tracking).
Each prompt is built to `length` tokens with the asked line at `depth` (0 = start, 1 = end of the filler) and
ends in a sentence the answer completes, so base and instruct models alike answer by copying. A trial scores 1
when the first number the model generates greedily is exactly the hidden one.

`pool="train"` makes the same tasks for distillation data from other material: filler from the packaged Pride
and Prejudice, other place names, and answers of 4, 6 or 7 digits, so a training probe never repeats an evaluation
probe (whose answers have 5 digits), and a student learns to copy a number of any length, not a length.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import torch

from linearize.hf.errors import LinearizeError
from linearize.textdata import packaged_text, special_prefix

from .results import RETRIEVAL_KINDS

KINDS = tuple(RETRIEVAL_KINDS)
RULER_KINDS = ("multikey", "kv", "vt")
POOLS = ("eval", "train")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 8
MISSES_KEPT = 3  # wrong answers kept per (length, depth), with what the model said

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about it.\n\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"

NEEDLE_INTRO = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n\n"
NEEDLE_LINE = "The special magic number for {place} is: {key}."
NEEDLE_QUESTION = "\n\nWhat is the special magic number for {place} mentioned in the provided text? The special magic number for {place} mentioned in the provided text is"
KV_INTRO = "A list of keys and their values follows. Memorize them.\n\n"
KV_LINE = "Key {name} has value {key}."
KV_QUESTION = "\n\nWhat is the value of key {name}? The value of key {name} is"
VT_INTRO = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
VT_FIRST, VT_COPY = "VAR {name} = {key}.", "VAR {name} = VAR {source}."
VT_QUESTION = "\n\nWhat is the value of VAR {name}? The value of VAR {name} is"
PLACES = {
    "eval": ("Bath", "Lyme", "Kellynch", "Uppercross", "Plymouth", "Taunton", "Bristol", "Winthrop", "Portsmouth", "Exeter"),
    "train": ("Meryton", "Longbourn", "Netherfield", "Pemberley", "Rosings", "Hunsford", "Brighton", "Lambton", "Derby", "Oxford"),
}
FILLER_TEXT = {"eval": "persuasion", "train": "prideprejudice"}
DISTRACTORS, HOPS = 3, 3
TRAIN_DIGITS = (4, 6, 7)  # a training answer's digit count, drawn per answer; evaluation's answers have 5


@dataclass(frozen=True)
class Probe:
    prompt_ids: list[int]
    answer: str
    requested: int  # the length asked for
    length: int  # the prompt's actual length in tokens
    depth: float


@dataclass
class _Task:
    intro: str
    question: str
    answer: str
    lines: list[tuple[float, str]]  # (where in the filler, 0..1; the line), in order


@lru_cache(maxsize=2)
def _prose_sentences(name: str = "persuasion") -> tuple[str, ...]:
    body = packaged_text(name)
    text = " ".join(body.split())
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text)
    return tuple(s for s in sentences if 4 <= len(s.split()) <= 60)


def _filler(kind: str, rng: random.Random, pool: str, key) -> Iterator[str]:
    """An endless stream of filler: the repeated passkey sentence, key-value pairs, or prose from a random point."""
    if kind == "passkey":
        while True:
            yield PASSKEY_FILLER
    if kind == "kv":
        while True:
            yield KV_LINE.format(name=_hex(rng), key=key())
    sentences = _prose_sentences(FILLER_TEXT[pool])
    start = rng.randrange(len(sentences))
    while True:
        for s in sentences[start:] + sentences[:start]:
            yield s


def _hex(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(8))


def _task(kind: str, depth: float, rng: random.Random, pool: str, key) -> _Task:
    """What one probe of `kind` asks, its answer, and the lines hidden in the filler (the asked one at `depth`)."""
    answer = key()
    if kind == "passkey":
        return _Task(PASSKEY_INTRO, PASSKEY_QUESTION, answer, [(depth, PASSKEY_LINE.format(key=answer))])
    if kind == "needle":
        place = rng.choice(PLACES[pool])
        return _Task(NEEDLE_INTRO, NEEDLE_QUESTION.format(place=place), answer, [(depth, NEEDLE_LINE.format(place=place, key=answer))])
    if kind == "multikey":
        places = rng.sample(PLACES[pool], DISTRACTORS + 1)
        lines = [(depth, NEEDLE_LINE.format(place=places[0], key=answer))]
        lines += [(rng.random(), NEEDLE_LINE.format(place=place, key=key())) for place in places[1:]]
        return _Task(NEEDLE_INTRO, NEEDLE_QUESTION.format(place=places[0]), answer, sorted(lines))
    if kind == "kv":
        name = _hex(rng)
        return _Task(KV_INTRO, KV_QUESTION.format(name=name), answer, [(depth, KV_LINE.format(name=name, key=answer))])
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(HOPS + 1)]
    later = sorted(depth + (1 - depth) * rng.random() for _ in range(HOPS))
    lines = [(depth, VT_FIRST.format(name=names[0], key=answer))]
    lines += [(at, VT_COPY.format(name=names[i + 1], source=names[i])) for i, at in enumerate(later)]
    return _Task(VT_INTRO, VT_QUESTION.format(name=names[-1]), answer, lines)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def make_probe(tokenizer, kind: str, length: int, depth: float, rng: random.Random, pool: str = "eval") -> Probe:
    """One prompt of about `length` tokens (within a sentence) with the asked line at `depth`."""
    if kind not in KINDS:
        raise LinearizeError(f"unknown retrieval kind {kind!r}; use one of {', '.join(KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise LinearizeError(f"depth must be between 0 and 1, got {depth}")

    def key() -> str:
        if pool == "eval":  # one draw per answer, as before training answers varied: earlier figures' prompts stay
            return str(rng.randint(10000, 99999))
        digits = rng.choice(TRAIN_DIGITS)
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))

    task = _task(kind, depth, rng, pool, key)
    prefix = special_prefix(tokenizer)
    fixed = len(prefix) + _count(tokenizer, task.intro + " ".join(line for _, line in task.lines) + task.question)
    budget = length - fixed
    if budget < 0:
        raise LinearizeError(f"length {length} is too short for a {kind} prompt, which needs at least {fixed} tokens; use longer lengths")
    sentences = _fill(tokenizer, _filler(kind, rng, pool, key), budget, skip=kind not in ("passkey", "kv"))
    body = list(sentences)
    for at, line in reversed(task.lines):  # from the last, so earlier cut points keep their place
        cut = round(at * len(sentences))
        body.insert(cut, line)
    ids = prefix + tokenizer(task.intro + " ".join(body) + task.question, add_special_tokens=False, verbose=False)["input_ids"]
    return Probe(ids, task.answer, length, len(ids), depth)


def _fill(tokenizer, filler: Iterator[str], budget: int, skip: bool) -> list[str]:
    """Sentences of `filler` until `budget` tokens are spent; counts per sentence are close to the joined count, and
    the actual length is recorded with the result. With `skip`, a few sentences too long for the rest of the
    budget are passed over (prose sentences vary in length) to fill it closely."""
    sentences, used, skipped = [], 0, 0
    for sentence in filler:
        cost = _count(tokenizer, " " + sentence)
        if used + cost > budget:
            skipped += 1
            if not skip or skipped > 50:
                break
            continue
        sentences.append(sentence)
        used += cost
    return sentences


def answer_of(text: str) -> str | None:
    """The first whole number in a generated continuation."""
    match = re.search(r"\d+", text)
    return match.group() if match else None


@torch.no_grad()
def answer(model, tokenizer, probe: Probe) -> str:
    """Greedy continuation of the probe (the model's own cache, one token per step)."""
    device = next(model.parameters()).device
    ids = torch.tensor([probe.prompt_ids], device=device)
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=ANSWER_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


@dataclass
class Cell:
    """The trials of one (length asked, depth): exact matches, the prompts' actual lengths, and the first
    MISSES_KEPT misses as {"answer": the hidden number, "said": the model's continuation}."""

    hits: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    misses: list[dict[str, str]] = field(default_factory=list)

    @property
    def value(self) -> float:
        return sum(self.hits) / len(self.hits)


def ask(model, tokenizer, probes: list[Probe], advance=lambda: None) -> dict[tuple[int, float], Cell]:
    """Each probe answered greedily (`answer`), scored by exact match, grouped by (length asked, depth)."""
    cells: dict[tuple[int, float], Cell] = {}
    for probe in probes:
        said = answer(model, tokenizer, probe)
        cell = cells.setdefault((probe.requested, probe.depth), Cell())
        hit = answer_of(said) == probe.answer
        cell.hits.append(int(hit))
        cell.tokens.append(probe.length)
        if not hit and len(cell.misses) < MISSES_KEPT:
            cell.misses.append({"answer": probe.answer, "said": said})
        advance()
    return cells
