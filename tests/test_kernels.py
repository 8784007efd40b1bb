"""Kernel selection on a machine without CUDA: the PyTorch path runs, forcing fla is a clear error."""

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
