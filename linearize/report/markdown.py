"""report.md: the comparison tables as GitHub-flavoured Markdown, with the figures linked beside them."""

from __future__ import annotations

import json
from typing import Any

from linearize.evaluate.results import RETRIEVAL_KINDS


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _bytes(value: Any) -> str:
    if value is None:
        return "–"
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def models_section(summary: dict[str, Any]) -> str:
    rows = []
    for m in summary["models"]:
        mixers = ", ".join(f"{k}×{v}" for k, v in m["mixers"].items()) or "–"
        role = m["role"] + (f" ({m['via']})" if m.get("via") else "")
        rows.append([m["name"], role, m.get("teacher") or "–", mixers, m.get("source") or "–"])
    return "## Models\n\n" + table(["model", "role", "compared to", "layers", "source"], rows)


def accuracy_section(summary: dict[str, Any], models: list[str], students: list[str], figure: str | None) -> str:
    rows = summary["accuracy"]
    if not rows:
        return ""
    header = ["task", "metric"] + models + [f"{s}: % of teacher" for s in students]
    body = [
        [r["task"], r["metric"]] + [_num(r["values"].get(m)) for m in models] + [_num(r["recovered"].get(s), 1) for s in students]
        for r in rows
    ]
    text = "## Accuracy (lm-eval)\n\n" + table(header, body)
    return text + (f"\n\n![accuracy]({figure})" if figure else "")


def perplexity_section(summary: dict[str, Any], models: list[str], students: list[str], figure: str | None) -> str:
    rows = summary["perplexity"]
    if not rows:
        return ""
    # A stride column only where one text is measured at one context with several strides (different numbers).
    strided = len({(r["data"], r["context"], r.get("stride")) for r in rows}) > len({(r["data"], r["context"]) for r in rows})
    header = ["text", "context"] + ["stride"] * strided + models + [f"{s} / teacher" for s in students]
    body = [
        [r["data"], str(r["context"])] + [_num(r.get("stride"))] * strided + [_num(r["values"].get(m), 2) for m in models]
        + [_num(r["ratio"].get(s), 3) for s in students]
        for r in rows
    ]
    text = "## Perplexity\n\nLower is better; a ratio of 1.000 matches the teacher.\n\n" + table(header, body)
    return text + (f"\n\n![perplexity]({figure})" if figure else "")


def agreement_section(summary: dict[str, Any]) -> str:
    rows = summary["agreement"]
    if not rows:
        return ""
    body = [[r["model"], r["data"], str(r["context"]), _num(r["kl"], 4), f"{100 * r['top1']:.1f}%", str(r["tokens"])] for r in rows]
    text = "## Agreement with the teacher\n\nKL(teacher || student) in nats per token (0 matches the teacher) and how often both pick the same next token.\n\n"
    return text + table(["student", "text", "context", "KL", "top-1 agreement", "tokens"], body)


def training_section(summary: dict[str, Any]) -> str:
    rows = summary["training"]
    if not rows:
        return ""
    body = [
        [r["model"], str(r["stage"]), r["stage_kind"] or "–", f"{r['tokens']:,}" if r["tokens"] else "–", _num(r["seconds"], 1),
         _num(r.get("first_step_seconds"), 1), f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "–"]
        for r in rows
    ]
    text = ("## Distillation\n\nEach stage's wall-clock time, and of it the first step's (compilation, on a compiled stage, and "
            "first-use set-up); tokens/s is the stage's tokens over its whole time.\n\n")
    return text + table(["model", "stage", "kind", "tokens", "seconds", "first step (s)", "tokens/s"], body)


def retrieval_section(kind: str, data: dict[str, Any], figure: str | None) -> str:
    if not data["models"]:
        return ""
    models = list(data["models"])
    body = [[str(length)] + [_num(data["models"][m]["per_length"].get(length), 2) for m in models] for length in data["lengths"]]
    title = RETRIEVAL_KINDS[kind]
    depths = ", ".join(f"{d:g}" for d in data["depths"])
    text = f"## {title}\n\nExact-match accuracy per prompt length, averaged over depths {depths}.\n\n" + table(["length"] + models, body)
    misses = [[m, str(x["length"]), f"{x['depth']:g}", x["answer"], _quoted(x["said"])] for m in models for x in data["models"][m]["misses"]]
    if misses:
        text += "\n\nWhat each model said in place of the answer, in its first misses:\n\n" + table(["model", "length", "depth", "answer", "said"], misses)
    return text + (f"\n\n![{kind}]({figure})" if figure else "")


def _quoted(text: str) -> str:
    """Generated text in a table cell: quoted, with its newlines and pipes escaped."""
    return json.dumps(text).replace("|", "\\|")


