"""RoPE on a prefill's q and k in one Triton kernel (triton_rope.py) against the PyTorch path of `apply_rotary`, on the
CPU through Triton's interpreter: outputs and gradients, rotary widths below the head dimension, grouped heads, cos and
sin of one sequence or of each, lengths no multiple of the kernel's block, strided inputs, float32, bfloat16 and float16;
tiny models' generation and a training step through it; and where it is left to PyTorch. test_kernels_compile.py
compiles it for sm_90; test_gpu.py checks it on CUDA."""

import pytest
import torch

import linearize
from linearize import LinearizeError
from linearize.hf import attention, triton_rope
from tests.test_triton_step import assert_close, generation_through_a_prefill_kernel, kernel_calls, left_to_pytorch_when_off_or_float64
from tests.test_triton_window import needs_triton
from tests.tiny import random_ids, tiny_model

CASES = [  # batch, query heads, kv heads, length, head dim, rotary width, sequences of cos and sin, dtype
    (2, 4, 2, 70, 16, 16, 2, torch.float32), (1, 9, 3, 5, 24, 12, 1, torch.bfloat16), (2, 3, 3, 130, 8, 8, 1, torch.float16),
    (3, 2, 1, 1, 12, 6, 3, torch.bfloat16),
]


@pytest.fixture
def fused(monkeypatch):
    """RoPE takes the kernel (CPU tensors through the interpreter); returns the list of (q's, k's) shapes it rotated."""
    return kernel_calls(monkeypatch, attention, "rotary", lambda args, out: (tuple(args[0].shape), tuple(args[1].shape)))


def rope_inputs(batch, heads, kv_heads, length, dim, rot, sequences, dtype, seed=0):
    """q and k as a projection leaves them ((B, T, H, D) seen as (B, H, T, D): strided), requiring grad, and cos and sin
    of `sequences` sequences as transformers makes them (each angle twice)."""
    generator = torch.Generator().manual_seed(seed)
    q, k = ((torch.randn(batch, length, h, dim, generator=generator) * 3).to(dtype).transpose(1, 2).requires_grad_(True) for h in (heads, kv_heads))
    angles = torch.randn(sequences, length, rot // 2, generator=generator) * 5
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,rot,sequences,dtype", CASES)
def test_the_kernel_equals_the_pytorch_path(fused, monkeypatch, batch, heads, kv_heads, length, dim, rot, sequences, dtype):
    """q and k through the kernel, and their gradients through its backward, equal the PyTorch path's to the bit: the
    kernel rounds each product and sum as PyTorch does, in every dtype. The outputs keep q's and k's strides."""
    q, k, cos, sin = rope_inputs(batch, heads, kv_heads, length, dim, rot, sequences, dtype)
    grads = tuple(torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dtype) for x in (q, k))
    got = attention.apply_rotary(q, k, (cos, sin))
    got_grads = torch.autograd.grad(got, (q, k), grads)
    assert fused == [(tuple(q.shape), tuple(k.shape))]
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    expected = attention.apply_rotary(q, k, (cos, sin))
    expected_grads = torch.autograd.grad(expected, (q, k), grads)
    assert len(fused) == 1
    for name, mine, theirs in zip(("q", "k", "dq", "dk"), got + got_grads, expected + expected_grads):
        assert mine.dtype == theirs.dtype == dtype and mine.shape == theirs.shape, name
        assert torch.equal(mine, theirs), f"{name}: {(mine.float() - theirs.float()).abs().max()}"
    assert got[0].stride() == q.stride() and got[1].stride() == k.stride()
    unrotated = slice(rot, None)
    assert torch.equal(got[0][..., unrotated], q[..., unrotated]) and not torch.equal(got[0][..., :rot], q[..., :rot])


