"""Batch-1 decode (or prefill) of the teacher and the students of shipped recipes, timed in turns, block by block:
their ratio with its spread.

`cpu_decode.py` decodes one model for 64 steps after its prefill, then the next: on a shared 2-core machine whose
speed drifts by 10-20% over a minute, a round's ratio moved from 0.83 to 0.98 between rounds. Here every model
prefills `--context` random tokens once, then decodes `--steps` tokens in turn with the others, block after block,
the order rotated each block, so each block's ratio (the teacher's ms a step over the student's) compares models
under the same machine speed. Reported: the mean of those ratios and its standard error, and each model's median ms
a step. The teacher is the original model as transformers runs it (its own cache, which concatenates every key at
every step); its cache is cut back to the context after each block, so every block decodes at that context.
Students are converted as `cpu_decode.py` converts them (untrained: speed does not depend on the weights).

    python benchmarks/decode_paired.py --recipes lolcats,hybrid_long --blocks 30
    python benchmarks/decode_paired.py --recipes lolcats --blocks 20 --threads 1 --out /tmp/paired.json
    python benchmarks/decode_paired.py --recipes lolcats_keep,lolcats_keep:keep=512 --blocks 32
    python benchmarks/decode_paired.py --recipes lolcats_keep:keep=139:keep=1536@6-7+14+17-18+20-21+23 --blocks 24
    python benchmarks/decode_paired.py --recipes lolcats,lolcats_linear --blocks 30 --pytorch-path

`--prefill` times prefills of the context instead, a fresh cache each, `--steps` of them a block:

    python benchmarks/decode_paired.py --recipes lolcats,liger --blocks 8 --steps 1 --prefill

`--pytorch-path` decodes a second copy of each student beside it, named RECIPE@pytorch, with LINEARIZE_FUSED_STEP=off
during its blocks: the PyTorch decode path where the student takes a CPU step (`linearize.hf.cpu_step`), in the same
turns.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from cpu_decode import recipe_student  # benchmarks/, first on the path when run as a script
from linearize import load_teacher, set_options
from linearize.cli import parse_options
from linearize.hf.cache import cache_keyword, returned_cache


class Decoding:
    """One model's decode from its own prefilled cache; `block` times `steps` steps, returning ms a step."""

    def __init__(self, model, ids: torch.Tensor):
        self.model, self.keyword, self.context = model, cache_keyword(model), ids.shape[1]
        out = model(ids, use_cache=True, logits_to_keep=1)
        self.cache, self.token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        self.block(1)  # a first step allocates what later steps reuse

    def block(self, steps: int) -> float:
        for layer in self.cache.layers:  # a softmax layer's keys back to the context (a view: no copy)
            if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > self.context:
                layer.keys, layer.values = layer.keys[..., : self.context, :], layer.values[..., : self.context, :]
        begin = time.perf_counter()
        for _ in range(steps):
            out = self.model(self.token, **{self.keyword: self.cache}, use_cache=True)
            self.cache, self.token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - begin) / steps * 1000


class Prefilling:
    """One model's prefill of `ids` with a fresh cache; `block` times `prefills` of them, returning ms a prefill."""

    def __init__(self, model, ids: torch.Tensor):
        self.model, self.ids = model, ids
        self.block(1)  # a first prefill allocates what later ones reuse

    def block(self, prefills: int) -> float:
        begin = time.perf_counter()
        for _ in range(prefills):
            self.model(self.ids, use_cache=True, logits_to_keep=1)
        return (time.perf_counter() - begin) / prefills * 1000


def in_turns(models: dict, ids: torch.Tensor, blocks: int, steps: int, before=lambda name: None, kind=Decoding) -> dict[str, list[float]]:
    """Each model's ms a step in every block: each prefills `ids`, then decodes `steps` steps a block in turn with the
    others, the order rotated each block; with `kind=Prefilling`, ms a prefill of `ids`, `steps` prefills a block.
    `before(name)` runs before each prefill and block of that model (a probe swaps an implementation there)."""
    with torch.no_grad():
        runs = {}
        for name, model in models.items():
            before(name)
            runs[name] = kind(model.eval(), ids)
        names, times = list(runs), {name: [] for name in runs}
        for block in range(blocks):
            for name in names[block % len(names):] + names[: block % len(names)]:
                before(name)
                times[name].append(runs[name].block(steps))
    return times


