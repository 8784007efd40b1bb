"""Real text that works offline: the packaged Austen novels, or local .txt files, cut into token windows.

`prideprejudice` is the training text and `persuasion` the held-out text; both are public domain
and ship inside the package, so smoke runs and tests need no network.
"""

from __future__ import annotations

import gzip
import os
from importlib import resources

import torch
from transformers import PreTrainedTokenizerBase

from linearize.hf.errors import LinearizeError
from linearize.sources import classify_source

__all__ = ["PACKAGED_TEXTS", "cut_windows", "packaged_text", "read_text_source", "special_prefix", "token_windows"]

PACKAGED_TEXTS = ("prideprejudice", "persuasion")


def packaged_text(name: str) -> str:
    """The full text of a novel shipped in `linearize/data/`.

    >>> packaged_text("persuasion")[:10]
    'Persuasion'
    """
    if name not in PACKAGED_TEXTS:
        raise LinearizeError(f"no packaged text {name!r}: the available ones are {', '.join(PACKAGED_TEXTS)}")
    data = resources.files("linearize").joinpath("data").joinpath(f"{name}.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


def read_text_source(path_or_name: str | os.PathLike[str]) -> str:
    """Text from a packaged name, a text file, or a folder of .txt files (sorted, joined by blank lines).

    >>> len(read_text_source("prideprejudice")) > 100_000
    True
    """
    found = classify_source(path_or_name, names=PACKAGED_TEXTS)
    text, path = found.text, found.path
    if found.kind == "name":
        return packaged_text(text)
    if found.kind == "file":
        files = [path]
    elif found.kind == "folder":
        files = sorted(path.glob("*.txt"))
        if not files:
            raise LinearizeError(f"folder {text!r} has no .txt files: put the training text in *.txt files there")
    else:
        raise LinearizeError(
            f"text source {text!r} does not exist: pass a .txt file, a folder of .txt files, "
            f"or a packaged text ({', '.join(PACKAGED_TEXTS)})"
        )
    try:
        parts = [file.read_text(encoding="utf-8").strip() for file in files]
    except UnicodeDecodeError as error:
        raise LinearizeError(f"text source {text!r} is not UTF-8 text ({error.reason}): convert it to UTF-8") from None
    joined = "\n\n".join(part for part in parts if part)
    if not joined:
        raise LinearizeError(f"text source {text!r} is empty: pass a file or folder that holds some text")
    return joined


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids `tokenizer` puts before every text it encodes with special tokens: `[bos_token_id]` for
    tokenizers that add a BOS token (Llama, Gemma), `[]` for those that add none (GPT-2, SmolLM2).

    Evaluation windows start with them, as the model's own tokenizer presents text (a Gemma model scored without
    its BOS token is scored on inputs it never sees: 2.5x its perplexity).

    >>> special_prefix(tokenizer)  # doctest: +SKIP
    [2]
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    return list(full[: starts[0]]) if starts else []


def cut_windows(ids: torch.LongTensor, context: int, stride: int | None = None, prefix: list[int] = ()) -> torch.LongTensor:
    """(n, context) windows of the 1-D token stream `ids`: each is `prefix` followed by the next
    `context - len(prefix)` tokens, starting every `stride` tokens (default: back to back). A tail shorter than a
    window is dropped.

    >>> cut_windows(torch.arange(10), 4, prefix=[99])
    tensor([[99,  0,  1,  2],
            [99,  3,  4,  5],
            [99,  6,  7,  8]])
    """
    body = context - len(prefix)
    stride = body if stride is None else stride
    if body < 1 or not 1 <= stride <= body:
        raise LinearizeError(
            f"a window of {context} tokens holds {body} text tokens after the tokenizer's {len(prefix)} special ones; "
            f"the stride must be between 1 and that, got {stride}: use a longer window"
        )
    if ids.numel() < body:
        raise LinearizeError(
            f"the text has {ids.numel()} tokens, fewer than one window of {context}: use a longer text, more tokens, "
            "or a shorter window"
        )
    windows = ids.unfold(0, body, stride)
    if prefix:
        windows = torch.cat((torch.tensor(prefix, dtype=ids.dtype).expand(windows.shape[0], -1), windows), dim=1)
    return windows.contiguous()


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int,
    max_tokens: int | None = None,
    stride: int | None = None,
) -> torch.LongTensor:
    """Tokenise `text` once and cut it into full windows of `seq_len` tokens, each opening with the tokenizer's
    special prefix (its BOS token, where it adds one; see `special_prefix`).

    Windows start every `stride` text tokens (default: no overlap); a tail shorter than a window is dropped.
    `max_tokens` truncates the text's token stream first.

    >>> from linearize.loaders import load_teacher
    >>> _, tokenizer = load_teacher("smollm2-135m")  # doctest: +SKIP
    >>> token_windows(tokenizer, packaged_text("persuasion"), 512, max_tokens=4096).shape  # doctest: +SKIP
    torch.Size([8, 512])
    """
    # verbose=False: a whole book is longer than model_max_length on purpose; no warning needed.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return cut_windows(torch.tensor(ids, dtype=torch.long), seq_len, stride, special_prefix(tokenizer))
