"""`linearize push`: upload a converted model folder to the Hugging Face Hub in one commit.

What goes up is a fixed list, never "the folder": the safetensors weights, config.json (with `auto_map`), the
modeling files linearize writes so it loads with trust_remote_code, the tokenizer, generation config, the run's
recipe, results and metrics when present, the report's figures and numbers under report/, and a generated model
card as README.md (a README.md already in the folder is not uploaded). A folder written by `linearize export`
(its export.json says so) is a native transformers model: the same files less the modeling code, which it does
not need, plus export.json; its card says which engines serve it. Anything else in the folder stays behind
and is named; a file that looks like a secret (a token, a key, an .env file) stops the push until the user names
it as left behind. Local absolute paths (the teacher's, the data's) go up as their last component only. The
token comes from where huggingface_hub looks (HF_TOKEN, then the token stored by `hf auth login`) and is never
printed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from linearize.export import EXPORT_FILE, ExportRecord
from linearize.hf.errors import LinearizeError
from linearize.inspect import read_config
from linearize.loaders import check_weights, read_config_file
from linearize.record import RunRecord
from linearize.report import NUMBERS

from .card import exported_model_card, model_card

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Everything a converted model's repo holds, by name (the modeling files are MODELING_FILES).
UPLOADED = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    *TOKENIZER_FILES, "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "recipe.yaml", "results.json", "metrics.jsonl",
)
# The files save_pretrained copies beside a converted model as its remote code: linearize's own hf/ modules.
MODELING_FILES = frozenset(p.name for p in Path(__file__).resolve().parent.parent.joinpath("hf").glob("*.py")) - {"__init__.py"}
REPORT_FILES = ("*.png", "report.json", "report.md")
SECRET = re.compile(
    r"token|secret|passw|credential|api[_-]?key|(^|\.)env$|^\.env|netrc|id_(rsa|dsa|ecdsa|ed25519)|\.(pem|key|p12|pfx|kdbx)$",
    re.IGNORECASE,
)
# Text files that go up as linearize rewrites them, local absolute paths cut to their last component.
SCRUBBED = ("config.json", "recipe.yaml", "results.json", "metrics.jsonl", "export.json")
# What `linearize export` writes beside a native model (linearize/export.py): format, version, target, layer_types...
def _modules_of(config_path: Path) -> list[str]:
    """The .py files `auto_map` points at (their own imports are the folder's other .py files)."""
    auto_map = json.loads(config_path.read_text()).get("auto_map") or {}
    return sorted({f"{target.split('.')[0]}.py" for target in auto_map.values() if isinstance(target, str)})


def check_folder(folder: Path) -> None:
    """A folder that will load from the Hub: converted, with weights, modeling code and a tokenizer; or exported
    (`linearize export`), with the native config its export.json names, weights and a tokenizer."""
    if not folder.is_dir():
        raise LinearizeError(f"{str(folder)!r} is not a folder; push the folder written by `linearize convert`/`linearize run` or save_pretrained")
    export = ExportRecord.read(folder)
    if export is not None:
        _check_exported(folder, export)
    else:
        read_config(folder)
    if not list(folder.glob("*.safetensors")):
        raise LinearizeError(f"{str(folder)!r} has no .safetensors weights; re-save the model with model.save_pretrained({str(folder)!r})")
    _check_shards(folder)
    if export is None:
        modules = _modules_of(folder / "config.json")
        missing = [name for name in modules if not (folder / name).is_file()] or ([] if modules else ["auto_map in config.json"])
        if missing:
            raise LinearizeError(
                f"{str(folder)!r} lacks {', '.join(missing)}, so it would not load with trust_remote_code; "
                f"re-save it with model.save_pretrained({str(folder)!r}) after `import linearize`"
            )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LinearizeError(f"{str(folder)!r} has no tokenizer; save it there with tokenizer.save_pretrained({str(folder)!r})")


def _check_exported(folder: Path, export: ExportRecord) -> None:
    """config.json is the native model export.json describes, loading without remote code."""
    again = f"export it again with `linearize export SOURCE --to {export.target.name} --out {folder}`"
    if not (folder / "config.json").is_file():
        raise LinearizeError(f"{str(folder)!r} has export.json but no config.json; {again}")
    config = read_config_file(folder)
    if config.get("auto_map") or export.target.architecture not in (config.get("architectures") or []):
        raise LinearizeError(f"{str(folder)!r}'s config.json is not the {export.target.architecture} its export.json describes; {again}")
    check_weights(folder)


def _check_shards(folder: Path) -> None:
    """Every shard a sharded checkpoint's index names is in the folder."""
    index = _read(folder / "model.safetensors.index.json", json.loads)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        return
    missing = sorted({name for name in index["weight_map"].values() if not (folder / name).is_file()})
    if missing:
        raise LinearizeError(f"{str(folder)!r} lacks the weight shards {', '.join(missing[:3])} that model.safetensors.index.json names; copy them there")


def _read(path: Path, parse) -> Any:
    try:
        return parse(path.read_text()) if path.is_file() else None
    except (ValueError, yaml.YAMLError):
        return None


def uploaded(name: str, exported: bool = False) -> bool:
    """Whether a top-level file of a model folder goes up (see UPLOADED): a converted folder's MODELING_FILES too,
    an exported folder's EXPORT_FILE but no code (a native architecture needs none)."""
    extra = name == EXPORT_FILE if exported else name in MODELING_FILES
    return extra or any(fnmatch.fnmatch(name, pattern) for pattern in UPLOADED)


def left_behind(folder: Path, ignore: Sequence[str] = ()) -> list[str]:
    """The folder's files and subfolders that do not go up (report/ goes up through `report`). Refuses, in one line,
    a folder holding something that looks like a secret, unless `ignore` names it."""
    exported = ExportRecord.read(folder) is not None
    rest = sorted(
        p.name for p in folder.iterdir() if not (p.is_file() and uploaded(p.name, exported)) and p.name not in ("README.md", "report")
    )
    secrets = [name for name in rest if SECRET.search(name) and name not in ignore]
    if secrets:
        shown = ", ".join(secrets[:3]) + (f" and {len(secrets) - 3} more" if len(secrets) > 3 else "")
        flags = " ".join(f"--ignore {name}" for name in secrets[:3])
        raise LinearizeError(
            f"{str(folder)!r} holds {shown}, which looks like a secret; nothing was uploaded: move it out of the model "
            f"folder, or confirm it stays behind with {flags} (ignore=[...] in Python)"
        )
    return rest


def scrub_paths(value: Any) -> Any:
    """`value` (parsed JSON/YAML) with every local absolute path cut to its last component: a repo shows no one's
    home folder or cache layout."""
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    if isinstance(value, str) and "\n" not in value and (os.path.isabs(value) or value.startswith("~")) and len(value) > 1:
        return Path(value).name or value
    return value


def _scrubbed(path: Path) -> bytes:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return "".join(json.dumps(scrub_paths(json.loads(line))) + "\n" for line in text.splitlines() if line.strip()).encode()
    if path.suffix == ".json":
        return (json.dumps(scrub_paths(json.loads(text)), indent=2, sort_keys=False) + "\n").encode()
    return yaml.safe_dump(scrub_paths(yaml.safe_load(text)), sort_keys=False).encode()


def operations(folder: Path, repo_id: str, report_dir: Path | None) -> list:
    """Commit operations: the folder's model files (UPLOADED, and MODELING_FILES or EXPORT_FILE), the report under
    report/, the generated README.md."""
    from huggingface_hub import CommitOperationAdd

    export = ExportRecord.read(folder)
    ops = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and uploaded(path.name, export is not None):
            content = _scrubbed(path) if path.name in SCRUBBED else str(path)
            ops.append(CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=content))
    if report_dir is not None:
        for pattern in REPORT_FILES:
            ops += [CommitOperationAdd(path_in_repo=f"report/{p.name}", path_or_fileobj=str(p)) for p in sorted(report_dir.glob(pattern))]
    run = dict(
        recipe=scrub_paths(_read(folder / "recipe.yaml", yaml.safe_load)),
        record=RunRecord.read(folder),
        summary=scrub_paths(_read(report_dir / NUMBERS, json.loads)) if report_dir is not None else None,
    )
    if export is not None:
        card = exported_model_card(
            export.target,
            export.layer_types,
            repo_id,
            teacher=scrub_paths(export.teacher),
            logit_check=(export.logit_difference, export.dtype) if export.logit_difference is not None else None,
            **run,
        )
    else:
        config = read_config(folder)
        config.source = scrub_paths(config.source)
        card = model_card(config, repo_id, **run)
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    return ops


