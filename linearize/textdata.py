"""Real text that works offline: the packaged Austen novels, or local .txt files, cut into token windows.

`prideprejudice` is the training text and `persuasion` the held-out text; both are public domain
and ship inside the package, so smoke runs and tests need no network.
"""

from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from linearize.hf.errors import LinearizeError

__all__ = ["PACKAGED_TEXTS", "packaged_text", "read_text_source", "token_windows"]

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
    text = os.fspath(path_or_name)
    path = Path(text).expanduser()
    # A packaged name wins unless a file or folder of that name exists where the user is.
    if isinstance(path_or_name, str) and text in PACKAGED_TEXTS and not path.exists():
        return packaged_text(text)
    if path.is_file():
        files = [path]
    elif path.is_dir():
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


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int,
    max_tokens: int | None = None,
    stride: int | None = None,
) -> torch.LongTensor:
    """Tokenise `text` once (no special tokens) and cut it into full windows of `seq_len` tokens.

    Windows start every `stride` tokens (default `seq_len`: no overlap); a tail shorter than a window
    is dropped. `max_tokens` truncates the token stream first.

    >>> from linearize.loaders import load_teacher
    >>> _, tokenizer = load_teacher("smollm2-135m")  # doctest: +SKIP
    >>> token_windows(tokenizer, packaged_text("persuasion"), 512, max_tokens=4096).shape  # doctest: +SKIP
    torch.Size([8, 512])
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or stride < 1:
        raise LinearizeError(f"seq_len and stride must be positive, got seq_len={seq_len}, stride={stride}")
    # verbose=False: a whole book is longer than model_max_length on purpose; no warning needed.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < seq_len:
        raise LinearizeError(
            f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}: "
            "use a longer text, a larger max_tokens, or a shorter seq_len"
        )
    return torch.tensor(ids, dtype=torch.long).unfold(0, seq_len, stride).contiguous()