def speed_section(summary: dict[str, Any], figures: list[str]) -> str:
    data = summary["speed"]
    if not data["series"]:
        return ""
    rows = []
    for model, batches in data["series"].items():
        for batch, s in batches.items():
            paths = s.get("decode_path") or ["eager"] * len(s["context"])  # a report.json written before decode paths
            for i, context in enumerate(s["context"]):
                rows.append(
                    [model, str(batch), str(context), _num(s["prefill_tokens_per_s"][i], 0), _num(s["decode_tokens_per_s"][i], 1),
                     _bytes(s["prefill_peak_bytes"][i]), _bytes(s["decode_peak_bytes"][i]), _bytes(s["cache_bytes"][i]), paths[i]]
                )
    header = ["model", "batch", "context", "prefill tok/s", "decode tok/s", "prefill peak", "decode peak", "cache", "decode path"]
    method = {r.get("memory_method") for r in summary["records"] if r["kind"] == "speed"} - {None}
    text = (
        "## Speed and memory\n\n"
        f"Peaks are above the memory held before prefill ({', '.join(sorted(method)) or 'unmeasured'}); "
        "cache sizes are exact.\n\n" + table(header, rows)
    )
    if data["ratios"]:
        ratio_rows = [
            [r["student"], str(r["batch"]), str(r["context"]), _num(r["decode_tokens_per_s"], 2), _num(r["prefill_tokens_per_s"], 2),
             _num(r["decode_peak_bytes"], 2), _num(r["cache_bytes"], 3), _num(r["prefill_peak_bytes"], 2)]
            for r in data["ratios"]
        ]
        text += "\n\nStudent / teacher (above 1: the student is faster or uses more memory).\n\n" + table(
            ["student", "batch", "context", "decode speed", "prefill speed", "decode peak memory", "cache", "prefill peak memory"], ratio_rows
        )
    return text + "".join(f"\n\n![{f.split('.')[0]}]({f})" for f in figures)


def largest_batch_section(summary: dict[str, Any], figure: str | None) -> str:
    data = summary["speed"]
    if not data.get("largest_batch"):  # also a report.json written before the largest-batch search
        return ""
    rows = []
    for model, s in data["largest_batch"].items():
        for i, context in enumerate(s["context"]):
            rows.append(
                [model, str(context), _num(s["batch"][i]) if s["batch"][i] else "none fits", s["limited_by"][i] or "–", s["decode_path"][i],
                 _num(s["decode_tokens_per_s"][i], 1), _num(s["prefill_tokens_per_s"][i], 0), _bytes(s["prefill_peak_bytes"][i]),
                 _bytes(s["decode_peak_bytes"][i])]
            )
    cap = summary["settings"].get("max_batch")
    text = (
        "## Decode throughput at the largest batch\n\n"
        f"Per context, the largest batch{f' up to {cap}' if cap else ''} whose prefill and decode fit in memory, and the speeds "
        "and peaks there. Limited by \"cap\": the cap itself fitted, so a larger batch may too.\n\n"
        + table(["model", "context", "largest batch", "limited by", "decode path", "decode tok/s", "prefill tok/s", "prefill peak", "decode peak"], rows)
    )
    if data["largest_batch_ratios"]:
        ratio_rows = [
            [r["student"], str(r["context"]), str(r["student_batch"]), str(r["teacher_batch"]), _num(r["decode_tokens_per_s"], 2)]
            for r in data["largest_batch_ratios"]
        ]
        text += "\n\nStudent / teacher decode tokens/s, each at its own largest batch.\n\n" + table(
            ["student", "context", "student's batch", "teacher's batch", "decode speed"], ratio_rows
        )
    return text + (f"\n\n![largest_batch]({figure})" if figure else "")


def environment_section(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    if not env:
        return ""
    return "## Environment\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items())


def render(summary: dict[str, Any], figures: dict[str, str | None], title: str | None = "linearize report", level: int = 2) -> str:
    """The report as Markdown: `title` as its heading (None: no heading), sections at heading `level` (the model
    card nests them under its own), each figure linked by the path `figures` gives for it."""
    models = [m["name"] for m in summary["models"]]
    students = [p["student"] for p in summary["pairs"]]
    speed_figures = [f for f in (figures.get("speed"), figures.get("memory")) if f]
    sections = [
        models_section(summary),
        accuracy_section(summary, models, students, figures.get("accuracy")),
        perplexity_section(summary, models, students, figures.get("perplexity")),
        agreement_section(summary),
        training_section(summary),
        *(retrieval_section(kind, summary[kind], figures.get(kind)) for kind in RETRIEVAL_KINDS),
        speed_section(summary, speed_figures),
        largest_batch_section(summary, figures.get("largest_batch")),
        environment_section(summary),
    ]
    # Every section opens with its own level-2 heading.
    text = ["#" * (level - 2) + s for s in sections if s]
    return "\n\n".join(([f"# {title}"] if title else []) + text) + "\n"