def _transfer_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub call raises: HfHubHTTPError for answers, the HTTP library's HTTPError for transport
    failures (huggingface_hub 1.x is built on httpx, 2.x on httpx2, so take it from HfHubHTTPError's bases)."""
    from huggingface_hub.errors import HfHubHTTPError

    return (HfHubHTTPError, OSError, *(base for base in HfHubHTTPError.__mro__ if base.__name__ == "HTTPError"))


def _hub_error(error: Exception, repo_id: str, endpoint: str, token: str) -> LinearizeError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        message = "the Hub rejected the token (401 unauthorized): log in again with `hf auth login` or set a valid HF_TOKEN"
    elif status == 403:
        message = (
            f"the token cannot write to {repo_id!r} (403 forbidden): use a token with write access to that namespace "
            "(`hf auth login`; fine-grained tokens need write permission there), or push to a repo under your own account"
        )
    elif status is not None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = f"the Hub refused the push to {repo_id!r} ({first[:200]}); check the repo id and your access"
    else:
        message = f"could not reach the Hub at {endpoint} ({type(error).__name__}); check the network, or HF_ENDPOINT"
    return LinearizeError(message.replace(token, "***"))


def push(
    model_or_dir: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    report: str | os.PathLike[str] | None = None,
    commit_message: str = "Upload linearized model",
    ignore: Sequence[str] = (),
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
) -> str | list[str]:
    """Create `repo_id` if needed and upload a converted model to it in one commit; return the commit URL.

    `model_or_dir` is a converted model folder, a converted model object (then pass its `tokenizer`), or a folder
    written by `linearize export` (a native architecture: no modeling code goes up, the card says what serves it).
    `report` is a folder written by `linearize report` (default: the model folder's `report/` when present):
    its tables go into the model card and its figures under report/. Only the files a model repo needs go up
    (see this module's docstring); `log` (print, say) is told which, and which stay behind. A folder holding a
    file that looks like a secret is refused unless `ignore` names it (it stays behind either way).
    `dry_run=True` touches no network and needs no token: it returns the paths that would be uploaded.

    Example:
        >>> linearize.push("out/smollm2-hedgehog", "my-org/smollm2-135m-hedgehog", private=True, log=print)
    """
    from huggingface_hub import get_token

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LinearizeError(f"repo id {repo_id!r} must look like ORG/NAME (or USER/NAME)")
    token = token or get_token()
    if not token and not dry_run:
        raise LinearizeError("no Hugging Face token: run `hf auth login` (or set HF_TOKEN) with a token that has write access")
    settings = dict(private=private, revision=revision, token=token, report=report, commit_message=commit_message, ignore=ignore, dry_run=dry_run, log=log)
    if not isinstance(model_or_dir, (str, os.PathLike)):
        if tokenizer is None:
            raise LinearizeError("pushing a model object needs its tokenizer: pass tokenizer=... (or push the saved folder)")
        with tempfile.TemporaryDirectory() as staging:
            model_or_dir.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            return push(staging, repo_id, **settings)
    folder = Path(model_or_dir)
    check_folder(folder)
    rest = left_behind(folder, ignore)
    report_dir = Path(report) if report is not None else folder / "report"
    if report is not None and not (report_dir / NUMBERS).is_file():
        raise LinearizeError(f"report folder {str(report_dir)!r} has no report.json; write it with `linearize report RESULTS --out {report_dir}`")
    ops = operations(folder, repo_id, report_dir if (report_dir / NUMBERS).is_file() else None)
    paths = [op.path_in_repo for op in ops]
    if log:
        log(f"{'would upload' if dry_run else 'uploading'} to {repo_id}: {', '.join(paths)}")
        if rest:
            log(f"left behind in {folder}: {', '.join(rest)}")
    if dry_run:
        return paths
    return _commit(repo_id, ops, token, private=private, revision=revision, commit_message=commit_message)


def _commit(repo_id: str, ops: list, token: str, *, private: bool, revision: str | None, commit_message: str) -> str:
    """Create the repo (and branch) if needed and commit `ops` in one commit; return the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision)
    except _transfer_errors() as error:
        raise _hub_error(error, repo_id, api.endpoint, token) from None
    return info.commit_url
