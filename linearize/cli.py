"""The `linearize` command line: a thin layer over the Python API, one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import cli_publish, cli_scoring
from .hf.errors import LinearizeError
from .record import StageReport

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a pretrained Hugging Face transformer into a linear-time model, then distill it back to quality.",
)
console = Console()
errors = Console(stderr=True)


@contextmanager
def step(message: str):
    """A spinner for anything that takes more than a moment."""
    with console.status(message, spinner="dots"):
        yield


def parse_options(items: list[str] | None) -> dict[str, str]:
    options = {}
    for item in items or []:
        if "=" not in item:
            raise LinearizeError(f"--option {item!r} must look like key=value, e.g. --option window=64")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    return options


def parse_hybrid(items: list[str] | None) -> dict[str, str]:
    hybrid = {}
    for item in items or []:
        if "=" not in item:
            raise LinearizeError(f"--hybrid {item!r} must look like mixer=layers, e.g. --hybrid swa=every:4")
        name, selection = item.split("=", 1)
        hybrid[name.strip()] = selection.strip()
    return hybrid


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="Hub id, local HF folder, .gguf file, or an alias such as smollm2-135m")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the converted model to")],
    mixer: Annotated[str, typer.Option(help="Mixer for converted layers (see `linearize mixers`)")] = "hedgehog_swa",
    keep_attention: Annotated[str, typer.Option(help="Layers that keep softmax attention: 0,7 or every:4, first:2, spread:0.25")] = "",
    keep_as: Annotated[str, typer.Option(help="Mixer of the kept softmax layers: attention (the teacher's; exports to bamba) or qwen3_5_attention (exports to qwen3_5)")] = "attention",
    layers: Annotated[str | None, typer.Option(help="Convert only these layers (same syntax); the rest keep attention")] = None,
    hybrid: Annotated[list[str] | None, typer.Option(help="Other mixers on some layers: mixer=layers (repeatable)")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Mixer option key=value (repeatable)")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16 or auto")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder")] = False,
):
    """Convert a teacher's attention layers and save the result as a Hugging Face model folder."""
    from . import convert as convert_model
    from .loaders import load_teacher
    from .hf.mixers import get_mixer
    from .outputs import atomic_folder, check_output

    check_output(out, overwrite)
    options, hybrid_map = parse_options(option), parse_hybrid(hybrid)
    for name in (mixer, keep_as, *hybrid_map):  # names fail before a possibly long load; the rest of the plan after it
        get_mixer(name)
    with step(f"loading {source}"):
        teacher, tokenizer = load_teacher(source, dtype=dtype)
    with step(f"converting to {mixer}"):
        student = convert_model(
            teacher, mixer, keep_attention=keep_attention or (), layers=layers, hybrid=hybrid_map, source=source, keep_as=keep_as, **options
        )
    with step(f"saving to {out}"), atomic_folder(out, overwrite) as staging:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    console.print(f"[green]saved[/green] {out}  ({', '.join(sorted(set(student.config.mixer_names())))})")
    _print_layers(student)


