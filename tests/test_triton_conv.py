"""A prefill's short convolution in one Triton kernel (triton_conv.py) against the PyTorch path of `convolve_heads`, on
the CPU through Triton's interpreter: awkward lengths and channel counts, a carried cache, left padding, float32,
bfloat16 and float16; a tiny gated_deltanet model's generation through it; and where it is left to PyTorch.
test_kernels_compile.py compiles it for sm_90; test_gpu.py checks it on CUDA."""

import pytest
import torch

import linearize
from linearize import LinearizeError
from linearize.hf import mixer_gated_deltanet, triton_conv
from linearize.hf.mixer_gated_deltanet import convolve_heads
from tests.test_triton_step import assert_close, generation_through_a_prefill_kernel, kernel_calls, left_to_pytorch_when_off_or_float64
from tests.test_triton_window import needs_triton
from tests.tiny import random_ids, tiny_model

CASES = [  # length, heads, kv heads, head dim, with a cache, padded, dtype
    (2, 4, 2, 8, False, False, torch.float32), (37, 4, 2, 8, True, True, torch.bfloat16),
    (33, 3, 1, 24, True, False, torch.float16), (70, 9, 3, 8, False, True, torch.float32),
]


@pytest.fixture
def fused(monkeypatch):
    """Prefills take the kernel (CPU tensors through the interpreter); returns the list of the shapes it convolved."""
    return kernel_calls(monkeypatch, mixer_gated_deltanet, "causal_conv", lambda args, out: tuple(args[0].shape))


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("length,heads,kv_heads,d,with_cache,padded,dtype", CASES)
def test_the_kernel_equals_the_pytorch_path(fused, monkeypatch, length, heads, kv_heads, d, with_cache, padded, dtype):
    """q, k, v and the cache through the kernel equal the PyTorch path's (the cache bit for bit: it is not computed),
    where the channels (80, 120, 120) are no multiple of the kernel's block and the lengths none of its steps."""
    generator = torch.Generator().manual_seed(length)
    batch, taps = 2, 4
    q = torch.randn(batch, length, heads, d, generator=generator).to(dtype).transpose(1, 2)
    k, v = (torch.randn(batch, length, kv_heads, d, generator=generator).to(dtype).transpose(1, 2) for _ in range(2))
    channels = (heads + 2 * kv_heads) * d
    weight = torch.randn(channels, taps, generator=generator)
    cache = torch.randn(batch, channels, taps - 1, generator=generator).to(dtype).float() if with_cache else None
    mask = None
    if padded:
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, : length - 2] = False
    with torch.no_grad():
        got = convolve_heads(q, k, v, weight, mask, cache)
        assert fused == [(batch, length + taps - 1, channels)]
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
        expected = convolve_heads(q, k, v, weight, mask, cache)
    assert len(fused) == 1
    for name, mine, theirs in zip(("q", "k", "v"), got, expected):
        assert mine.dtype == torch.float32 and mine.shape == theirs.shape, name
        assert_close(mine, theirs, name, 1e-6)
    assert torch.equal(got[3], expected[3])


@pytest.mark.core
@needs_triton
def test_the_custom_op_computes_what_the_eager_launch_does():
    generator = torch.Generator().manual_seed(0)
    seq, taps = torch.randn(2, 12, 40, generator=generator).bfloat16(), torch.randn(4, 40, generator=generator)
    assert torch.equal(triton_conv.OP(seq, taps, 9), triton_conv.causal_conv(seq, taps, 9))


@pytest.mark.core
@needs_triton
def test_generation_through_the_kernel_equals_uncached_and_the_pytorch_path(fused, monkeypatch):
    """A tiny two-layer gated_deltanet model, left-padded batch: the prompt's convolution through the kernel, then
    cached greedy generation, gives the PyTorch path's logits and uncached generation's tokens."""
    model = linearize.convert(tiny_model(dtype=torch.float32, num_hidden_layers=2), "gated_deltanet")
    first = generation_through_a_prefill_kernel(model, fused, monkeypatch)
    assert [shape[:2] for shape in first[:2]] == [(2, 7 + 3)] * 2  # each layer's prompt, after the kernel's 3 cached inputs


@pytest.mark.core
@needs_triton
def test_the_convolution_is_left_to_pytorch_where_it_cannot_run(fused, monkeypatch):
    """Under LINEARIZE_KERNELS=torch or LINEARIZE_FUSED_STEP=off, in float64, or with gradients on (training: autograd
    through the PyTorch products), a prefill convolves in PyTorch; the problems say so in one line."""
    model = linearize.convert(tiny_model(dtype=torch.float32), "gated_deltanet")
    ids = random_ids(1, 5)
    left_to_pytorch_when_off_or_float64(monkeypatch, model, ids, fused)
    assert len(fused) == model.config.text_config.num_hidden_layers
    model(ids)  # gradients on
    assert len(fused) == model.config.text_config.num_hidden_layers
    seq, taps = torch.zeros(1, 5, 8), torch.zeros(4, 8, requires_grad=True)
    assert triton_conv.conv_prefill_problem(seq, taps).startswith("gradients are on")
    with torch.no_grad():
        assert "float32 taps, got torch.float32 and torch.float64" in triton_conv.conv_prefill_problem(seq, taps.double())
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "auto")
        assert "runs on CUDA tensors" in triton_conv.conv_prefill_problem(seq, taps)
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "yes")
        with pytest.raises(LinearizeError, match="LINEARIZE_FUSED_STEP='yes' is not one of auto, on, off; unset it") as info:
            triton_conv.conv_prefill_problem(seq, taps)
    assert "\n" not in str(info.value)
