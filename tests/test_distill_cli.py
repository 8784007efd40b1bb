"""`linearize distill` and `linearize run` on a tiny teacher folder: what they save, and one-line errors that
leave nothing on disk."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from linearize import cli
from linearize.textdata import packaged_text
from tests.conftest import REPO_ROOT
from tests.tiny import tiny_model, tiny_tokenizer

STAGES = [
    {"kind": "attention_transfer", "tokens": 256, "batch_size": 2, "lr": 0.05, "checkpoint_every": 2},
    {"kind": "lora_kd", "tokens": 256, "batch_size": 2, "lr": 0.003},
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny teacher folder, a training and a held-out text, and a recipe naming them."""
    root = tmp_path_factory.mktemp("cli")
    teacher = root / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    (root / "train.txt").write_text(packaged_text("prideprejudice")[:6000])
    (root / "heldout.txt").write_text(packaged_text("persuasion")[:2000])
    recipe = {
        "teacher": str(teacher),
        "output": str(root / "unused"),
        "convert": {"mixer": "hedgehog_swa", "options": {"window": 4}},
        "data": {"train": str(root / "train.txt"), "heldout": str(root / "heldout.txt"), "seq_len": 32},
        "stages": STAGES,
        "eval": {"perplexity_tokens": 256, "seq_len": 32, "prompt": "It is", "max_new_tokens": 4},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def linearize(monkeypatch, capsys, *args):
    """Run the console script in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["linearize", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    captured = capsys.readouterr()
    return exit.value.code, captured.out, captured.err


def test_distill_saves_a_plain_model_with_its_metrics(workspace, monkeypatch, capsys):
    out = workspace / "distilled"
    code, stdout, stderr = linearize(monkeypatch, capsys, "distill", workspace / "recipe.yaml", "--out", out, "stages.1.profile_steps=2")
    assert code == 0, stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "results.json", "metrics.jsonl",
            "profile-stage1-lora_kd.txt"} <= {p.name for p in out.iterdir()}
    assert (out / "profile-stage1-lora_kd.txt").read_text().startswith("profiled steps 2-3: ")
    assert "stages[1] (lora_kd): profiled steps 2-3: " in stdout
    assert not (workspace / "distilled.checkpoints").exists()
    results = json.loads((out / "results.json").read_text())
    assert [s["kind"] for s in results["stages"]] == ["attention_transfer", "lora_kd"] and all(s["steps"] == 4 for s in results["stages"])
    assert "profile" not in results["stages"][0]["details"] and results["stages"][1]["details"]["profile"]["steps"] == 2
    assert "0: attention_transfer" in stdout and "saved" in stdout
    assert "of which the first step (compilation and set-up): stage 0 " in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["stage"], r["step"]) for r in records} >= {(0, 1), (0, 4), (1, 1), (1, 4)}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()

    # An already converted folder is distilled as it is.
    again = workspace / "again"
    code, stdout, stderr = linearize(monkeypatch, capsys, "distill", workspace / "recipe.yaml", "--out", again, f"teacher={out}", "stages.1.tokens=64")
    assert code == 0, stderr
    assert "already converted" in stdout
    assert json.loads((again / "results.json").read_text())["stages"][1]["steps"] == 1


def test_run_scores_teacher_converted_and_distilled(workspace, monkeypatch, capsys):
    out = workspace / "run"
    code, stdout, stderr = linearize(monkeypatch, capsys, "run", workspace / "recipe.yaml", "--out", out)
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    for name in ("teacher", "converted", "distilled"):
        assert results[name]["perplexity"] > 1 and isinstance(results[name]["generation"], str)
        assert name in stdout
    assert results["data"].startswith(str(workspace / "train.txt"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{ws}/distilled-exists"], "already exists; pass --overwrite"),
        (["stages=[{kind: lora}]"], "unknown stage kind 'lora'; did you mean 'lora_kd'?"),
        (["convert.mixer=hedgehogg"], "unknown mixer 'hedgehogg'; did you mean 'hedgehog'?"),
        (["convert.options.windw=4"], "does not take option(s) windw"),
        (["stages.0.tokens=0"], "tokens must be a positive budget"),
        (["data.train={ws}/missing.txt"], "data source '{ws}/missing.txt' does not exist"),
        (["data.seq_len=8000", "stages.0.tokens=16000", "stages.1.tokens=16000", "data.allow_longer=true"], "fewer than 1 window(s) of data.seq_len=8000"),
        (["data.seq_len=1024", "stages.0.tokens=2048", "stages.1.tokens=2048"], "data.seq_len=1024 is beyond the model's 512 positions (max_position_embeddings)"),
        (["--resume"], "nothing to resume"),
        (["--resume", "--overwrite"], "pass one of them"),
        (["stages.0.tokens=10"], "less than one optimizer step"),
        (["stages.1.profile_steps=4"], "stages[1] (lora_kd): profile_steps=4 needs at least 5 optimizer steps (the first compiles) and tokens=256 pay for 4"),
        (["convert.selection.opening=2"], "convert.selection.opening=2: it is a number of layers (0 or more) chosen beside the retrieval heads'; set convert.selection.heads too"),
        (["convert.selection.heads=4", "convert.selection.opening=1", "convert.selection.lead=1"],
         "convert.selection.opening=1 and lead=1 both choose layers beside the retrieval heads'; set one of them to 0"),
        (["convert.selection.heads=4", "convert.selection.around=true"],
         "convert.selection.around=true places lead layers but lead is 0; set convert.selection.lead (e.g. 2), or around=false"),
        (["serve.layers={auto:1: {keep: 8}}"], "serve.layers: 'auto:1' ranks layers by the teacher's retrieval heads; set convert.selection.heads (e.g. 12)"),
        (["serve.layers={'7': {keep: 8}}"], "serve.layers: layer 7 is out of range; the model has layers 0-2"),
        (["convert.keep_attention=[1, 7]"],
         "convert.keep_attention: layer 7 is out of range; the model has layers 0-2 (a recipe's layers are its teacher's; convert.keep_attention=auto:0.25 chooses a quarter of this model's)"),
    ],
    ids=["output exists", "unknown stage", "unknown mixer", "unknown option", "zero budget", "missing data", "seq_len too long", "seq_len beyond positions", "nothing to resume", "resume and overwrite", "budget below a step",
         "too few steps to profile", "opening without heads", "opening and lead", "around without lead", "serve auto without heads", "serve layer out of range",
         "kept layer out of range"],
)
def test_mistakes_are_one_line_and_write_nothing(args, message, workspace, monkeypatch, capsys):
    (workspace / "distilled-exists").mkdir(exist_ok=True)
    (workspace / "distilled-exists" / "config.json").write_text("{}")
    args = [a.replace("{ws}", str(workspace)) for a in args]
    if "--out" not in args:
        args += ["--out", str(workspace / "bad")]
    before = sorted(p.name for p in workspace.iterdir())
    code, _, stderr = linearize(monkeypatch, capsys, "distill", workspace / "recipe.yaml", *args)
    assert code == 2
    progress = ("Loading weights", "Generating train split")  # transformers' and (on a cold cache) datasets' progress bars
    lines = [line for line in stderr.splitlines() if line.strip() and not any(bar in line for bar in progress)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message.replace("{ws}", str(workspace)) in lines[0]
    assert sorted(p.name for p in workspace.iterdir()) == before


def test_the_checkout_launcher_prints_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "cli.py"), "distill", "lolcatz"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: no recipe 'lolcatz'; did you mean 'lolcats'? shipped recipes: ")
    assert result.stderr.strip().count("\n") == 0


def test_distill_serves_some_layers_with_their_own_options(workspace, monkeypatch, capsys):
    """`serve` and `serve.layers` from the command line: kept keys on every layer, then more on layer 1, saved."""
    out = workspace / "served"
    code, stdout, stderr = linearize(
        monkeypatch, capsys, "distill", workspace / "recipe.yaml", "--out", out, "convert.options={window: 4, keep: 2, keep_block: 4}",
        "serve={keep: 3, layers: {'1': {keep: 6}}}",
    )
    assert code == 0, stderr
    assert [layer["options"]["keep"] for layer in json.loads((out / "config.json").read_text())["layers"]] == [3, 6, 3]
    said = " ".join((stdout + stderr).split())
    assert "served with keep=3 in 3 layers (serve)" in said and "served with keep=6 in layers [1] (serve.layers 1)" in said
