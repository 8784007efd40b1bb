"""Teacher-student comparisons derived from results records: the numbers the report's tables and plots show.

Every student is compared with the teacher it names (its teacher_mode view) or, failing that, with a teacher
scored in the same results whose source is the student's source (the original model scored separately).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from linearize.evaluate.results import RETRIEVAL_KINDS, Results


def pairs(results: Results) -> list[tuple[str, str]]:
    """(teacher, student) model names for every student that has a teacher in these results."""
    found = []
    teachers = [m for m in results.models if m.role == "teacher"]
    for student in (m for m in results.models if m.role == "student"):
        teacher = results.model(student.teacher) if student.teacher else None
        if teacher is None:
            teacher = next((t for t in teachers if student.source and t.source == student.source), None)
        if teacher is not None:
            found.append((teacher.name, student.name))
    return found


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _models_in(records: list[dict[str, Any]], results: Results) -> list[str]:
    present = {r["model"] for r in records}
    return [m.name for m in results.models if m.name in present]


def accuracy(results: Results) -> list[dict[str, Any]]:
    """Per task (primary metric): each model's value and each student's % of its teacher's value."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for record in results.of("task"):
        if record.get("primary"):
            row = rows.setdefault((record["task"], record["metric"]), {"task": record["task"], "metric": record["metric"], "values": {}, "stderr": {}})
            row["values"][record["model"]] = record["value"]
            row["stderr"][record["model"]] = record.get("stderr")
    for row in rows.values():
        row["recovered"] = {}
        for teacher, student in pairs(results):
            ratio = _ratio(row["values"].get(student), row["values"].get(teacher))
            if ratio is not None:
                row["recovered"][student] = 100 * ratio
    return list(rows.values())


def perplexity(results: Results) -> list[dict[str, Any]]:
    """Per (text, context, stride): each model's perplexity and each student's ratio to its teacher (1.0 = equal).
    Measurements of one text at one context with other strides (a run's back-to-back windows, `eval`'s strided
    ones) are other rows: they are different numbers."""
    rows: dict[tuple[str, int, Any], dict[str, Any]] = {}
    for record in results.of("perplexity"):
        key = (record["data"], record["context"], record.get("stride"))
        row = rows.setdefault(key, {"data": record["data"], "context": record["context"], "stride": record.get("stride"), "values": {}})
        row["values"][record["model"]] = record["value"]
    for row in rows.values():
        row["ratio"] = {}
        for teacher, student in pairs(results):
            ratio = _ratio(row["values"].get(student), row["values"].get(teacher))
            if ratio is not None:
                row["ratio"][student] = ratio
    return sorted(rows.values(), key=lambda r: (r["data"], r["context"], r["stride"] or 0))


MISSES_SHOWN = 2  # per model and retrieval kind, in the report


def retrieval(results: Results, kind: str) -> dict[str, Any]:
    """For one retrieval kind (passkey, needle, ...): per model, the accuracy grid over (length, depth), the mean
    per length, and its first misses (shortest length and depth first) with what it said."""
    records = results.of(kind)
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    grids = {}
    for model in _models_in(records, results):
        mine = sorted((r for r in records if r["model"] == model), key=lambda r: (r["length"], r["depth"]))
        cells = {(r["length"], r["depth"]): r["value"] for r in mine}
        grid = [[cells.get((length, depth)) for depth in depths] for length in lengths]
        per_length = {}
        for length, line in zip(lengths, grid):
            known = [v for v in line if v is not None]
            per_length[length] = sum(known) / len(known) if known else None
        misses = [{"length": r["length"], "depth": r["depth"], **miss} for r in mine for miss in r.get("misses", [])]
        grids[model] = {"grid": grid, "per_length": per_length, "misses": misses[:MISSES_SHOWN]}
    return {"lengths": lengths, "depths": depths, "models": grids}


def agreement(results: Results) -> list[dict[str, Any]]:
    """Per student, text and context: KL to its teacher (nats per token) and top-1 next-token agreement."""
    keys = ("model", "teacher", "data", "context", "kl", "top1", "tokens")
    return sorted(({k: r.get(k) for k in keys} for r in results.of("agreement")), key=lambda r: (r["data"], r["context"]))


