"""The notebook-style example runs end to end (on a tiny teacher folder, small budgets) and prints what it claims."""

import runpy
import sys

import torch

from tests.conftest import REPO_ROOT
from tests.tiny import tiny_model, tiny_tokenizer


def test_the_python_api_example_runs(tmp_path, monkeypatch, capsys):
    # The example runs as __main__ in this process, its cells top to bottom as `python examples/python_api.py` runs
    # them: a process of its own would import torch, transformers and linearize again.
    teacher = tmp_path / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    script = REPO_ROOT / "examples" / "python_api.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "--teacher", str(teacher), "--tokens", "256", "--seq-len", "32", "--out", str(tmp_path / "student")])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "teacher_mode reproduces the teacher: True" in printed
    assert "cached generation equals uncached: True" in printed
    assert sum("perplexity" in line for line in printed.splitlines()) == 2, printed
    assert (tmp_path / "student" / "model.safetensors").exists()
