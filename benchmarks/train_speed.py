"""Distillation throughput and model FLOPs utilisation of both stages, on a random teacher of a real shape.

Builds the `--arch` shape (from speed.py's table) with random weights and a tokenizer trained on the packaged
text (no downloads; the shape, not the vocabulary, sets the cost, so the vocabulary is padded to the real
one), converts it to `--mixer` (keeping softmax attention where `--keep-attention` says), and runs
`linearize distill` for a fixed number of steps of each stage, bf16 autocast, once for every batch size and
compile setting in `--runs` (in that order), all in one run so the rows compare side by side.
MFU counts 2N FLOPs per token for every forward and 2N for the backward through activations (frozen weights
need no weight gradients): attention transfer = one forward (teacher attention included) + backward through
the converted layers only, taken as 2N + 2N; LoRA KD = teacher forward + student forward + backward = 6N.
Peak: `--peak-tflops` (default 989, the H100's dense bf16 datasheet figure). `--profile N` records N steps of each
stage under torch.profiler (the stages' `profile_steps`): where a step's time goes, by phase and by kind of kernel.

    python benchmarks/train_speed.py --arch llama-3.2-1b --mixer hedgehog --out results/train_speed
    python benchmarks/train_speed.py --arch llama-3.2-1b --mixer hedgehog_swa --options window=256,linear_rope=false --seq-len 2048 --runs 8:on --profile 3
    python benchmarks/train_speed.py --arch smollm2-135m --mixer hedgehog_swa --seq-len 512 --runs 8:off,32:off,32:on
    python benchmarks/train_speed.py --arch smollm2-135m --mixer gla --options window=64 --seq-len 512 --runs 32:off --stages lora_kd
    python benchmarks/train_speed.py --arch smollm2-135m --mixer gated_deltanet --options window=64 --keep-attention every:4 --seq-len 512 --runs 32:off,32:on
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from multi_gpu import build_teacher  # noqa: E402
from speed import ARCHS  # noqa: E402


# Per token and non-embedding parameter (see the docstring): attention transfer 2 + 2, LoRA KD 2 + 2 + 2.
FLOPS_PER_PARAMETER = {"attention_transfer": 4, "lora_kd": 6}


def rates(records: list[dict], kind: str) -> float:
    # The first two records hold step 1 and the window after it, which pay for compilation and warm-up.
    measured = [r["tokens_per_s"] for r in records if r.get("kind") == kind and "tokens_per_s" in r][2:]
    return sum(measured) / len(measured) if measured else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama-3.2-1b", choices=sorted(ARCHS))
    parser.add_argument("--mixer", default="hedgehog", help="with attention_transfer in --stages, a mixer with parameters of its own")
    parser.add_argument("--stages", default="attention_transfer,lora_kd", help="which stages to time (liger's gla has nothing for attention transfer)")
    parser.add_argument("--keep-attention", default="", help="layers that keep softmax attention, e.g. every:2")
    parser.add_argument("--options", default="", help="the mixer's options, e.g. window=64,conv_size=4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", default="8:off", help="BATCH:COMPILE pairs, e.g. 8:off,32:off,32:on (compile: on or off)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", default="results/train_speed")
    parser.add_argument("--kd-options", default="", help="lora_kd's own options, e.g. kl_chunk=1024")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N steps of each stage after its first (profile_steps) and keep each stage's profile-*.txt beside the logs")
    args = parser.parse_args()
    kinds = args.stages.split(",")
    if not kinds or any(kind not in FLOPS_PER_PARAMETER for kind in kinds):
        parser.error(f"--stages takes a comma-separated list of {', '.join(FLOPS_PER_PARAMETER)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = {k: v for k, v in ARCHS[args.arch].items() if k != "max_position_embeddings"}
    # The packaged tokenizer has 2,048 entries: a smaller vocabulary (the tiny shape's) grows to hold them.
    shape.update(vocab_size=max(shape["vocab_size"], 2048), max_position_embeddings=max(args.seq_len, 2048))
    build_teacher(out / "teacher", shape)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "teacher"))
    n = sum(p.numel() for name, p in teacher.named_parameters() if "embed" not in name)
    keep = f"\n  keep_attention: {args.keep_attention}" if args.keep_attention else ""
    if args.options:
        keep += "\n  options: {" + ", ".join(pair.replace("=", ": ") for pair in args.options.split(",")) + "}"
    own = "".join(f"    {pair.replace('=', ': ')}\n" for pair in args.kd_options.split(",") if pair)
    rows = []
    for run in args.runs.split(","):
        batch, compiled = run.split(":")
        batch = int(batch)
        name = f"b{batch}-{compiled}"
        stage = (f"tokens: {args.steps * batch * args.seq_len}\n    batch_size: {batch}\n    checkpoint_every: 0\n    log_every: 5\n    compile: {compiled == 'on'}"
                 f"\n    profile_steps: {args.profile}")
        (out / f"{name}.yaml").write_text(
            f"teacher: {out / 'teacher'}\noutput: {out / name}\nprecision: auto\nconvert:\n  mixer: {args.mixer}{keep}\n"
            f"data:\n  train: prideprejudice\n  heldout: persuasion\n  seq_len: {args.seq_len}\n"
            "stages:\n" + "".join(f"  - kind: {kind}\n    {stage}\n" + (own if kind == "lora_kd" else "") for kind in kinds)
        )
        result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "distill", str(out / f"{name}.yaml"), "--overwrite"], capture_output=True, text=True)
        (out / f"{name}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "distill failed"
            rows.append({"batch_size": batch, "compile": compiled, "error": error})
            print(json.dumps(rows[-1]), flush=True)
            continue
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        stages = {stage["kind"]: stage for stage in json.loads((out / name / "results.json").read_text())["stages"]}
        for profile in (out / name).glob("profile-*.txt"):
            (out / f"{name}-{profile.name}").write_text(profile.read_text())
        for kind in kinds:
            flops_per_token = FLOPS_PER_PARAMETER[kind] * n
            rate = rates(records, kind)
            first = next(r for r in records if r.get("kind") == kind and "tokens_per_s" in r)
            rows.append({"batch_size": batch, "compile": compiled, "stage": kind, "tokens_per_s": rate,
                         "first_step_s": round(first["tokens"] / first["tokens_per_s"], 1),
                         "mfu": rate * flops_per_token / (args.peak_tflops * 1e12), "non_embedding_params": n,
                         **({"profile": stages[kind]["details"]["profile"]} if args.profile else {})})
            print(json.dumps(rows[-1]), flush=True)
        (out / "train_speed.json").write_text(json.dumps({"arch": args.arch, "mixer": args.mixer, "options": args.options, "kd_options": args.kd_options, "keep_attention": args.keep_attention,
                                                          "seq_len": args.seq_len, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