def training(results: Results) -> list[dict[str, Any]]:
    """Per model, its distillation stages in order: tokens, seconds, the first step's seconds and tokens/s."""
    keys = ("model", "stage", "stage_kind", "tokens", "seconds", "first_step_seconds", "tokens_per_s")
    order = {name: i for i, name in enumerate(m.name for m in results.models)}
    rows = ({k: r.get(k) for k in keys} for r in results.of("training"))
    return sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["stage"] if r["stage"] is not None else -1))


SPEED_FIELDS = ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_peak_bytes", "decode_peak_bytes", "cache_bytes")


def speed(results: Results) -> dict[str, Any]:
    """Per model and batch size, each speed/memory field against context; and per pair, student / teacher ratios.
    The rows of the largest batch that fits are apart, under "largest_batch" (see `largest_batch`)."""
    records = [r for r in results.of("speed") if not r.get("largest_batch")]
    series: dict[str, dict[int, dict[str, list]]] = defaultdict(dict)
    for model in _models_in(records, results):
        for batch in sorted({r["batch"] for r in records if r["model"] == model}):
            rows = sorted((r for r in records if r["model"] == model and r["batch"] == batch), key=lambda r: r["context"])
            series[model][batch] = {"context": [r["context"] for r in rows], "decode_path": [r.get("decode_path", "eager") for r in rows]} | {
                f: [r.get(f) for r in rows] for f in SPEED_FIELDS
            }
    ratios = []
    by_key = {(r["model"], r["batch"], r["context"]): r for r in records}
    for teacher, student in pairs(results):
        for (model, batch, context), row in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            other = by_key.get((teacher, batch, context))
            if model != student or other is None:
                continue
            ratios.append(
                {"teacher": teacher, "student": student, "batch": batch, "context": context}
                | {f: _ratio(row.get(f), other.get(f)) for f in SPEED_FIELDS}
            )
    return {"series": dict(series), "ratios": ratios, **largest_batch(results)}


def largest_batch(results: Results) -> dict[str, Any]:
    """Per model, against context: the largest batch that fits (None where not even batch 1 did), what limited it
    ("memory", or "cap" where the cap fitted) and the speed/memory fields there; per pair and context, the student's
    decode tokens/s over its teacher's, each at its own largest batch."""
    records = [r for r in results.of("speed") if r.get("largest_batch")]
    series = {}
    for model in _models_in(records, results):
        rows = sorted((r for r in records if r["model"] == model), key=lambda r: r["context"])
        series[model] = {
            "context": [r["context"] for r in rows],
            "batch": [None if r.get("out_of_memory") else r["batch"] for r in rows],
            "limited_by": [r.get("limited_by") for r in rows],
            "decode_path": [r.get("decode_path", "eager") for r in rows],
        } | {f: [r.get(f) for r in rows] for f in SPEED_FIELDS}
    ratios = []
    by_key = {(r["model"], r["context"]): r for r in records if not r.get("out_of_memory")}
    for teacher, student in pairs(results):
        for context in sorted({c for m, c in by_key if m == student}):
            ours, theirs = by_key[(student, context)], by_key.get((teacher, context))
            if theirs is not None:
                ratios.append(
                    {"teacher": teacher, "student": student, "context": context, "student_batch": ours["batch"], "teacher_batch": theirs["batch"],
                     "decode_tokens_per_s": _ratio(ours.get("decode_tokens_per_s"), theirs.get("decode_tokens_per_s"))}
                )
    return {"largest_batch": series, "largest_batch_ratios": ratios}


def summary(results: Results) -> dict[str, Any]:
    """Everything the report shows, as plain data (written beside the report as report.json)."""
    return {
        "models": [vars(m) for m in results.models],
        "pairs": [{"teacher": t, "student": s} for t, s in pairs(results)],
        "accuracy": accuracy(results),
        "perplexity": perplexity(results),
        "agreement": agreement(results),
        "training": training(results),
        **{kind: retrieval(results, kind) for kind in RETRIEVAL_KINDS},
        "speed": speed(results),
        "environment": results.environment,
        "settings": results.settings,
        "records": results.records,
    }
