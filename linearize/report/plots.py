"""The report's figures as PNG files. Each function takes the plain data from `compare` and returns the file it
wrote, or None when there is nothing to draw.

Figures are drawn on matplotlib `Figure` objects directly, never through pyplot: they render with the Agg
canvas on machines without a display, and the caller's own pyplot backend and open figures are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from linearize.evaluate.results import RETRIEVAL_KINDS

MIB = 1024 * 1024


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def accuracy(rows: list[dict[str, Any]], models: list[str], path: Path) -> Path | None:
    """Grouped bars per task, one bar per model; students' bars carry their % of the teacher."""
    if not rows:
        return None
    figure = Figure(figsize=(max(5, 1.6 * len(rows) * max(1, len(models)) / 2 + 2), 4))
    axis = figure.subplots()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(rows))]
        values = [row["values"].get(model) for row in rows]
        bars = axis.bar(xs, [v or 0 for v in values], width, label=model)
        for bar, row in zip(bars, rows):
            recovered = row["recovered"].get(model)
            if recovered is not None:
                axis.annotate(f"{recovered:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(rows)), [f"{r['task']}\n({r['metric']})" for r in rows], fontsize=8)
    axis.set_ylabel("score")
    axis.set_title("accuracy per task (% = of the teacher's score)")
    axis.legend(fontsize=8)
    return _save(figure, path)


def _row_label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The text of a perplexity row, with its stride where the rows measure one text at several strides."""
    strides = {r.get("stride") for r in rows if r["data"] == row["data"]}
    return row["data"] if len(strides) == 1 else f"{row['data']}, stride {row.get('stride')}"


def perplexity(rows: list[dict[str, Any]], models: list[str], path: Path) -> Path | None:
    """Perplexity of every model, each value written on the figure: bars side by side for one context length,
    one line per model and text against context length for several. The value axis is logarithmic only when the
    values span more than a factor of ten, so that close values stay visibly apart."""
    if not rows:
        return None
    values = [v for r in rows for v in r["values"].values() if v is not None]
    contexts = sorted({r["context"] for r in rows})
    figure = Figure(figsize=(max(6, 1.2 * len(models) + 2), 4))
    axis = figure.subplots()
    if len(contexts) == 1:
        labels, heights = [], []
        for row in rows:
            for model in models:
                if row["values"].get(model) is not None:
                    labels.append(model if len(rows) == 1 else f"{model}\n({_row_label(row, rows)})")
                    heights.append(row["values"][model])
        bars = axis.bar(range(len(heights)), heights, color=[f"C{i % 10}" for i in range(len(heights))])
        axis.bar_label(bars, [f"{h:.2f}" for h in heights], fontsize=8)
        axis.set_xticks(range(len(labels)), labels, fontsize=8, rotation=15, ha="right")
        axis.set_title(f"perplexity at {contexts[0]} tokens of context (lower is better)")
    else:
        for series in sorted({_row_label(r, rows) for r in rows}):
            subset = sorted((r for r in rows if _row_label(r, rows) == series), key=lambda r: r["context"])
            for model in models:
                points = [(r["context"], r["values"][model]) for r in subset if r["values"].get(model) is not None]
                if points:
                    xs, ys = zip(*points)
                    axis.plot(xs, ys, marker="o", label=f"{model} ({series})")
                    for x, y in points:
                        axis.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [str(c) for c in contexts])
        axis.set_xlabel("context (tokens)")
        axis.set_title("perplexity against context length (lower is better)")
        axis.legend(fontsize=8)
    if values and max(values) > 10 * min(values):
        axis.set_yscale("log")
    axis.set_ylabel("perplexity")
    return _save(figure, path)


def retrieval(data: dict[str, Any], kind: str, path: Path) -> Path | None:
    """One heatmap per model: exact-match accuracy over prompt length (rows) and depth (columns)."""
    models = list(data["models"])
    if not models:
        return None
    lengths, depths = data["lengths"], data["depths"]
    figure = Figure(figsize=(1.5 + 0.9 * len(depths) * len(models) + 1.5, 0.45 * len(lengths) + 2.2), layout="constrained")
    axes = figure.subplots(1, len(models), squeeze=False)
    image = None
    for index, (axis, model) in enumerate(zip(axes[0], models)):
        grid = [[float("nan") if v is None else v for v in row] for row in data["models"][model]["grid"]]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:  # not NaN
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        axis.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        axis.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        axis.set_xlabel("depth")
        if index == 0:
            axis.set_ylabel("length (tokens)")
        axis.set_title(model, fontsize=9)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="exact match")
    figure.suptitle(RETRIEVAL_KINDS[kind])
    figure.savefig(path, dpi=110)
    return path


def _lines(data: dict[str, Any]) -> dict[str, dict[str, list]]:
    """The speed series as one line per model and batch size (the batch named where a model has several)."""
    return {
        model if len(batches) == 1 else f"{model} (batch {batch})": series
        for model, batches in data["series"].items()
        for batch, series in batches.items()
    }


def _against_context(lines: dict[str, dict[str, list]], panels: tuple[tuple[str, str, str, float], ...], path: Path) -> Path | None:
    """One panel per (field, title, axis label, divisor): that field of every line against context, teacher and
    student on the same axes."""
    if not lines:
        return None
    figure = Figure(figsize=(5 * len(panels), 4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for label, series in lines.items():
        for axis, (field, _, _, scale) in zip(axes, panels):
            points = [(c, v / scale) for c, v in zip(series["context"], series[field]) if v is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
    contexts = sorted({c for series in lines.values() for c in series["context"]})
    for axis, (_, title, ylabel, _) in zip(axes, panels):
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [str(c) for c in contexts])
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(ylabel)
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
    return _save(figure, path)


def speed(data: dict[str, Any], path: Path) -> Path | None:
    """Prefill and decode tokens/s against context, one line per model and batch size."""
    panels = (("prefill_tokens_per_s", "prefill speed", "tokens / s", 1), ("decode_tokens_per_s", "decode speed", "tokens / s", 1))
    return _against_context(_lines(data), panels, path)


def memory(data: dict[str, Any], path: Path) -> Path | None:
    """Peak memory during prefill and while decoding, and the cache's size, against context."""
    panels = (
        ("prefill_peak_bytes", "peak memory during prefill (above the weights)", "MiB", MIB),
        ("decode_peak_bytes", "peak memory while decoding (above the weights)", "MiB", MIB),
        ("cache_bytes", "generation cache", "MiB", MIB),
    )
    return _against_context(_lines(data), panels, path)


def largest_batch(data: dict[str, Any], path: Path) -> Path | None:
    """Decode tokens/s at the largest batch that fits, and that batch, against context: one line per model."""
    panels = (
        ("decode_tokens_per_s", "decode speed at the largest batch that fits", "tokens / s", 1),
        ("batch", "largest batch that fits", "batch", 1),
    )
    return _against_context(data["largest_batch"], panels, path)
