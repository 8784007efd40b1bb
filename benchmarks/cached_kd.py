"""KD that does not pay twice: the lora_kd stage with the teacher run at every step (full logits) against the same
stage with the teacher's top-k logits cached in the first epoch and read back in the later ones
(`teacher_top_k: K`), on the same token budget, from the same converted start.

The training text is cut to its first `--windows` windows, so that a budget of `--epochs` passes reads every window
`--epochs` times, each pass in the seeded shuffled order of any run. Each variant is a recipe run
(`linearize.run.Run`: the quickstart recipe with one lora_kd stage, overridden as `recipe_for` says) on a copy of
the converted model (after `--transfer-tokens` of attention transfer, if any). Without `--teacher` the teacher is a
small random Llama with a tokenizer trained on the packaged novel (benchmarks/multi_gpu.py builds it: its figures
check the script, not the method). Reported per variant: the stage's wall and CPU time, its median step time with
the teacher run and with every window read from the cache, the teacher's windows, the cache's bytes on disk, and
the held-out perplexity of the distilled model, also as a ratio to the teacher's (scored as `teacher_mode` of the
same model). On a shared machine the CPU time of one thread (`--threads 1`) is what measures the work.

    python benchmarks/cached_kd.py --seq-len 128 --windows 4 --top-k 16,64 --threads 1 --out /tmp/cached_kd.json  # CPU, 10 s
    python benchmarks/cached_kd.py --teacher smollm2-135m --train ../shared/data/austen/prideprejudice.txt \
        --windows 4 --epochs 3 --batch-size 1 --transfer-tokens 4096 --gradient-checkpointing --threads 1 \
        --top-k 16,64 --out /tmp/cached_kd_smollm2.json                                                # CPU, 11 min
    python benchmarks/cached_kd.py --teacher smollm2-135m --train corpus/train --windows 4096 --epochs 3 \
        --batch-size 32 --top-k 16,64,256 --eval-tokens 65536 --out results/cached_kd.json             # one GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from linearize.config import load_recipe
from linearize.distillation.data import PackedWindows, load_data
from linearize.evaluate.perplexity import perplexity
from linearize.hf.mixers import teacher_mode
from linearize.loaders import load_teacher
from linearize.run import Run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu import build_teacher  # noqa: E402


def recipe_for(args: argparse.Namespace, teacher: str, stages: str, extra: list[str] = ()):
    overrides = [
        f"teacher={teacher}",
        f"data.train={args.train}",
        f"data.heldout={args.heldout}",
        "data.streaming=false",
        f"data.seq_len={args.seq_len}",
        f"convert.mixer={args.mixer}",
        f"eval.seq_len={args.seq_len}",
        stages,
    ]
    return load_recipe("quickstart", overrides + list(extra))


def kd_stage(args: argparse.Namespace) -> str:
    tokens = args.windows * args.epochs * args.seq_len
    return (
        f"stages=[{{kind: lora_kd, tokens: {tokens}, batch_size: {args.batch_size}, lr: {args.lr}, warmup_steps: 0, log_every: 1,"
        f" checkpoint_every: 0, gradient_checkpointing: {str(args.gradient_checkpointing).lower()}}}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="", help="what load_teacher takes (smollm2-135m, a .gguf, a folder, a Hub id); empty: a small random Llama")
    parser.add_argument("--train", default="prideprejudice", help="data.train: a packaged text, a file or a folder")
    parser.add_argument("--heldout", default="persuasion", help="data.heldout: scored after each variant")
    parser.add_argument("--mixer", default="hedgehog_swa")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="training windows kept (the first ones of --train)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over them: the budget is windows x epochs x seq-len tokens")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--top-k", default="64", help="comma-separated K of the cached variants")
    parser.add_argument("--transfer-tokens", type=int, default=0, help="attention transfer before the KD stages (0: start from the plain conversion)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 keeps the CPU time a measure of the work on a shared machine")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("runs/cached_kd.json"))
    args = parser.parse_args()
    ks = [int(k) for k in args.top_k.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        teacher_source = args.teacher
        if not teacher_source:
            teacher_source = str(Path(scratch) / "teacher")
            build_teacher(Path(teacher_source))
        teacher, tokenizer = load_teacher(teacher_source)
        transfer = f"stages=[{{kind: attention_transfer, tokens: {args.transfer_tokens}, batch_size: 1, log_every: 1, checkpoint_every: 0}}]"
        recipe = recipe_for(args, teacher_source, transfer if args.transfer_tokens else kd_stage(args))
        data = load_data(recipe.data, tokenizer, seed=recipe.seed)
        train = PackedWindows(data.train.windows[: args.windows], recipe.seed)
        data = dataclasses.replace(data, train=train, description=f"the first {len(train)} windows of {args.train}")
        heldout = data.heldout_windows(args.seq_len, args.eval_tokens)
        if args.transfer_tokens:
            start = Run(recipe, progress=False).setup(teacher, tokenizer, data).train()
        else:
            start = Run(recipe, progress=False).setup(teacher, tokenizer, data).model  # converted, not trained
        with teacher_mode(start):
            teacher_ppl = perplexity(start, heldout)
        results = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "date": time.strftime("%Y-%m-%d"),
            "settings": vars(args) | {"out": str(args.out), "teacher": args.teacher or "random llama (benchmarks/multi_gpu.py)"},
            "teacher_perplexity": teacher_ppl,
            "converted_perplexity": perplexity(start, heldout),
            "heldout_tokens": int(heldout.numel()),
            "variants": [],
        }
        for k in [0, *ks]:
            recipe = recipe_for(args, teacher_source, kd_stage(args), [f"stages.0.teacher_top_k={k}"])
            run = Run(recipe, progress=False).setup(copy.deepcopy(start), tokenizer, data)
            clock, cpu_clock = time.perf_counter(), time.process_time()
            model = run.train()
            seconds, cpu_seconds = time.perf_counter() - clock, time.process_time() - cpu_clock
            report, steps = run.session.reports[-1], [r for r in run.session.records if "step" in r]
            windows_per_step = args.batch_size * run.accelerator.num_processes
            step_seconds = {  # per step, by whether the teacher ran in it (cached 0) or not (cached 1)
                ran: [windows_per_step * args.seq_len / r["tokens_per_s"] for r in steps if r.get("cached", 0.0) == (0.0 if ran else 1.0)] for ran in (True, False)
            }
            ppl = perplexity(model, heldout)
            results["variants"].append({
                "variant": f"top-{k} cached" if k else "full logits",
                "top_k": k,
                "seconds": round(seconds, 1),
                "cpu_seconds": round(cpu_seconds, 1),
                "median_step_s_teacher_ran": round(statistics.median(step_seconds[True]), 2) if step_seconds[True] else None,
                "median_step_s_all_cached": round(statistics.median(step_seconds[False]), 2) if step_seconds[False] else None,
                "steps": report["steps"],
                "tokens": report["tokens"],
                "teacher_windows": round(sum((1 - r.get("cached", 0.0)) * windows_per_step for r in steps)),
                "cache_bytes": report.get("teacher_logits", {}).get("bytes", 0),
                "kl_last": steps[-1]["kl"],
                "perplexity": ppl,
                "ratio_to_teacher": ppl / teacher_ppl,
            })
            print(json.dumps(results["variants"][-1]), flush=True)
    results["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))

    print(f"\nheld-out perplexity on {results['heldout_tokens']} tokens of {args.heldout}: teacher {teacher_ppl:.2f}, converted {results['converted_perplexity']:.2f}")
    print(f"{'variant':<16} {'wall s':>7} {'CPU s':>7} {'step s (teacher / cached)':>26} {'teacher windows':>16} {'cache MB':>9} {'perplexity':>11} {'/ teacher':>10}")
    for row in results["variants"]:
        step = " / ".join("-" if row[key] is None else f"{row[key]:.2f}" for key in ("median_step_s_teacher_ran", "median_step_s_all_cached"))
        print(
            f"{row['variant']:<16} {row['seconds']:>7.1f} {row['cpu_seconds']:>7.1f} {step:>26} {row['teacher_windows']:>16} "
            f"{row['cache_bytes'] / 2**20:>9.2f} {row['perplexity']:>11.2f} {row['ratio_to_teacher']:>10.3f}"
        )
    print(f"\nwrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