@pytest.mark.core
@needs_triton
def test_the_custom_op_computes_what_the_eager_launch_does():
    q, k, cos, sin = rope_inputs(2, 3, 1, 20, 16, 16, 1, torch.bfloat16)
    with torch.no_grad():
        for backward in (False, True):
            assert all(torch.equal(a, b) for a, b in zip(triton_rope.OP(q, k, cos, sin, backward), triton_rope.rotate(q, k, cos, sin, backward)))


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("mixer,options", [("hedgehog_swa", {"window": 4}), ("swa", {"window": 3})])
def test_generation_through_the_kernel_equals_uncached_and_the_pytorch_path(fused, monkeypatch, mixer, options):
    """A tiny two-layer model, left-padded batch: the prompt's RoPE through the kernel in each layer, then cached greedy
    generation, give the PyTorch path's logits and uncached generation's tokens."""
    model = linearize.convert(tiny_model(dtype=torch.float32, num_hidden_layers=2), mixer, **options).requires_grad_(False)
    fused.clear()  # conversion's own check of the converted layers
    first = generation_through_a_prefill_kernel(model, fused, monkeypatch)
    assert first[:2] == [((2, 4, 7, 16), (2, 2, 7, 16))] * 2  # each layer's prompt: q's heads and k's


@pytest.mark.core
@needs_triton
def test_a_training_step_through_the_kernel_equals_the_pytorch_path(fused, monkeypatch):
    """A tiny hedgehog_swa model's loss and every parameter's gradient, RoPE through the kernel and its backward (the
    custom op, under autograd), equal the PyTorch path's."""
    model = linearize.convert(tiny_model(dtype=torch.float32, num_hidden_layers=2), "hedgehog_swa", window=3).requires_grad_(True)
    ids = random_ids(2, 9)
    fused.clear()  # conversion's own check of the converted layers

    def step():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    assert len(fused) == 2
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    expected_loss, expected_grads = step()
    assert len(fused) == 2
    assert_close(loss, expected_loss, "loss", 1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name in grads:
        assert_close(grads[name], expected_grads[name], name, 1e-5)


@pytest.mark.core
@needs_triton
def test_rope_is_left_to_pytorch_where_it_cannot_run(fused, monkeypatch):
    """Under LINEARIZE_KERNELS=torch or LINEARIZE_FUSED_STEP=off, or in float64, a prefill rotates in PyTorch; so where
    cos and sin require gradients, or the shapes or dtypes are not the kernel's: the problems say so in one line."""
    model = linearize.convert(tiny_model(dtype=torch.float32), "hedgehog_swa", window=3)
    fused.clear()  # conversion's own check of the converted layers
    left_to_pytorch_when_off_or_float64(monkeypatch, model, random_ids(1, 5), fused)
    assert len(fused) == model.config.text_config.num_hidden_layers
    q, k, cos, sin = rope_inputs(1, 2, 1, 5, 8, 8, 1, torch.float32)
    assert triton_rope.rotary_problem(q, k, cos.requires_grad_(True), sin).startswith("cos and sin require gradients")
    with torch.no_grad():
        assert "got torch.float32, torch.float32, torch.bfloat16" in triton_rope.rotary_problem(q, k, cos.bfloat16(), sin)
        assert "got (1, 2, 5, 8) and (1, 1, 4, 8)" in triton_rope.rotary_problem(q, k[:, :, :4], cos, sin)
        assert "an even width up to D), got (1, 5, 5)" in triton_rope.rotary_problem(q, k, torch.zeros(1, 5, 5), torch.zeros(1, 5, 5))
        assert "an even width up to D), got (1, 5, 10)" in triton_rope.rotary_problem(q, k, torch.zeros(1, 5, 10), torch.zeros(1, 5, 10))
        assert "got (2, 5, 8)" in triton_rope.rotary_problem(q, k, torch.zeros(2, 5, 8), torch.zeros(2, 5, 8))
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "auto")
        assert "runs on CUDA tensors" in triton_rope.rotary_problem(q, k, cos, sin)
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "yes")
        with pytest.raises(LinearizeError, match="LINEARIZE_FUSED_STEP='yes' is not one of auto, on, off; unset it") as info:
            triton_rope.rotary_problem(q, k, cos, sin)
    assert "\n" not in str(info.value)
