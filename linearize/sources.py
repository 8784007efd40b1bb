"""What a source string names, decided in one place without loading anything, and whether the Hub may be asked.

Teachers, training data, evaluation text and model cards all take a string that may be a name the caller knows
(a teacher alias, a packaged text), a .gguf file, another file, a folder, or a Hub id; `classify_source` says
which, and each caller decides what it accepts. `offline_flag` is the one answer to "may we ask the Hub?".

Cheap to import (no torch, no transformers): recipe validation uses it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import constants as hub_constants

__all__ = ["DATA_BUILDERS", "HUB_ID", "OFFLINE_FLAGS", "Source", "classify_source", "offline_flag"]

# `name` or `org/name` as the Hub spells repo ids; anything with more slashes, or starting with `.`, `/` or `~`, is a path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# File suffix -> the `datasets` builder that reads it.
DATA_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# A missing `notes.txt` or `model.gguf` is a missing file, not a Hub id.
_LOCAL_SUFFIXES = frozenset({".gguf", *DATA_BUILDERS})

# Environment flags that turn the Hub off, and the values that mean "on" (as huggingface_hub reads them).
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})


@dataclass(frozen=True)
class Source:
    """What a source string names.

    kind: "name" (one of the names the caller passed), "gguf" (an existing .gguf file), "file" (another existing
        file), "folder" (an existing folder), "hub" (shaped like a Hub id and not a local path) or "missing".
    text: the string, stripped; for "name" the caller's spelling of the name it matched.
    path: the string as a local path, `~` expanded (it exists for "gguf", "file" and "folder").
    """

    kind: Literal["name", "gguf", "file", "folder", "hub", "missing"]
    text: str
    path: Path


def classify_source(source: str | os.PathLike[str], names: Iterable[str] = ()) -> Source:
    """Say what `source` names, reading only whether a path exists.

    A name in `names` (matched case-insensitively) wins unless a file or folder of that name exists where the
    user is; a PathLike is never a name or a Hub id.

    >>> classify_source("persuasion", names=("persuasion",)).kind
    'name'
    >>> classify_source("HuggingFaceTB/SmolLM2-135M").kind
    'hub'
    >>> classify_source("missing/model.gguf").kind
    'missing'
    """
    text = os.fspath(source).strip()
    path = Path(text).expanduser()
    known = {name.lower(): name for name in names}
    if isinstance(source, str) and text.lower() in known and not path.exists():
        return Source("name", known[text.lower()], path)
    if path.is_file():
        return Source("gguf" if path.suffix.lower() == ".gguf" else "file", text, path)
    if path.is_dir():
        return Source("folder", text, path)
    if isinstance(source, str) and HUB_ID.match(text) and path.suffix.lower() not in _LOCAL_SUFFIXES:
        return Source("hub", text, path)
    return Source("missing", text, path)


def offline_flag() -> str | None:
    """The flag that turns the Hub off, or None when the Hub may be asked.

    Reads the environment now (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, HF_DATASETS_OFFLINE), not only huggingface_hub's
    copy taken at import, so a flag set in a running process (or a test) counts too; that copy, which callers may
    also set, is reported as HF_HUB_OFFLINE.

    >>> offline_flag()  # doctest: +SKIP
    'HF_HUB_OFFLINE'
    """
    for name in OFFLINE_FLAGS:
        if os.environ.get(name, "").upper() in _TRUE:
            return name
    return "HF_HUB_OFFLINE" if hub_constants.is_offline_mode() else None
