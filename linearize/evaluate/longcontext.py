"""Long-context retrieval made on the fly, nothing downloaded: passkey retrieval and a single needle in a haystack.

passkey: a 5-digit key hidden in a repeated filler sentence (as in Mohtashami & Jaggi, 2023).
needle:  "the special magic number for CITY is N" hidden in real prose (the packaged Persuasion), as in RULER's
         single-needle task.
Each prompt is built to `length` tokens with the hidden line at `depth` (0 = start, 1 = end of the filler) and
ends in a sentence the answer completes, so base and instruct models alike answer by copying. A trial scores 1
when the first number the model generates greedily is exactly the hidden one.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from linearize.hf.errors import LinearizeError
from linearize.textdata import packaged_text, special_prefix

KINDS = ("passkey", "needle")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 8

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
PLACES = ("Bath", "Lyme", "Kellynch", "Uppercross", "Plymouth", "Taunton", "Bristol", "Winthrop", "Portsmouth", "Exeter")


@dataclass(frozen=True)
class Probe:
    prompt_ids: list[int]
    answer: str
    requested: int  # the length asked for
    length: int  # the prompt's actual length in tokens
    depth: float


@lru_cache(maxsize=1)
def _prose_sentences() -> tuple[str, ...]:
    body = packaged_text("persuasion")
    text = " ".join(body.split())
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text)
    return tuple(s for s in sentences if 4 <= len(s.split()) <= 60)


def _filler(kind: str, rng: random.Random):
    """An endless stream of filler sentences: the repeated passkey sentence, or prose from a random point."""
    if kind == "passkey":
        while True:
            yield PASSKEY_FILLER
    sentences = _prose_sentences()
    start = rng.randrange(len(sentences))
    while True:
        for s in sentences[start:] + sentences[:start]:
            yield s


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def make_probe(tokenizer, kind: str, length: int, depth: float, rng: random.Random) -> Probe:
    """One prompt of about `length` tokens (within a sentence) with the hidden line at `depth`."""
    if kind not in KINDS:
        raise LinearizeError(f"unknown retrieval kind {kind!r}; use one of {', '.join(KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise LinearizeError(f"depth must be between 0 and 1, got {depth}")
    key = str(rng.randint(10000, 99999))
    if kind == "passkey":
        intro, line, question = PASSKEY_INTRO, PASSKEY_LINE.format(key=key), PASSKEY_QUESTION
    else:
        place = rng.choice(PLACES)
        intro, line, question = NEEDLE_INTRO, NEEDLE_LINE.format(place=place, key=key), NEEDLE_QUESTION.format(place=place)
    prefix = special_prefix(tokenizer)
    fixed = len(prefix) + _count(tokenizer, intro + line + question)
    budget = length - fixed
    if budget < 0:
        raise LinearizeError(f"length {length} is too short for a {kind} prompt, which needs at least {fixed} tokens; use longer lengths")
    # Sentence by sentence until the budget is spent; counts per sentence are close to the joined count, and the
    # actual length is recorded with the result.
    sentences, used, skipped = [], 0, 0
    for sentence in _filler(kind, rng):
        cost = _count(tokenizer, " " + sentence)
        if used + cost > budget:
            # Prose sentences vary in length: pass over a few long ones to fill the budget closely.
            skipped += 1
            if kind == "passkey" or skipped > 50:
                break
            continue
        sentences.append(sentence)
        used += cost
    cut = round(depth * len(sentences))
    body = " ".join(sentences[:cut] + [line] + sentences[cut:])
    ids = prefix + tokenizer(intro + body + question, add_special_tokens=False, verbose=False)["input_ids"]
    return Probe(ids, key, length, len(ids), depth)


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

