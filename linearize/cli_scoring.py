"""The scoring commands of the `linearize` CLI: eval and bench.

They live apart from cli.py (which adds them with `add_commands(app)`) so each stays a thin layer over its
Python API: `linearize.evaluate` (with `EvalSettings`) and `linearize.evaluate.speed.benchmark`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .evaluate.results import RETRIEVAL_KINDS
from .evaluate.settings import EvalSettings
from .hf.errors import LinearizeError

console = Console()

DEFAULTS = EvalSettings()  # `linearize eval` takes its defaults from the Python API

MODELS_HELP = "Converted model folders, or any teacher source (folder, .gguf, alias such as smollm2-135m, Hub id)"


def parse_ints(text: str, what: str) -> list[int]:
    """`256,2K,8k` -> [256, 2048, 8192] (K means 1024)."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = re.fullmatch(r"(\d+)([kK]?)", part)
        if not match:
            raise LinearizeError(f"{what} must be comma-separated whole numbers such as 512,2K,8K; got {part!r}")
        values.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    if not values:
        raise LinearizeError(f"{what} needs at least one value, e.g. 512,2K")
    return values


def _joined(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise LinearizeError(f"{what} must be comma-separated numbers such as 0,0.5,1; got {text!r}") from None


def _show(results, title: str) -> None:
    table = Table(title=title)
    for column in ("model", "measurement", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for r in results.records:
        if r["kind"] == "task" and r.get("primary"):
            table.add_row(r["model"], f"{r['task']} ({r['metric']})", f"{r['value']:.4f}")
        elif r["kind"] == "perplexity":
            table.add_row(r["model"], f"perplexity {r['data']} @ {r['context']}", f"{r['value']:.3f}")
        elif r["kind"] in RETRIEVAL_KINDS:
            table.add_row(r["model"], f"{r['kind']} {r['length']} tokens, depth {r['depth']:g}", f"{r['value']:.2f}")
        elif r["kind"] == "agreement":
            table.add_row(r["model"], f"KL to the teacher / top-1 agreement, {r['data']} @ {r['context']}", f"{r['kl']:.4f} / {r['top1']:.3f}")
        elif r["kind"] == "training":
            first = f" ({r['first_step_seconds']} in the first step)" if r.get("first_step_seconds") is not None else ""
            table.add_row(r["model"], f"stage {r['stage']} ({r['stage_kind']}): tokens, seconds", f"{r['tokens']}, {r['seconds']}{first}")
        elif r["kind"] == "speed" and not r.get("out_of_memory"):
            decode = r["decode_tokens_per_s"]
            largest = f" (largest, {r['limited_by']})" if r.get("largest_batch") else ""
            table.add_row(
                r["model"],
                f"batch {r['batch']}{largest} @ {r['context']}: prefill / {r.get('decode_path', 'eager')} decode tok/s, cache",
                f"{r['prefill_tokens_per_s']:.0f} / {decode:.1f}, {r['cache_bytes'] / 2**20:.1f} MiB" if decode else f"{r['prefill_tokens_per_s']:.0f}",
            )
        elif r["kind"] == "speed":
            table.add_row(r["model"], f"batch {r['batch']} @ {r['context']}", "out of memory")
    console.print(table)


def eval_command(
    models: Annotated[list[str], typer.Argument(help=MODELS_HELP)],
    tasks: Annotated[str | None, typer.Option(help="lm-eval tasks, comma-separated; NAME:METRIC picks the compared metric")] = None,
    suite: Annotated[str | None, typer.Option(help="Named suites, comma-separated (commonsense, local)")] = None,
    limit: Annotated[float | None, typer.Option(help="Examples per task (a count, or a fraction below 1)")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples for every task (default: each task's own)")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size")] = DEFAULTS.batch_size,
    perplexity: Annotated[list[str] | None, typer.Option(help="Text for perplexity: persuasion, a .txt/.jsonl/.csv/.parquet file, a folder, or a Hub dataset id (repeatable)")] = None,
    contexts: Annotated[str, typer.Option(help="Perplexity context lengths, e.g. 512,2K")] = _joined(DEFAULTS.contexts),
    stride: Annotated[int | None, typer.Option(help="Perplexity window stride (default: half the context)")] = None,
    ppl_tokens: Annotated[int, typer.Option(help="Tokens of the text to measure perplexity on")] = DEFAULTS.max_tokens,
    split: Annotated[str, typer.Option(help="Split of a Hub or local dataset")] = DEFAULTS.split,
    dataset_config: Annotated[str | None, typer.Option(help="Config name of a Hub dataset")] = None,
    text_field: Annotated[str, typer.Option(help="Text column of a dataset")] = DEFAULTS.text_field,
    passkey: Annotated[bool, typer.Option(help="Passkey retrieval over --lengths and --depths")] = False,
    needle: Annotated[bool, typer.Option(help="Single needle in a haystack over --lengths and --depths")] = False,
    ruler: Annotated[bool, typer.Option(help="RULER's multi-key needle, key-value retrieval and variable tracking over --lengths and --depths")] = False,
    lengths: Annotated[str, typer.Option(help="Retrieval prompt lengths in tokens, e.g. 256,1K,4K")] = _joined(DEFAULTS.lengths),
    depths: Annotated[str, typer.Option(help="Where the hidden line sits, 0 = start, 1 = end")] = _joined(DEFAULTS.depths),
    trials: Annotated[int, typer.Option(help="Retrieval prompts per (length, depth)")] = DEFAULTS.trials,
    seed: Annotated[int, typer.Option(help="Seed of the retrieval prompts")] = DEFAULTS.seed,
    teacher: Annotated[bool, typer.Option(help="Also score each converted model as its own teacher (teacher_mode)")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16 or auto")] = None,
    allow_longer: Annotated[bool, typer.Option(help="Allow lengths beyond the model's max_position_embeddings")] = False,
    out: Annotated[Path, typer.Option("--out", help="Results file to write (JSON; `linearize report` reads it)")] = Path("eval.json"),
):
    """Score models on lm-eval tasks, perplexity and long-context retrieval, each converted model beside its teacher.

    With no --tasks, --suite, --perplexity, --passkey, --needle or --ruler: the offline default (suite local, perplexity on persuasion).
    """
    from .evaluate.results import Results
    from .evaluate.scoring import evaluate

    settings = EvalSettings(
        tasks=tasks or (), suite=suite or (), limit=limit if limit is None or limit < 1 else int(limit), num_fewshot=num_fewshot,
        batch_size=batch_size, perplexity=perplexity or (), contexts=parse_ints(contexts, "--contexts"), stride=stride,
        max_tokens=ppl_tokens, split=split, dataset_config=dataset_config, text_field=text_field, passkey=passkey, needle=needle, ruler=ruler,
        lengths=parse_ints(lengths, "--lengths"), depths=parse_floats(depths, "--depths"), trials=trials, seed=seed,
        allow_longer=allow_longer,
    )
    merged = Results()
    for model in models:
        console.print(f"[bold]{model}[/bold]")
        merged.extend(evaluate(model, settings=settings, teacher=teacher, dtype=dtype, device=device, log=lambda m: console.print(f"[dim]{m}[/dim]")))
    merged.save(out)
    _show(merged, "evaluation")
    console.print(f"[green]wrote[/green] {out}  (next: linearize report {out} --out report)")


def bench_command(
    models: Annotated[list[str], typer.Argument(help=MODELS_HELP)],
    lengths: Annotated[str, typer.Option(help="Context lengths, e.g. 512,2K,8K")] = "256,512,1024",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,4")] = "1",
    decode_tokens: Annotated[int, typer.Option(help="Tokens decoded one at a time after the prefill")] = 32,
    repeats: Annotated[int, typer.Option(help="Runs per point; the fastest is kept")] = 1,
    teacher: Annotated[bool, typer.Option(help="Also measure each converted model as its own teacher (teacher_mode)")] = True,
    device: Annotated[str, typer.Option(help="cpu (default), cuda or cuda:N")] = "cpu",
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on a CPU)")
    ] = None,
    allow_longer: Annotated[bool, typer.Option(help="Allow lengths beyond the model's max_position_embeddings")] = False,
    max_batch: Annotated[
        int | None,
        typer.Option(help="Also measure, per model and context, the largest batch up to this cap that fits in memory, e.g. 512"),
    ] = None,
    bisect: Annotated[
        bool, typer.Option(help="Narrow --max-batch's search between the last batch that fitted and the first that did not (else: doublings only)")
    ] = True,
    compile: Annotated[
        bool, typer.Option(help="Decode through the fastest path each model supports: CUDA graphs (GraphDecoder) or torch.compile")
    ] = False,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(help="Prefill through the cache this many tokens at a time (as generate's prefill_chunk_size), e.g. 4096: "
                     "the largest batch is then bounded by the cache, not by a whole prompt's activations"),
    ] = None,
    sdpa: Annotated[
        str | None,
        typer.Option(help="SDPA backends by priority for every model, e.g. flash,efficient,math (of flash, efficient, cudnn, "
                     "math; default: torch's own choice)"),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Results file to write (JSON; `linearize report` reads it)")] = Path("bench.json"),
):
    """Prefill and decode speed and memory against context length and batch size, teacher beside student.

    --max-batch adds decode throughput at the largest batch that fits; every row records the decode path that ran
    and the prefill chunk (--prefill-chunk) it prefilled in. The results file is written after each model, so a
    model that fails (or a run cut short) leaves the models before it measured.
    """
    from .evaluate.results import Results
    from .evaluate.speed import benchmark

    merged = Results()
    for model in models:
        console.print(f"[bold]{model}[/bold]")
        merged.extend(
            benchmark(
                model, lengths=parse_ints(lengths, "--lengths"), batch_sizes=parse_ints(batch_sizes, "--batch-sizes"),
                decode_tokens=decode_tokens, repeats=repeats, device=device, dtype=dtype, teacher=teacher, allow_longer=allow_longer,
                max_batch=max_batch, bisect=bisect, compile=compile, prefill_chunk=prefill_chunk,
                sdpa_backends=None if sdpa is None else sdpa.split(","),
            )
        )
        merged.save(out)
    _show(merged, "speed and memory")
    console.print(f"[green]wrote[/green] {out}  (next: linearize report {out} --out report)")


def add_commands(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("bench")(bench_command)
