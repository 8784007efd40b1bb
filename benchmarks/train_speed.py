"""Distillation throughput and model FLOPs utilisation of both stages, on a random teacher of a real shape.

Builds the Llama-3.2-1B shape with random weights and a tokenizer trained on the packaged text (no downloads;
the shape, not the vocabulary, sets the cost, so the vocabulary is the Llama one padded from that tokenizer),
converts it to `--mixer`, and runs `linearize distill` for a fixed number of steps of each stage, bf16 autocast.
MFU counts 2N FLOPs per token for every forward and 2N for the backward through activations (frozen weights
need no weight gradients): attention transfer = one forward (teacher attention included) + backward through
the converted layers only, taken as 2N + 2N; LoRA KD = teacher forward + student forward + backward = 6N.
Peak: `--peak-tflops` (default 989, the H100's dense bf16 datasheet figure).

    python benchmarks/train_speed.py --mixer hedgehog --out results/train_speed
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

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", default="hedgehog", help="a mixer with parameters of its own, or attention transfer has nothing to train")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", default="results/train_speed")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_teacher(out / "teacher", LLAMA_1B)
    tokens = args.steps * args.batch_size * args.seq_len
    stage = f"tokens: {tokens}\n    batch_size: {args.batch_size}\n    checkpoint_every: 0\n    log_every: 5"
    (out / "recipe.yaml").write_text(
        f"teacher: {out / 'teacher'}\noutput: {out / 'student'}\nprecision: auto\nconvert:\n  mixer: {args.mixer}\n"
        f"data:\n  train: prideprejudice\n  heldout: persuasion\n  seq_len: {args.seq_len}\n"
        f"stages:\n  - kind: attention_transfer\n    {stage}\n  - kind: lora_kd\n    {stage}\n"
    )
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "distill", str(out / "recipe.yaml"), "--overwrite"], capture_output=True, text=True)
    (out / "distill.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "distill failed")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "teacher"))
    n = sum(p.numel() for name, p in teacher.named_parameters() if "embed" not in name)
    records = [json.loads(line) for line in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for kind, flops_per_token in (("attention_transfer", 4 * n), ("lora_kd", 6 * n)):
        rates = [r["tokens_per_s"] for r in records if r.get("kind") == kind and "tokens_per_s" in r][1:]  # first window compiles
        rate = sum(rates) / len(rates) if rates else float("nan")
        rows.append({"stage": kind, "tokens_per_s": rate, "mfu": rate * flops_per_token / (args.peak_tflops * 1e12), "non_embedding_params": n})
    (out / "train_speed.json").write_text(json.dumps({"mixer": args.mixer, "rows": rows}, indent=1))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
