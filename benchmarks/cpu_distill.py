"""Distillation on CPU with small budgets: held-out perplexity of SmolLM2-135M-Instruct (the teacher), of its
`lolcats` and `liger` conversions before distillation, and after each of their stages; plus the per-layer
attention-transfer errors (normalised by the teacher output's mean square) at the first and the last logged step.

The recipes run as shipped except for what a CPU needs: the packaged novels as data (train on Pride and
Prejudice, score on Persuasion), 512-token windows, budgets of thousands rather than millions of tokens, one
window per step, and no checkpoints. The teacher is scored once, through teacher_mode on the first conversion.

Run (about 10 minutes on 2 idle cores; writes a JSON and prints a table):

    python benchmarks/cpu_distill.py --out runs/cpu_distill.json

Ablations: `--variants` runs each recipe once per LABEL=OVERRIDE[+OVERRIDE...] (recipe keys, as on the command
line), and `--transfer-only` stops after the attention-transfer stages, e.g. window and feature-map width:

    python benchmarks/cpu_distill.py --recipes lolcats --transfer-only --transfer-tokens 16384 \
        --variants "w64=convert.options.window=64,w32=convert.options.window=32,w128=convert.options.window=128" \
        --out runs/cpu_ablation.json

Training windows against a longer scoring window (does training at 2,048 tokens carry context there?):

    python benchmarks/cpu_distill.py --recipes lolcats --transfer-only --transfer-tokens 32768 --eval-seq-len 2048 \
        --eval-tokens 8192 --variants "t512=data.seq_len=512,t2048=data.seq_len=2048" --out runs/cpu_train_length.json

Validate the script quickly with a much smaller budget:

    python benchmarks/cpu_distill.py --transfer-tokens 1024 --lora-tokens 512 --eval-tokens 1024 --seq-len 256 --out /tmp/cpu_distill_small.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from linearize.config import load_recipe
from linearize.distillation.data import load_data
from linearize.evaluate.perplexity import perplexity
from linearize.hf.mixers import teacher_mode
from linearize.loaders import load_teacher
from linearize.record import StageReport
from linearize.run import Run

RECIPES = ("lolcats", "liger")


def cpu_recipe(name: str, args: argparse.Namespace, extra: list[str] = ()):
    overrides = [
        "data.train=prideprejudice",
        "data.heldout=persuasion",
        "data.streaming=false",
        f"data.seq_len={args.seq_len}",
    ]
    recipe = load_recipe(name, list(extra))
    for index, stage in enumerate(recipe.stages):
        tokens = args.transfer_tokens if stage.kind == "attention_transfer" else args.lora_tokens
        overrides += [
            f"stages.{index}.tokens={tokens}",
            f"stages.{index}.batch_size=1",
            f"stages.{index}.warmup_steps=0",
            f"stages.{index}.log_every=1",
        ]
        if stage.kind == "lora_kd":
            overrides.append(f"stages.{index}.lr={args.lora_lr}")
    return load_recipe(name, overrides + list(extra))  # a variant's overrides win over the CPU settings


def stage_entry(report: StageReport, model, windows) -> dict:
    """One stage's tokens, time and the perplexity after it, with its first and last per-layer errors or KL."""
    entry = {"kind": report.kind, "tokens": report.tokens, "seconds": report.seconds, "perplexity": perplexity(model, windows)}
    if report.kind == "attention_transfer" and report.first:
        entry["layers"] = report.details["layers"]
        entry["layer_normalized_first"] = report.first["layer_normalized"]
        entry["layer_normalized_last"] = report.last["layer_normalized"]
        entry["layer_mse_first"] = report.first["layer_mse"]
        entry["layer_mse_last"] = report.last["layer_mse"]
    if report.kind == "lora_kd" and report.first:
        entry["kl_first"], entry["kl_last"] = report.first["kl"], report.last["kl"]
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfer-tokens", type=int, default=8192, help="attention-transfer budget (lolcats)")
    parser.add_argument("--lora-tokens", type=int, default=4096, help="LoRA KD budget (both recipes)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate (short budgets want more than the GPU recipes' 3e-4)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out Persuasion tokens scored after each step")
    parser.add_argument("--seq-len", type=int, default=512, help="training window (a variant's data.seq_len wins)")
    parser.add_argument("--eval-seq-len", type=int, default=0, help="scoring window (0: --seq-len)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--variants", default="", help="LABEL=OVERRIDE[+OVERRIDE...], comma-separated; each recipe runs once per variant")
    parser.add_argument("--transfer-only", action="store_true", help="run only the attention-transfer stages")
    parser.add_argument("--out", type=Path, default=Path("runs/cpu_distill.json"))
    args = parser.parse_args()
    variants = {"": []}
    if args.variants:
        variants = {label: overrides.split("+") for label, overrides in (v.split("=", 1) for v in args.variants.split(","))}

    started = time.time()
    teacher, tokenizer = load_teacher("smollm2-135m")
    results = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": time.strftime("%Y-%m-%d"),
        "settings": vars(args) | {"out": str(args.out)},
        "recipes": {},
    }
    windows = None
    for name, label in [(n, v) for n in args.recipes.split(",") for v in variants]:
        recipe = cpu_recipe(name, args, variants[label])
        if args.transfer_only:
            recipe = dataclasses.replace(recipe, stages=[s for s in recipe.stages if s.kind == "attention_transfer"])
        data = load_data(recipe.data, tokenizer, seed=recipe.seed)
        windows = data.heldout_windows(args.eval_seq_len or args.seq_len, args.eval_tokens)
        run = Run(recipe, log=print).setup(copy.deepcopy(teacher), tokenizer, data)
        if "teacher" not in results:
            with teacher_mode(run.model):
                results["teacher"] = {"perplexity": perplexity(run.model, windows)}
        row = {"mixer": recipe.convert.mixer, "options": recipe.convert.options, "converted": perplexity(run.model, windows), "stages": []}
        run.train(on_stage=lambda report, model: row["stages"].append(stage_entry(report, model, windows)))
        for entry in row["stages"]:
            print(f"{name} {label} after {entry['kind']}: perplexity {entry['perplexity']:.2f}")
        if getattr(run.model.config, "selection", None):
            row["kept_attention"] = run.model.config.selection["kept_attention"]
        row["overrides"] = variants[label]
        results["recipes"][f"{name}:{label}" if label else name] = row
    results["heldout_tokens"] = int(windows.numel())
    results["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))

    print(f"\nheld-out perplexity on {results['heldout_tokens']} Persuasion tokens (teacher {results['teacher']['perplexity']:.2f})")
    print(f"{'recipe':<16} {'mixer':<14} {'converted':>10}  after each stage")
    for name, row in results["recipes"].items():
        steps = "  ".join(f"{s['kind']} ({s['tokens']} tok, {s['seconds']:.0f} s): {s['perplexity']:.2f}" for s in row["stages"])
        print(f"{name:<16} {row['mixer']:<14} {row['converted']:>10.2f}  {steps}")
    for name, row in results["recipes"].items():
        for stage in row["stages"]:
            if "layers" in stage:
                print(f"\n{name} attention transfer, per layer: normalised error first -> last logged step")
                for layer, first, last in zip(stage["layers"], stage["layer_normalized_first"], stage["layer_normalized_last"]):
                    print(f"  layer {layer:>2}: {first:8.4f} -> {last:8.4f}")
    print(f"\nwrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
