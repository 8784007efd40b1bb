"""Distillation split over two processes (gloo on CPU, the same code path as DDP on GPUs) gives the losses and
the weights of one process with the same global batch; a launch accelerate does not join is refused."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from linearize.distillation.session import check_launch
from linearize.hf.errors import LinearizeError
from linearize.textdata import packaged_text
from tests.conftest import REPO_ROOT
from tests.test_cli import run as run_cli
from tests.tiny import tiny_model, tiny_tokenizer


def test_an_unjoined_multi_process_launch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LinearizeError, match="ACCELERATE_USE_CPU=true"):
        check_launch(1)
    check_launch(2)
    monkeypatch.delenv("WORLD_SIZE")
    check_launch(1)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def distill(recipe, out, processes: int, batch_size: int) -> list[dict]:
    overrides = [f"stages.{i}.batch_size={batch_size}" for i in range(2)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([*launcher, str(REPO_ROOT / "cli.py"), "distill", str(recipe), "--out", str(out), *overrides],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return metrics(out)


def distill_here(recipe, out, batch_size: int, monkeypatch, capsys) -> list[dict]:
    """The same command in this process, on one thread as each launched process runs: the one-process reference
    (a launch of its own would import torch, transformers and linearize twice more)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    code, _, stderr = run_cli(monkeypatch, capsys, "distill", recipe, "--out", out, *[f"stages.{i}.batch_size={batch_size}" for i in range(2)])
    assert code == 0, stderr[-2000:]
    return metrics(out)


def test_two_processes_match_one(tmp_path, monkeypatch, capsys):
    teacher = tmp_path / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    (tmp_path / "train.txt").write_text(packaged_text("prideprejudice")[:8000])
    # the KL of a tiny random model to itself is ~1e-6, all rounding; the cross-entropy term makes KD's loss ~7
    stage = {"tokens": 512, "lr": 0.01, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 0}
    recipe = {
        "teacher": str(teacher),
        "output": str(tmp_path / "unused"),
        "precision": "no",
        "convert": {"mixer": "hedgehog"},
        "data": {"train": str(tmp_path / "train.txt"), "heldout": "persuasion", "seq_len": 32},
        "stages": [{"kind": "attention_transfer", **stage}, {"kind": "lora_kd", "ce_weight": 1.0, **stage}],
        "eval": {"perplexity_tokens": 128, "seq_len": 32, "prompt": "It is", "max_new_tokens": 2},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    one = distill_here(tmp_path / "recipe.yaml", tmp_path / "one", batch_size=4, monkeypatch=monkeypatch, capsys=capsys)
    two = distill(tmp_path / "recipe.yaml", tmp_path / "two", processes=2, batch_size=2)

    # one line per step from the main process only, the same tokens per step, the same losses up to reduction order
    assert [(r["kind"], r["step"], r["tokens"]) for r in two] == [(r["kind"], r["step"], r["tokens"]) for r in one]
    assert {r["kind"] for r in one} == {"attention_transfer", "lora_kd"} and len(one) == 8
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    assert one[-1]["loss"] != pytest.approx(one[4]["loss"], rel=1e-6)  # LoRA KD moved: the comparison is not vacuous
    weights_one, weights_two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
