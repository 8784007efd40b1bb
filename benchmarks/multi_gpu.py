"""Distillation on several GPUs gives the losses of one GPU: the same global batch, split across processes.

Builds a small random Llama teacher with a tokenizer trained on the packaged text (no downloads), then runs the
same two-stage recipe (attention transfer, LoRA KD; float32 so only reduction order differs) three ways:
one process with batch 4, two processes with batch 2 each under DDP, and two under FSDP; and compares the
per-step losses in each run's metrics.jsonl.

    python benchmarks/multi_gpu.py --out results/multi_gpu      # on a host with 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_teacher(folder: Path, shape: dict | None = None) -> None:
    """A random Llama (small, or `shape`) and a byte-level BPE tokenizer trained on the packaged novel."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from linearize.textdata import packaged_text

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([packaged_text("prideprejudice")], trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    torch.manual_seed(0)
    small = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=len(tokenizer), max_position_embeddings=1024)
    config = LlamaConfig(**{**small, **(shape or {})}, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16 if shape else torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def launch(name: str, args: list[str], out: Path, overrides: list[str] = ()) -> dict:
    command = [sys.executable, "-m", "accelerate.commands.launch", *args, str(ROOT / "cli.py"), "distill", str(out / "recipe.yaml"),
               "--out", str(out / name), "--overwrite", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
    (out / f"{name}.log").write_text(result.stdout + result.stderr)
    metrics = out / name / "metrics.jsonl"
    if result.returncode != 0 or not metrics.exists():
        return {"error": (result.stderr or result.stdout).strip().splitlines()[-1:] if (result.stderr or result.stdout) else ["no output"]}
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"losses": [(r.get("stage"), r.get("step"), r.get("loss")) for r in records if "loss" in r]}


def compare_weights(reference: Path, other: Path) -> dict:
    """The saved students side by side: same names and shapes, and the largest relative difference of a tensor."""
    from safetensors.torch import load_file

    a, b = load_file(str(reference)), load_file(str(other))
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return {"same_names_and_shapes": False}
    worst = max(((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-12)).item() for k in a)
    return {"same_names_and_shapes": True, "tensors": len(a), "max_relative_difference": worst}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/multi_gpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", default="one_gpu,ddp,fsdp", help="which of one_gpu, ddp, fsdp to launch (one_gpu is the reference)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_teacher(out / "teacher")
    seq_len, global_batch = 128, 4
    tokens = args.steps * global_batch * seq_len
    stage = f"tokens: {tokens}\n    batch_size: 4\n    checkpoint_every: 0\n    log_every: 1\n    warmup_steps: 0"
    (out / "recipe.yaml").write_text(
        f"teacher: {out / 'teacher'}\noutput: {out / 'unused'}\nprecision: 'no'\nconvert:\n  mixer: hedgehog\n"
        f"data:\n  train: prideprejudice\n  heldout: persuasion\n  seq_len: {seq_len}\n"
        # A random teacher's KL to itself is rounding (~1e-5); the cross-entropy term gives KD a loss to compare.
        f"stages:\n  - kind: attention_transfer\n    {stage}\n  - kind: lora_kd\n    ce_weight: 1.0\n    {stage}\n"
    )
    half = ["stages.0.batch_size=2", "stages.1.batch_size=2"]  # two processes x 2 windows = the one-GPU batch of 4
    launches = {
        "one_gpu": (["--num_processes", "1"], []),
        "ddp": (["--config_file", str(ROOT / "recipes/accelerate/ddp.yaml")], half),
        "fsdp": (["--config_file", str(ROOT / "recipes/accelerate/fsdp.yaml")], half),
    }
    runs = {name: launch(name, launches[name][0], out, launches[name][1]) for name in args.runs.split(",")}
    reference = runs.get("one_gpu", {}).get("losses", [])
    for name in set(runs) - {"one_gpu"}:
        losses = runs[name].get("losses")
        if losses and reference and len(losses) == len(reference):
            runs[name]["max_relative_difference"] = max(abs(a[2] - b[2]) / max(abs(b[2]), 1e-12) for a, b in zip(losses, reference))
        if (out / name / "model.safetensors").exists() and (out / "one_gpu" / "model.safetensors").exists():
            runs[name]["saved_weights"] = compare_weights(out / "one_gpu" / "model.safetensors", out / name / "model.safetensors")
    (out / "multi_gpu.json").write_text(json.dumps(runs, indent=1))
    for name, run in runs.items():
        print(name, {k: v for k, v in run.items() if k != "losses"}, "steps:", len(run.get("losses", [])))


if __name__ == "__main__":
    main()
