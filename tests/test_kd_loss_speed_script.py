"""benchmarks/kd_loss_speed.py: linearize's chunked KD loss (kernel and PyTorch path) timed beside the full-logit form
and, where it is installed, Liger-Kernel's fused linear JSD; checked on a CPU (the kernel under Triton's interpreter)."""

import importlib.util
import json

import pytest
import torch

from tests.tiny import benchmark_script, run_as_script, run_main

kd_loss_speed = benchmark_script("kd_loss_speed")


def run_script(*args):
    return run_main(kd_loss_speed, *args)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the fused KL needs Triton (the dev extra)")
def test_every_variant_gives_the_reference_loss_and_gradient(tmp_path):
    out = tmp_path / "kd_loss.json"
    done = run_script("--device", "cpu", "--arch", "tiny", "--tokens", "96", "--chunks", "32,1024", "--temperature", "2",
                      "--top-k", "16", "--precision", "float32", "--repeats", "1", "--warmup", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = {(row["variant"], row["chunk"]) for row in result["rows"]}
    expected = {(variant, chunk) for variant in ("linearize_torch", "linearize", "top_k_torch", "top_k", "caching_torch", "caching") for chunk in (32, 1024)}
    expected.add(("full", None))
    if importlib.util.find_spec("liger_kernel") is None:
        assert "pip install liger-kernel" in result["absent"]["liger"] and result["liger_kernel"] is None
    else:
        expected.add(("liger", None))
        assert result["liger_kernel"].count(".") >= 2
    assert rows == expected and result["tokens"] == 96 and result["vocab"] == 256
    # The same loss in every dense form, at the temperature's scale (T^2 KL), and a real one: the two models differ; the
    # same in every sparse form (the teacher's top 16 and its rest, cached or taken in the step, kernels or PyTorch),
    # and less than the dense one: a KL over a coarser partition of the same two distributions.
    dense = [row["loss"] for row in result["rows"] if row["top_k"] is None]
    kept = [row["loss"] for row in result["rows"] if row["top_k"] == 16]
    assert len(kept) == 8 and min(dense) > 0.1 and max(dense) - min(dense) < 1e-5 * max(dense)
    assert 0 < min(kept) and max(kept) - min(kept) < 1e-5 * max(kept) and max(kept) < min(dense)
    assert all(row["grad_difference"] < 1e-5 and row["ms"] > 0 for row in result["rows"])


@pytest.mark.parametrize("variants", ["linearize,full", "linearize_torch,top_k"])
def test_a_run_without_the_reference_is_one_line_naming_the_fix(tmp_path, variants):
    done = run_script("--device", "cpu", "--variants", variants, "--out", str(tmp_path / "x.json"))
    assert done.returncode != 0 and "needs linearize_torch" in done.stderr and "top_k_torch with any sparse one" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_cuda_on_a_machine_without_it_is_one_line_naming_the_fix(tmp_path):
    """As a script, in a process of its own (the other tests call its main() here; both under conftest's interpreter)."""
    done = run_as_script("kd_loss_speed", "--out", tmp_path / "x.json")
    assert done.returncode != 0 and "--device cpu" in done.stderr and len(done.stderr.strip().splitlines()) == 1
