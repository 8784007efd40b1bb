"""Named task suites and the local lm-eval tasks shipped in `linearize/suites/` (the checkout's `eval/`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from linearize.hf.errors import LinearizeError

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
LOCAL_TASKS_DIR = SUITES_DIR / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task (or group) to run: the metric the report compares, and its few-shot count."""

    task: str
    metric: str | None = None
    num_fewshot: int | None = None


class _TagsAsText(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without importing their `!function` code."""


_TagsAsText.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))


@lru_cache(maxsize=1)
def suites() -> dict[str, dict[str, Any]]:
    """{suite name: {"description": ..., "tasks": [TaskSpec, ...]}} from suites.yaml."""
    raw = yaml.safe_load((SUITES_DIR / "suites.yaml").read_text()) or {}
    return {
        name: {"description": body.get("description", ""), "tasks": [TaskSpec(**entry) for entry in body["tasks"]]}
        for name, body in raw.items()
    }


@lru_cache(maxsize=1)
def local_tasks() -> tuple[str, ...]:
    """Names of the task YAMLs shipped with linearize (they run offline)."""
    names = []
    for path in sorted(LOCAL_TASKS_DIR.glob("*.yaml")):
        config = yaml.load(path.read_text(), Loader=_TagsAsText) or {}
        if "task" in config:
            names.append(config["task"])
    return tuple(names)


def _closest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3)
    return f"did you mean {', '.join(map(repr, close))}? " if close else ""


def parse_task(text: str) -> TaskSpec:
    """`arc_challenge` or `arc_challenge:acc_norm` (the metric to compare on)."""
    name, _, metric = text.strip().partition(":")
    if not name:
        raise LinearizeError(f"empty task name in {text!r}; use NAME or NAME:METRIC, e.g. arc_challenge:acc_norm")
    return TaskSpec(name, metric or None)


def task_specs(tasks: Any = (), suite: Any = ()) -> list[TaskSpec]:
    """The tasks of `suite` (names) followed by `tasks` (names, `NAME:METRIC`, or TaskSpec), without repeats.

    Names and `NAME:METRIC` may come comma-separated in one string, as on the command line.
    """
    specs: list[TaskSpec] = []
    known = suites()
    for name in _split(suite):
        if name not in known:
            listing = "; ".join(f"{n} ({', '.join(s.task for s in known[n]['tasks'])})" for n in known)
            raise LinearizeError(f"unknown suite {name!r}; {_closest(name, known)}available suites: {listing}")
        specs.extend(known[name]["tasks"])
    for item in tasks if isinstance(tasks, (list, tuple)) else [tasks]:
        if isinstance(item, TaskSpec):
            specs.append(item)
        else:
            specs.extend(parse_task(t) for t in _split(item))
    unique: dict[str, TaskSpec] = {}
    for spec in specs:
        unique.setdefault(spec.task, spec)
    return list(unique.values())


def _split(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def check_known(specs: list[TaskSpec], known: set[str]) -> None:
    """Every task must be an lm-eval task, group or tag, or a local task; say which are valid otherwise."""
    for spec in specs:
        if spec.task not in known:
            raise LinearizeError(
                f"unknown task {spec.task!r}; {_closest(spec.task, known)}local tasks: {', '.join(local_tasks())}; "
                f"suites: {', '.join(suites())}; every lm-eval task: `lm-eval ls tasks`"
            )
