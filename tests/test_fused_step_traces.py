"""The fused decode step's glue (`FusedStepMixer.fuses_step`, `step_state`, `fused_step`) inside a compiled decode
step: dynamo must trace a whole static-cache step as one graph. A graph break there split the step at every layer,
and dynamo then recompiled the layer's frame once per layer index until it gave up, so a compiled fused step decoded
slower than the PyTorch path (H200, eleventh session). The kernels themselves cannot be traced on the CPU (the
interpreter needs real data), so a PyTorch stand-in that updates the state in place takes their place here;
test_gpu.py compiles the real step on CUDA. In the `core` subset: torch 2.11's dynamo broke the graph where 2.13's does
not."""

import pytest
import torch

import linearize
from linearize.hf import triton_step
from linearize.hf.mixers import FusedStepMixer, mixers_in
from tests.tiny import random_ids, tiny_model

needs_triton = pytest.mark.skipif(
    triton_step.TRITON_PROBLEM is not None or not triton_step.INTERPRETED,
    reason=f"the fused step is taken on CPU tensors only under Triton's interpreter: {triton_step.TRITON_PROBLEM or 'not interpreted'}",
)


def stand_in(self, hidden_states, q, k, v, cos, sin, real, tensors):
    """In place, as the kernels: every state tensor is written (with what it holds), and the heads are q's."""
    for tensor in tensors.values():
        tensor.copy_(tensor.clone())
    return q.clone()


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("mixer", sorted(triton_step.OPS))
def test_a_compiled_static_cache_step_through_the_fused_step_is_one_graph(monkeypatch, mixer):
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "on")
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    model = linearize.convert(tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=4, num_key_value_heads=2), mixer, window=4).eval()
    kind = type(mixers_in(model)[0])
    assert issubclass(kind, FusedStepMixer)
    taken = []
    monkeypatch.setattr(kind, "launch_step", lambda *args: taken.append(1) or stand_in(*args))
    ids = random_ids(1, 12)
    cache = model.new_cache(32)
    keyword = linearize.hf.cache.cache_keyword(model)
    with torch.no_grad():
        logits = model(input_ids=ids, **{keyword: cache}, cache_position=torch.arange(12)).logits
        step = dict(input_ids=logits[:, -1:].argmax(-1), cache_position=torch.tensor([12]), **{keyword: cache})
        explained = torch._dynamo.explain(model)(**step)
    assert taken, "the decode step did not take the fused step"
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1
