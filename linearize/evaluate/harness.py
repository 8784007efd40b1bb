"""lm-eval in the same process: one `HFLM` wrapper around the loaded weights scores the teacher view and the
student of a converted model on the same tasks with the same settings.

Importing this module registers the lm-eval model name "linearize". lm-eval 0.4.13 looks models up only in its
own registry and reads no plugin entry points (and builds the model before it reads any task file, so
`--include_path` cannot bring the name in either): the name exists once this module is imported. The lm-eval
command line with it is `python -m linearize.evaluate run --model linearize --model_args pretrained=DIR ...`
(see `linearize/evaluate/__main__.py`). Plain `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`
works too, as converted folders carry their modeling code.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from contextlib import contextmanager, nullcontext
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from linearize.hf.errors import LinearizeError
from linearize.hf.mixers import mixers_in, teacher_mode

from .hubdata import download_hint, hub_reachable, offline_datasets
from .scored import Scored
from .suites import LOCAL_TASKS_DIR, TaskSpec, check_known, local_tasks

# The metric a task is compared on when neither the suite nor `NAME:METRIC` says.
PREFERRED_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "bleu", "word_perplexity")


@register_model("linearize")
class LinearizeLM(HFLM):
    """lm-eval's Hugging Face model, plus `teacher=True`: score a converted model as its own teacher (teacher_mode).

    From the lm-eval command line: `--model linearize --model_args pretrained=DIR[,teacher=True]`; loading needs no
    remote code because importing linearize registers the converted architecture with transformers.
    """

    def __init__(self, pretrained: Any, teacher: bool = False, **kwargs: Any):
        import linearize  # noqa: F401  (registers model_type "linearized" with the Auto classes)

        super().__init__(pretrained=pretrained, **kwargs)
        self.teacher = str(teacher).lower() in ("true", "1", "yes")
        if self.teacher and not mixers_in(self.model):
            raise LinearizeError("teacher=True scores a converted model as its teacher, but this model has no linearize mixers")

    def _mode(self):
        return teacher_mode(self.model) if self.teacher else nullcontext()

    def _model_call(self, *args, **kwargs):
        with self._mode():
            return super()._model_call(*args, **kwargs)

    def _model_generate(self, *args, **kwargs):
        with self._mode():
            return super()._model_generate(*args, **kwargs)


def task_manager(specs: list[TaskSpec]):
    """lm-eval's task index: only the local tasks when that is all that is asked (indexing lm-eval's own
    thousands of task files takes about 10 s on 2 cores, so each index is built once a process: a teacher and its
    students are scored against the same one)."""
    return _task_index(not all(spec.task in local_tasks() for spec in specs))


@functools.cache
def _task_index(include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=include_defaults)


def _datasets_of(manager, name: str, seen: set[str] | None = None) -> list[tuple[str, str | None]]:
    """The Hub (dataset, config) pairs a task, group or tag reads, from lm-eval's index (no data is loaded)."""
    seen = set() if seen is None else seen
    if name in seen or name not in manager.task_index:
        return []
    seen.add(name)
    entry = manager.task_index[name]
    config = entry.cfg or {}
    if config.get("dataset_path") and not config.get("custom_dataset"):
        return [(config["dataset_path"], config.get("dataset_name"))]
    children = config.get("task") if entry.kind.name == "GROUP" else sorted(entry.tags) if entry.kind.name == "TAG" else []
    found = []
    for child in children or []:
        child_name = child.get("task") if isinstance(child, dict) else child
        if isinstance(child_name, str):
            found += _datasets_of(manager, child_name, seen)
    return found


def _missing_data_error(spec: TaskSpec, manager) -> LinearizeError:
    datasets = _datasets_of(manager, spec.task)
    if not datasets:
        return LinearizeError(f"task {spec.task!r} could not load its data offline; run it once with network access")
    path, name = datasets[0]
    configs = sorted({n for p, n in datasets if p == path and n})
    shown = f"{path!r}" + (f" (config {configs[0]!r})" if len(configs) == 1 else f" ({len(configs)} configs)" if configs else "")
    others = sorted({p for p, _ in datasets} - {path})
    also = f" and {', '.join(map(repr, others))}" if others else ""
    return LinearizeError(
        f"task {spec.task!r} needs the Hugging Face dataset {shown}{also}, which is not in the local datasets cache and the "
        f"Hub is not reachable: {download_hint(path, configs[0] if len(configs) == 1 else None)}"
        + (" (and each of its configs)" if len(configs) > 1 else "")
    )


