"""The notebook-style example runs end to end (on a tiny teacher folder, small budgets) and prints what it claims."""

import subprocess
import sys

import torch

from tests.conftest import REPO_ROOT
from tests.tiny import tiny_model, tiny_tokenizer


def test_the_python_api_example_runs(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    command = [sys.executable, str(REPO_ROOT / "examples" / "python_api.py"), "--teacher", str(teacher), "--tokens", "256",
               "--seq-len", "32", "--out", str(tmp_path / "student")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "teacher_mode reproduces the teacher: True" in done.stdout
    assert "cached generation equals uncached: True" in done.stdout
    assert sum("perplexity" in line for line in done.stdout.splitlines()) == 2, done.stdout
    assert (tmp_path / "student" / "model.safetensors").exists()
