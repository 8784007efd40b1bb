"""`linearize report`: results files in, report.md + PNG figures + report.json (every number) out.

Example:
    >>> from linearize.report import write_report
    >>> write_report(["out/eval.json", "out/bench.json"], "out/report")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from linearize.evaluate.results import RETRIEVAL_KINDS, Results, load_results
from linearize.hf.errors import LinearizeError

from . import compare, markdown, plots

REPORT = "report.md"
NUMBERS = "report.json"


def merge(inputs: Sequence[str | os.PathLike[str] | Results]) -> Results:
    merged = Results()
    for item in inputs:
        merged.extend(item if isinstance(item, Results) else load_results(item))
    return merged


def write_report(inputs: Sequence[str | os.PathLike[str] | Results], out: str | os.PathLike[str]) -> Path:
    """Write report.md, report.json and the figures into folder `out`; return the path of report.md."""
    if not inputs:
        raise LinearizeError("no results given: pass the files written by `linearize eval` / `linearize bench`")
    results = merge(inputs)
    if not results.records:
        raise LinearizeError("the results hold no measurements; run `linearize eval` or `linearize bench` first")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LinearizeError(f"--out {str(out)!r} is a file; give a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    summary = compare.summary(results)
    models = [m.name for m in results.models]
    written = {
        "accuracy": plots.accuracy(summary["accuracy"], models, out / "accuracy.png"),
        "perplexity": plots.perplexity(summary["perplexity"], models, out / "perplexity.png"),
        **{kind: plots.retrieval(summary[kind], kind, out / f"{kind}.png") for kind in RETRIEVAL_KINDS},
        "speed": plots.speed(summary["speed"], out / "speed.png"),
        "memory": plots.memory(summary["speed"], out / "memory.png"),
        "largest_batch": plots.largest_batch(summary["speed"], out / "largest_batch.png"),
    }
    figures = {key: path.name if path else None for key, path in written.items()}
    summary["figures"] = {key: name for key, name in figures.items() if name}
    (out / NUMBERS).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    report = out / REPORT
    report.write_text(markdown.render(summary, figures))
    return report


__all__ = ["NUMBERS", "REPORT", "merge", "write_report"]
