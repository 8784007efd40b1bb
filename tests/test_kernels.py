"""Kernel selection: the PyTorch path on CPU, fla chosen on CUDA when usable, a one-time warning and the PyTorch
path when it is missing, too old or the shape rules it out, and clear errors when forcing fla where it cannot run."""

import warnings

import pytest
import torch

import linearize
from linearize import LinearizeError
from linearize.decode import GraphDecoder
from linearize.hf import kernel_dispatch as kernels
from linearize.hf.ops_gated import chunk_gla
from tests.tiny import tiny_model


def test_cpu_uses_the_pytorch_path():
    assert kernels.backend(torch.device("cpu"), (64, 64), torch.float32) == ("torch", None)
    q = k = v = torch.randn(1, 2, 9, 8)
    gk = torch.nn.functional.logsigmoid(torch.randn(1, 2, 9, 8))
    o, state = kernels.gla(q, k, v, gk, output_state=True)
    ref, ref_state = chunk_gla(q, k, v, gk)
    assert torch.equal(o, ref) and torch.equal(state, ref_state)


def test_forcing_fla_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "fla")
    with pytest.raises(LinearizeError, match="LINEARIZE_KERNELS=fla needs CUDA tensors"):
        kernels.backend(torch.device("cpu"), (64, 64), torch.float32)


def test_unknown_kernel_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    with pytest.raises(LinearizeError, match="is not one of auto, torch, fla"):
        kernels.mode()


def test_shapes_fla_cannot_take_are_named():
    assert "up to 256" in kernels.shape_problem((512, 64), torch.bfloat16)
    assert "float16/bfloat16/float32" in kernels.shape_problem((64, 64), torch.float64)
    assert kernels.shape_problem((64, 128), torch.bfloat16) is None


def test_graph_decoder_refuses_what_it_cannot_capture():
    with pytest.raises(LinearizeError, match="needs the model on a CUDA device"):
        GraphDecoder(linearize.convert(tiny_model(dtype=torch.float32), "hedgehog"))
    with pytest.raises(LinearizeError, match="does not take gated_deltanet layers yet.*use model.generate"):
        GraphDecoder(linearize.convert(tiny_model(dtype=torch.float32), "gated_deltanet"))


@pytest.mark.parametrize(
    "problem, version, reason",
    [
        ("flash-linear-attention is not usable (ModuleNotFoundError: No module named 'fla')", None, "not usable"),
        (None, "0.5.2", "flash-linear-attention 0.5.2 is older than"),
    ],
)
def test_cuda_without_a_usable_fla_warns_once_and_falls_back(monkeypatch, problem, version, reason):
    """backend() only looks at the device type, so a CUDA device object stands in for a GPU here."""
    monkeypatch.setattr(kernels, "FLA_PROBLEM", problem)
    monkeypatch.setattr(kernels, "FLA_VERSION", version)
    monkeypatch.setattr(kernels, "_warned", set())
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match=reason):
        path, why = kernels.backend(cuda, (64, 64), torch.bfloat16)
    assert path == "torch" and reason in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.backend(cuda, (64, 64), torch.bfloat16)[0] == "torch"  # once only
    monkeypatch.setenv("LINEARIZE_KERNELS", "fla")
    with pytest.raises(LinearizeError, match=r"LINEARIZE_KERNELS=fla, but .*pip install 'linearize\[gpu\]'"):
        kernels.backend(cuda, (64, 64), torch.bfloat16)


def test_a_usable_fla_is_chosen_on_cuda_unless_the_shape_rules_it_out(monkeypatch):
    monkeypatch.setattr(kernels, "FLA_PROBLEM", None)
    monkeypatch.setattr(kernels, "FLA_VERSION", "0.6.0")
    monkeypatch.setattr(kernels, "_warned", set())
    cuda = torch.device("cuda")
    assert kernels.backend(cuda, (64, 65), torch.bfloat16) == ("fla", None)
    with pytest.warns(UserWarning, match="up to 256"):
        assert kernels.backend(cuda, (512, 64), torch.bfloat16)[0] == "torch"
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    assert kernels.backend(cuda, (64, 64), torch.bfloat16) == ("torch", None)