PYTORCH_PATH = "@pytorch"


def switch_path(name: str) -> None:
    """Before a block of model `name`: LINEARIZE_FUSED_STEP=off for a student named RECIPE@pytorch, unset for the others."""
    if name.endswith(PYTORCH_PATH):
        os.environ["LINEARIZE_FUSED_STEP"] = "off"
    else:
        os.environ.pop("LINEARIZE_FUSED_STEP", None)


def paired(times: dict[str, list[float]], teacher: str = "teacher") -> dict[str, dict[str, float]]:
    """Per model: the median ms a step, and the mean and standard error of its blocks' teacher-over-model ratios."""
    rows = {}
    for name, ms in times.items():
        ratios = [t / m for t, m in zip(times[teacher], ms)]
        error = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
        rows[name] = {"median_ms": statistics.median(ms), "ratio_mean": statistics.mean(ratios), "ratio_error": error}
    return rows


def report(rows: dict[str, dict[str, float]], unit: str = "step") -> None:
    for name, row in rows.items():
        print(f"{name}: {row['median_ms']:.2f} ms a {unit} (median); teacher / it {row['ratio_mean']:.3f} +- {row['ratio_error']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="lolcats", help="shipped recipes whose students are measured, comma-separated; "
                        "RECIPE:key=value:... sets runtime options on its student (`linearize.set_options`), e.g. lolcats_keep:keep=512, "
                        "and key=value@LAYERS on those layers after (a selection joined with +, e.g. keep=1536@6-7+14)")
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens before the decode")
    parser.add_argument("--blocks", type=int, default=30, help="blocks of steps each model decodes, in turns")
    parser.add_argument("--steps", type=int, default=8, help="decode steps a block (prefills a block with --prefill)")
    parser.add_argument("--prefill", action="store_true", help="time prefills of the --context tokens (a fresh cache each) "
                        "instead of decode steps")
    parser.add_argument("--threads", type=int, default=0, help="torch's intra-op threads (0: torch's default, the cores)")
    parser.add_argument("--pytorch-path", action="store_true", help="also decode each student on the PyTorch path "
                        "(LINEARIZE_FUSED_STEP=off), as RECIPE@pytorch, in the same turns")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.blocks < 2 or args.steps < 1 or args.context < 1 or args.threads < 0:
        parser.error("--blocks must be at least 2 (a spread needs two), --steps and --context at least 1, --threads 0 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1000, (1, args.context), generator=torch.Generator().manual_seed(0))
    models = {"teacher": load_teacher("smollm2-135m")[0]}
    for spec in args.recipes.split(","):
        recipe, *options = spec.split(":")
        models[spec] = recipe_student(load_teacher("smollm2-135m")[0], recipe)
        everywhere = [option for option in options if "@" not in option]
        if everywhere:
            set_options(models[spec], **parse_options(everywhere))
        for setting, layers in (option.split("@", 1) for option in options if "@" in option):
            set_options(models[spec], layers=layers, **parse_options([setting]))
    if args.pytorch_path:
        models.update({f"{spec}{PYTORCH_PATH}": copy.deepcopy(models[spec]) for spec in list(models) if spec != "teacher"})
    times = in_turns(models, ids, args.blocks, args.steps, before=switch_path if args.pytorch_path else lambda name: None,
                     kind=Prefilling if args.prefill else Decoding)
    rows = paired(times)
    report(rows, "prefill" if args.prefill else "step")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        args.out.write_text(json.dumps({"settings": settings, "threads": torch.get_num_threads(), "models": rows, "block_ms": times}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