def _check_data(specs: list[TaskSpec], manager) -> None:
    """Offline: load each Hub task once from the cache, so a missing dataset fails here, by name, in one line."""
    for spec in specs:
        if spec.task in local_tasks():
            continue
        try:
            manager.load([spec.task])
        except Exception:
            raise _missing_data_error(spec, manager) from None


@contextmanager
def _quiet_lm_eval():
    # lm-eval warns about things that are deliberate here (a model object instead of a name, task defaults), and
    # records the git commit of the working directory by running `git describe`, which prints "fatal: not a git
    # repository" to the terminal outside one; it gets the same answer here, asked quietly.
    import lm_eval.evaluator

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    git_hash = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _git_commit
    try:
        yield
    finally:
        logger.setLevel(level)
        lm_eval.evaluator.get_git_commit_hash = git_hash


def _git_commit() -> str | None:
    """The current directory's git commit (`git describe --always`), or None outside a repository."""
    try:
        found = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (found.stdout.strip() or None) if found.returncode == 0 else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metric_rows(row: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """{metric: (value, stderr)} from one lm-eval results row ("acc,none": 0.5, "acc_stderr,none": 0.02, ...)."""
    metrics = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key or _number(value) is None:
            continue
        metric, _, filtered = key.partition(",")
        name = metric if filtered == "none" else f"{metric},{filtered}"
        metrics[name] = (_number(value), _number(row.get(f"{metric}_stderr,{filtered}")))
    return metrics


def _primary(spec: TaskSpec, task: str, metrics: dict[str, Any]) -> str:
    if spec.metric:
        if spec.metric not in metrics:
            raise LinearizeError(f"task {task!r} reports no metric {spec.metric!r}; it reports {', '.join(metrics)}: use one of those after the colon")
        return spec.metric
    return next((m for m in PREFERRED_METRICS if m in metrics), next(iter(metrics)))


def records_of(spec: TaskSpec, output: dict[str, Any]) -> list[dict[str, Any]]:
    """Task records (one per metric) for the requested task, group, or each member of a tag."""
    rows = output.get("results", {})
    names = [spec.task] if spec.task in rows else sorted(rows)
    samples = output.get("n-samples", {})
    records = []
    for task in names:
        metrics = _metric_rows(rows[task])
        if not metrics:
            continue
        primary = _primary(spec, task, metrics)
        count = samples.get(task, {}).get("effective")
        for metric, (value, stderr) in metrics.items():
            records.append(
                dict(task=task, metric=metric, value=value, stderr=stderr, samples=count, primary=metric == primary, num_fewshot=spec.num_fewshot)
            )
    return records


def run_tasks(
    scored: list[Scored],
    specs: list[TaskSpec],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    log=None,
) -> list[tuple[str, dict[str, Any]]]:
    """Run every task on every scored model: [(model name, task record), ...].

    Models that share weights (a converted model and its teacher view) share one lm-eval wrapper.
    `num_fewshot` overrides the tasks' own and the suites' counts.
    """
    import lm_eval

    manager = task_manager(specs)
    check_known(specs, set(manager.all_tasks))
    needs_hub = any(spec.task not in local_tasks() for spec in specs)
    offline = needs_hub and not hub_reachable()
    wrappers: dict[int, LinearizeLM] = {}
    out = []
    with offline_datasets(offline), _quiet_lm_eval():
        if offline:
            _check_data(specs, manager)
        for item in scored:
            lm = wrappers.get(id(item.model))
            if lm is None:
                lm = wrappers[id(item.model)] = LinearizeLM(pretrained=item.model, tokenizer=item.tokenizer, batch_size=batch_size)
            lm.teacher = item.as_teacher
            for spec in specs:
                if log:
                    log(f"{item.name}: {spec.task}")
                shots = num_fewshot if num_fewshot is not None else spec.num_fewshot
                output = lm_eval.simple_evaluate(
                    model=lm, tasks=[spec.task], num_fewshot=shots, limit=limit, task_manager=manager, log_samples=False
                )
                out += [(item.name, record) for record in records_of(TaskSpec(spec.task, spec.metric, shots), output)]
    return out
