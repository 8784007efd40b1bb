"""Prefill memory: no tensor grows with the square of the prompt, window ops run in bounded blocks, a cache owns
its storage (it keeps no prefill alive), and bench measures in bfloat16 on CUDA (BENCHMARKS.md, "Prefill memory
and decode time, profiled")."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import linearize
from linearize.evaluate.speed import benchmark, default_dtype
from linearize.hf import ops_window
from linearize.hf.cache import MixerState, returned_cache
from linearize.hf.ops_window import chunk_window_linear
from linearize.hf.windows import window_attention
from tests.tiny import random_ids, tiny_model

LENGTH = 2048
VOCAB = 1024
# LENGTH^2 > LENGTH x VOCAB > every tensor a prefill needs: a score matrix or the logits of every position would
# exceed the bound, per-token activations and chunked intermediates stay under it.
BOUND = LENGTH * VOCAB


class LargestTensor(TorchDispatchMode):
    """Records the most elements any operator's output had, and which operator made it."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.record(out, func)
        return out

    def record(self, out, func) -> None:
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.op = tensor.numel(), str(func)


def small_model():
    return tiny_model(
        "llama", dtype=torch.float32, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=2 * LENGTH,
    )


PLANS = {
    "teacher": None,
    "hedgehog_swa": ("hedgehog_swa", dict(window=64)),
    "hedgehog": ("hedgehog", {}),
    "gated_deltanet": ("gated_deltanet", dict(window=16)),
    "gla": ("gla", {}),
    "mamba2": ("mamba2", dict(window=16)),
    "swa": ("swa", dict(window=16)),
    "hybrid": ("gated_deltanet", dict(keep_attention=[1])),
}


def converted(plan):
    model = small_model()
    return model if PLANS[plan] is None else linearize.convert(model, PLANS[plan][0], **PLANS[plan][1])


@pytest.mark.parametrize("plan", PLANS)
def test_no_prefill_tensor_grows_with_the_square_of_the_prompt(plan):
    model = converted(plan)
    with torch.no_grad(), LargestTensor() as largest:
        out = model(random_ids(1, LENGTH), use_cache=True, logits_to_keep=1)
    assert out.logits.shape == (1, 1, VOCAB)
    assert largest.numel < BOUND, f"{largest.op} made {largest.numel} elements"


def test_teacher_mode_and_generate_keep_the_prefill_linear():
    model = converted("hedgehog_swa")
    with torch.no_grad(), linearize.teacher_mode(model), LargestTensor() as largest:
        model(random_ids(1, LENGTH), use_cache=True, logits_to_keep=1)
    assert largest.numel < BOUND, f"teacher_mode: {largest.op} made {largest.numel} elements"
    ids = random_ids(1, LENGTH)
    with torch.no_grad(), LargestTensor() as largest:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert largest.numel < BOUND, f"generate: {largest.op} made {largest.numel} elements"


@pytest.mark.parametrize("plan", [p for p in PLANS if p != "teacher"])
def test_a_cache_owns_its_storage(plan):
    """A state tensor that is a view into the prefill would keep the whole prompt's activations alive."""
    model = converted(plan)
    with torch.no_grad():
        cache = returned_cache(model(random_ids(1, 300), use_cache=True, logits_to_keep=1))
    states = [layer for layer in cache.layers if isinstance(layer, MixerState)]
    assert states
    for layer in states:
        for name, tensor in layer.tensors.items():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(ops_window, "BLOCK_ELEMENTS", 1 << 17)
    monkeypatch.setattr(ops_window, "MIN_BLOCK_TOKENS", 1)


def test_window_ops_hold_one_block_at_a_time(small_blocks):
    """In one pass, the scores alone would be 6 x 4096 x 32 (window + linear) or x 128 (window) elements."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 4096, 8, generator=g) for _ in range(2))
    v, fq, fk = (torch.randn(2, 3, 4096, 6, generator=g).softmax(-1) for _ in range(3))
    largest_input = q.numel()
    with LargestTensor() as largest:
        chunk_window_linear(q, k, v, fq, fk, window=16, scaling=0.3, chunk_size=16, output_state=True)
    assert largest.numel <= max(2 * ops_window.BLOCK_ELEMENTS, largest_input), f"{largest.op} made {largest.numel}"
    with LargestTensor() as largest:
        window_attention(q, k[:, :1], v[:, :1], window=16, scaling=0.3)
    assert largest.numel <= max(2 * ops_window.BLOCK_ELEMENTS, largest_input), f"{largest.op} made {largest.numel}"


def test_bench_measures_in_bfloat16_on_cuda_unless_told():
    assert default_dtype(None, "cuda") == "bfloat16"
    assert default_dtype(None, "cuda:1") == "bfloat16"
    assert default_dtype(None, "cpu") is None  # the loader's float32
    assert default_dtype("float32", "cuda") == "float32"
    results = benchmark(linearize.convert(tiny_model(), "gla"), lengths=[16], decode_tokens=1, teacher=False, progress=False)
    assert results.settings["dtype"] == "float64"  # a model object is measured in its own dtype