@app.command("set-options")
def set_options_command(
    model: Annotated[str, typer.Argument(help="A converted (or distilled) model folder")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model with the new options to")],
    option: Annotated[list[str] | None, typer.Option(help="Option key=value that adds no parameter, e.g. keep=128 (repeatable)")] = None,
    layers: Annotated[str | None, typer.Option(help="Only these converted layers: indices like 6,7,14 or 10-20, or a pattern such as last:8 (default: every one that takes the options)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder")] = False,
):
    """Change options that add no parameter (hedgehog_swa's keep and keep_block) on a converted or distilled model, on
    every converted layer or on --layers alone, and save it, with its tokenizer, as a new folder."""
    from .hf.modeling_linearized import LinearizedForCausalLM
    from .loaders import load_teacher
    from .outputs import atomic_folder, check_output
    from .surgery import set_options

    check_output(out, overwrite)
    options = parse_options(option)
    with step(f"loading {model}"):
        student, tokenizer = load_teacher(model, dtype="auto")
    if not isinstance(student, LinearizedForCausalLM):
        raise LinearizeError(f"{model!r} is not a converted model; convert it first with `linearize convert {model} --out DIR`")
    layers = set_options(student, layers, **options)
    with step(f"saving to {out}"), atomic_folder(out, overwrite) as staging:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    console.print(f"[green]saved[/green] {out}  ({', '.join(f'{k}={v}' for k, v in options.items())} on {len(layers)} layers)")
    _print_layers(student)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _print_layers(model_or_folder) -> None:
    from .inspect import describe

    infos = describe(model_or_folder)
    table = Table(title="layers")
    # Layer numbers and mixer names never wrap or shorten; the rest folds to fit the terminal's width.
    widest = max(len(f"{infos[0].index}-{infos[-1].index}"), len("layers"))
    table.add_column("layers", no_wrap=True, min_width=widest)
    table.add_column("mixer", no_wrap=True, min_width=max(len(i.mixer) for i in infos))
    for column in ("options", "params added", "state (fixed)", "state per token", "grows with context", "on CUDA"):
        table.add_column(column, overflow="fold")
    rows: list[tuple[int, int, tuple[str, ...]]] = []  # identical consecutive layers share one row
    for info in infos:
        cells = (
            info.mixer,
            ", ".join(f"{k}={v}" for k, v in info.options.items()),
            _human(info.new_parameters),
            _bytes(info.state_bytes),
            _bytes(info.state_bytes_per_token),
            "yes" if info.grows_with_context else "no",
            info.cuda_path,
        )
        if rows and rows[-1][2] == cells:
            rows[-1] = (rows[-1][0], info.index, cells)
        else:
            rows.append((info.index, info.index, cells))
    for first, last, cells in rows:
        table.add_row(str(first) if first == last else f"{first}-{last}", *cells)
    console.print(table)
    added = sum(i.new_parameters for i in infos)
    per_token = sum(i.state_bytes_per_token for i in infos)
    fixed = sum(i.state_bytes for i in infos)
    console.print(f"parameters added: {_human(added)}; state per sequence: {_bytes(fixed)} + {_bytes(per_token)} per token of context")


@app.command()
def info(folder: Annotated[Path, typer.Argument(help="A converted model folder")]):
    """Show a converted model's plan: per layer the mixer, parameters added and state memory."""
    from .inspect import read_config

    config = read_config(folder)
    console.print(f"[bold]{folder}[/bold]: {config.text_config.model_type} teacher ({config.source or 'unknown source'}), {len(config.layers)} layers")
    _print_layers(folder)


@app.command()
def mixers():
    """List the registered mixers with their cost per layer (on SmolLM2-135M's attention shape)."""
    from .inspect import REFERENCE_SHAPE, catalogue

    shape = REFERENCE_SHAPE
    table = Table(title=f"mixers (costs per layer for {shape['num_attention_heads']} query / {shape['num_key_value_heads']} KV heads of {shape['head_dim']}, fp32)")
    for column in ("mixer", "follows", "new params", "state/token", "fixed state", "what it is"):
        table.add_column(column)
    for entry in catalogue():
        defaults = ", ".join(f"{k}={v}" for k, v in entry.options.items())
        table.add_row(
            entry.name,
            entry.anchor,
            _human(entry.cost.new_parameters),
            _bytes(entry.cost.state_per_token * 4),
            _bytes(entry.cost.state_fixed * 4),
            entry.summary + (f" [dim]({defaults})[/dim]" if defaults else ""),
        )
    console.print(table)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def run(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="A shipped recipe name (see `linearize recipes`) or a .yaml path")] = "quickstart",
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: the recipe's `output`)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder (and the checkpoints of an unfinished run)")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint")] = False,
):
    """Convert, distill, save and score a teacher as one recipe says. Extra key=value arguments override the recipe."""
    from .config import load_recipe
    from .pipeline import run as run_recipe

    loaded = load_recipe(recipe, ctx.args)
    result = run_recipe(loaded, out=out, overwrite=overwrite, resume=resume, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    _print_stages(result.stages, result.selection)
    table = Table(title=f"{loaded.teacher} -> {loaded.convert.mixer}")
    table.add_column("model")
    table.add_column("held-out perplexity", justify="right")
    table.add_column(f"greedy continuation of {loaded.eval.prompt!r}")
    rows = [("teacher", result.teacher), ("converted", result.converted)]
    if result.distilled is not None:
        rows.append(("distilled", result.distilled))
    for name, scores in rows:
        table.add_row(name, f"{scores.perplexity:.2f}", scores.generation.strip().replace("\n", " "))
    console.print(table)
    console.print(f"saved {result.output} in {result.seconds:.0f} s")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def distill(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="A shipped recipe name (see `linearize recipes`) or a .yaml path")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: the recipe's `output`)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder (and the checkpoints of an unfinished run)")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint")] = False,
):
    """Convert and distill as a recipe says, then save (no scoring). Extra key=value arguments override the recipe;
    `teacher=FOLDER` may name an already converted model, which is distilled as it is."""
    from .config import load_recipe
    from .pipeline import train

    loaded = load_recipe(recipe, ctx.args)
    result = train(loaded, out=out, overwrite=overwrite, resume=resume, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    _print_stages(result.stages, result.selection)
    console.print(f"saved {result.output} in {result.seconds:.0f} s")


def _print_stages(stages: list[StageReport], selection: dict | None) -> None:
    if selection:
        console.print(f"softmax attention kept in layers {selection['kept_attention']} ({selection['method']})")
    if not stages:
        return
    table = Table(title="distillation")
    for column in ("stage", "steps", "tokens", "seconds", "first loss", "last loss"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for report in stages:
        first, last = report.first or {}, report.last or {}
        table.add_row(
            f"{report.stage}: {report.kind}",
            str(report.steps),
            _human(report.tokens),
            f"{report.seconds:.0f}",
            f"{first['loss']:.4g}" if "loss" in first else report.skipped or "-",
            f"{last['loss']:.4g}" if "loss" in last else "-",
        )
    console.print(table)
    firsts = [f"stage {r.stage} {r.first_step_seconds:.1f} s" for r in stages if r.first_step_seconds is not None]
    if firsts:
        console.print(f"of which the first step (compilation and set-up): {', '.join(firsts)}")


@app.command()
def export(
    folder: Annotated[Path, typer.Argument(help="A converted model folder (from `linearize run`, `distill` or `convert`)")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the native model to")],
    to: Annotated[str, typer.Option("--to", help="Native architecture to export to: qwen3_5 or bamba")] = "qwen3_5",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder")] = False,
):
    """Write a converted model as a native transformers architecture that loads without remote code and that
    serving engines run; its logits are checked against the converted model's before anything is written."""
    from .export import export as export_model, get_target

    target = get_target(to)
    with step(f"exporting {folder} to {target.architecture}"):
        export_model(folder, out, target.name, overwrite=overwrite, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    console.print(f"[green]saved[/green] {out} ({target.architecture}, loads with AutoModelForCausalLM.from_pretrained, no remote code)")
    for engine, versions, command in target.engines:
        console.print(f"  {engine} {versions}: {command.replace('PATH', str(out))}")


@app.command()
def recipes():
    """List the shipped recipes."""
    from .config import recipe_summary, shipped_recipes

    table = Table(title="shipped recipes")
    table.add_column("recipe (linearize run NAME)", style="bold", no_wrap=True)
    table.add_column("what it does")
    for name in shipped_recipes():
        table.add_row(name, recipe_summary(name))
    console.print(table)


cli_scoring.add_commands(app)
cli_publish.add_commands(app)


def main() -> None:
    """Entry point of the `linearize` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except LinearizeError as error:
        errors.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
