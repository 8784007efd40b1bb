"""The progress bar long scoring runs share (rich; transient, so finished bars leave the terminal clean)."""

from __future__ import annotations

from rich import get_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(enabled: bool = True) -> Progress:
    """A transient bar; off where output is not a terminal (a log file would get only an empty line from it)."""
    shown = enabled and get_console().is_terminal
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not shown, transient=True)
