"""The results file `linearize eval` and `linearize bench` write and `linearize report` reads.

One JSON object: the models scored (with which teacher each student is compared to) and a flat list of
records, one number-bearing row per (model, measurement). Flat rows merge across files and runs trivially.

    {"format": "linearize-results", "version": 1,
     "models": [{"name": "smollm2-hedgehog", "role": "student", "teacher": "teacher of smollm2-hedgehog", ...}],
     "records": [{"model": "smollm2-hedgehog", "kind": "task", "task": "arc_easy", "metric": "acc", "value": 0.61}, ...],
     "settings": {...}, "environment": {...}}

Record kinds and their fields:
    task        task, metric, value, stderr, samples, primary (the metric the report compares)
    perplexity  data, context, stride, prefix (the special token ids that open every window), value, tokens
    passkey     length, depth, value (fraction of exact matches), trials, tokens (actual prompt length), misses (the
                first three wrong answers: {"answer": the hidden number, "said": the model's continuation})
    needle, multikey, kv, vt   the same fields as passkey (see RETRIEVAL_KINDS)
    speed       context, batch, prefill_tokens_per_s, decode_tokens_per_s, decode_tokens, prefill_peak_bytes (peak
                during the prefill), decode_peak_bytes (peak while decoding, cache included; both above the memory
                held before the prefill), cache_bytes, memory_method, decode_path ("eager", "torch.compile" or
                "cuda_graph"; absent in files written before it: eager); out_of_memory (true, with no figures, where
                the batch did not fit); largest_batch (true on the row of the largest batch that fits, one per model
                and context, apart from the rows of the batch sizes asked for) with limited_by ("memory", or "cap"
                where the largest batch tried fitted)
    agreement   teacher, data, context, kl (KL(teacher || student), nats per token), top1 (next-token agreement), tokens
    training    stage, stage_kind, tokens, seconds, first_step_seconds (its first step: compilation and set-up), tokens_per_s
                (one distillation stage of the model)
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from linearize.hf.errors import LinearizeError
from linearize.record import RunRecord

FORMAT = "linearize-results"
# The retrieval record kinds (made by `linearize.evaluate.longcontext`) and their report titles.
RETRIEVAL_KINDS = {
    "passkey": "Passkey retrieval",
    "needle": "Needle in a haystack",
    "multikey": "Multi-key needle (RULER)",
    "kv": "Key-value retrieval (RULER)",
    "vt": "Variable tracking (RULER)",
}
VERSION = 1


@dataclass
class ModelEntry:
    """One scored model. `role` is "teacher" or "student"; a student names the teacher it is compared to.

    `via` says how a teacher was computed: "teacher_mode" (the converted model running the teacher's softmax
    attention on the same weights) or "original" (the unconverted model).
    """

    name: str
    role: str
    source: str | None = None
    teacher: str | None = None
    via: str | None = None
    mixers: dict[str, int] = field(default_factory=dict)


@dataclass
class Results:
    models: list[ModelEntry] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def add_model(self, entry: ModelEntry) -> None:
        if all(m.name != entry.name for m in self.models):
            self.models.append(entry)

    def add(self, model: str, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"model": model, "kind": kind, **fields}
        self.records.append(record)
        return record

    def extend(self, other: "Results") -> None:
        for entry in other.models:
            self.add_model(entry)
        self.records.extend(other.records)
        self.settings.update(other.settings)
        self.environment = self.environment or other.environment

    def of(self, kind: str, model: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind and (model is None or r["model"] == model)]

    def model(self, name: str) -> ModelEntry | None:
        return next((m for m in self.models if m.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "models": [asdict(m) for m in self.models],
            "records": self.records,
            "settings": self.settings,
            "environment": self.environment,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path


def add_training(results: Results, model: str, run: RunRecord) -> None:
    """A run record's distillation stages as `training` records of `model`."""
    for stage in run.stages:
        results.add(
            model, "training", stage=stage.stage, stage_kind=stage.kind, tokens=stage.tokens, seconds=stage.seconds,
            first_step_seconds=stage.first_step_seconds,
            tokens_per_s=stage.tokens_per_s,
        )


def from_run_record(run: RunRecord, name: str) -> Results:
    """Results of a saved run: each scored model's perplexity on the run's held-out text at its eval length (the
    teacher, the model straight after conversion, the distilled model `name`), and its stages."""
    results = Results()
    recipe = run.recipe
    evaluation, data = recipe.get("eval") or {}, recipe.get("data") or {}
    teacher = f"teacher of {name}"
    roles = (("teacher", teacher, "teacher"), ("converted", f"{name} (converted)", "student"), ("distilled", name, "student"))
    for key, model, role in roles:
        scores = getattr(run, key)
        if scores is None:
            continue
        results.add_model(ModelEntry(model, role, source=recipe.get("teacher"), teacher=None if role == "teacher" else teacher,
                                     via="teacher_mode" if role == "teacher" else None))
        context = evaluation.get("seq_len")
        results.add(model, "perplexity", data=Path(str(data.get("heldout") or "held-out")).name, context=context, stride=context,
                    value=scores.perplexity, tokens=evaluation.get("perplexity_tokens"))
    if results.model(name) is not None or not results.models:
        results.add_model(ModelEntry(name, "student", source=recipe.get("teacher"), teacher=teacher if results.models else None))
        add_training(results, name, run)
    return results


def load_results(path: str | Path) -> Results:
    """Read one results file, a folder of them, or a model folder saved by `linearize run` / `distill` (its
    results.json); anything else is a one-line error."""
    path = Path(path)
    if path.is_file() and (run := RunRecord.read(path)) is not None:
        return from_run_record(run, path.resolve().parent.name)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        candidates = [f for f in files if _is_results(f)]
        if not candidates and (run := RunRecord.read(path)) is not None:
            return from_run_record(run, path.resolve().name)
        if not candidates:
            raise LinearizeError(
                f"folder {str(path)!r} holds no linearize results (.json written by `linearize eval` or `linearize bench`, "
                "or the results.json of `linearize run`)"
            )
        merged = Results()
        for file in candidates:
            merged.extend(load_results(file))
        return merged
    if not path.is_file():
        raise LinearizeError(f"results file {str(path)!r} does not exist; write one with `linearize eval ... --out FILE.json`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LinearizeError(f"{str(path)!r} is not JSON ({error}); pass a file written by `linearize eval` or `linearize bench`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LinearizeError(f"{str(path)!r} is not a linearize results file; pass a file written by `linearize eval` or `linearize bench`")
    if data.get("version") != VERSION:
        raise LinearizeError(f"{str(path)!r} has results format version {data.get('version')}; this linearize reads version {VERSION}")
    return Results(
        models=[ModelEntry(**m) for m in data.get("models", [])],
        records=list(data.get("records", [])),
        settings=dict(data.get("settings", {})),
        environment=dict(data.get("environment", {})),
    )


def _is_results(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware, so numbers from different machines are never compared unknowingly."""
    import torch
    import transformers

    info = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
