"""The run record: what `linearize run` and `linearize distill` measured, saved beside the model as results.json.

One versioned JSON object, written by the Run and read back as a `RunRecord` by `linearize eval` (the training
records of a saved student), `linearize report` and the model card of `linearize push`:

    {"format": "linearize-run", "version": 1, "recipe": {...}, "output": "out/run", "data": "...",
     "seconds": 75.2, "stages": [{"stage": 0, "kind": "attention_transfer", "steps": 8, "tokens": 32768, ...}],
     "selection": null, "teacher": {"perplexity": 36.6, "generation": "..."}, "converted": {...}, "distilled": {...}}

Files written before the format was versioned (the same fields, no "format") read as version 1.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hf.errors import LinearizeError

FORMAT = "linearize-run"
VERSION = 1
RESULTS_FILE = "results.json"


@dataclass
class Scores:
    """Held-out perplexity and a greedy continuation of the recipe's prompt."""

    perplexity: float
    generation: str = ""


@dataclass
class StageReport:
    """One distillation stage: its optimizer steps and tokens, its whole training time (a resumed stage counts
    the time before the interruption too), the time of the first step its process took (`first_step_seconds`:
    compilation, on a compiled stage, and first-use set-up), its first and last metric records, and why it trained nothing when
    it did not (`skipped`); `details` holds what only its kind reports (the layers attention transfer trained,
    the number of LoRA targets)."""

    stage: int
    kind: str = ""
    steps: int = 0
    tokens: int = 0
    trainable_parameters: int = 0
    seconds: float = 0.0
    first_step_seconds: float | None = None
    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    skipped: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds and self.tokens else None

    @classmethod
    def from_dict(cls, report: dict[str, Any]) -> "StageReport":
        known = {f.name for f in dataclasses.fields(cls)} - {"details"}
        details = {**report.get("details", {}), **{k: v for k, v in report.items() if k not in known and k != "details"}}
        return cls(**{k: v for k, v in report.items() if k in known}, details=details)


@dataclass
class RunRecord:
    """What one recipe run did. `converted` is the model straight after conversion (every layer converted when
    the kept layers are chosen automatically) and `distilled` the model after the stages; both, and `teacher`,
    are None after `linearize distill`, which does not score."""

    recipe: dict[str, Any]
    output: str = ""
    data: str = ""
    seconds: float = 0.0
    stages: list[StageReport] = field(default_factory=list)
    selection: dict[str, Any] | None = None
    teacher: Scores | None = None
    converted: Scores | None = None
    distilled: Scores | None = None

    @property
    def tokens(self) -> int | None:
        """Training tokens over every stage (None when no stage ran)."""
        return sum(stage.tokens for stage in self.stages) if self.stages else None

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / RESULTS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        def scores(value: Any) -> Scores | None:
            return Scores(**value) if isinstance(value, dict) else None

        return cls(
            recipe=data["recipe"],
            output=data.get("output", ""),
            data=data.get("data", ""),
            seconds=data.get("seconds", 0.0),
            stages=[StageReport.from_dict(stage) for stage in data["stages"]],
            selection=data.get("selection"),
            teacher=scores(data.get("teacher")),
            converted=scores(data.get("converted")),
            distilled=scores(data.get("distilled")),
        )

    @classmethod
    def read(cls, path: str | Path) -> "RunRecord | None":
        """The run record in `path` (a results.json, or the model folder holding it); None where the file is
        missing or holds something else (another tool's results.json); a newer version is a one-line error."""
        path = Path(path)
        path = path / RESULTS_FILE if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError, OSError):
            return None
        if not isinstance(data, dict) or data.get("format", FORMAT) != FORMAT:
            return None
        if data.get("version", VERSION) != VERSION:
            raise LinearizeError(
                f"{str(path)!r} is a run record of version {data['version']}; this linearize reads version {VERSION}: upgrade linearize"
            )
        stages = data.get("stages")
        if not isinstance(data.get("recipe"), dict) or not isinstance(stages, list) or not all(isinstance(s, dict) and "stage" in s for s in stages):
            return None
        return cls.from_dict(data)
