"""The publishing commands of the `linearize` CLI: report and push, thin layers over `linearize.report.write_report`
and `linearize.push` (cli.py adds them with `add_commands(app)`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def report_command(
    results: Annotated[list[Path], typer.Argument(help="Results files (or folders of them) from `linearize eval` / `linearize bench`")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, report.json and the figures")],
):
    """Write report.md with figures (PNG) and report.json from results files."""
    from .report import write_report

    report = write_report(results, out)
    console.print(f"[green]wrote[/green] {report} and its figures in {out}")


def push_command(
    folder: Annotated[Path, typer.Argument(help="A converted or exported (`linearize export`) model folder")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="ORG/NAME on the Hugging Face Hub")],
    private: Annotated[bool, typer.Option(help="Create the repo private")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to (created if needed)")] = None,
    report: Annotated[Path | None, typer.Option(help="Report folder to include (default: FOLDER/report when present)")] = None,
    message: Annotated[str, typer.Option(help="Commit message")] = "Upload linearized model",
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="A file of the folder that looks like a secret and stays behind (repeatable)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded; touch no network")] = False,
):
    """Upload a converted model with its modeling code, tokenizer, report and a model card to the Hub (only the
    files a model repo needs; the rest of the folder stays behind and is listed)."""
    from .publish import push

    settings = dict(private=private, revision=revision, report=report, commit_message=message, ignore=ignore or (), dry_run=dry_run)
    if dry_run:
        push(folder, repo_id, log=console.print, **settings)
        return
    with console.status(f"pushing {folder} to {repo_id}"):
        url = push(folder, repo_id, log=console.print, **settings)
    console.print(f"[green]pushed[/green] {url}")


def add_commands(app: typer.Typer) -> None:
    app.command("report")(report_command)
    app.command("push")(push_command)
