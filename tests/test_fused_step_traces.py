"""The fused decode step's glue (`FusedStepMixer.fuses_step`, `step_state`, `fused_step`) inside a compiled decode
step: dynamo must trace a whole static-cache step as one graph. A graph break there split the step at every layer,
and dynamo then recompiled the layer's frame once per layer index until it gave up, so a compiled fused step decoded
slower than the PyTorch path (H200, eleventh session). The kernels themselves cannot be traced on the CPU (the
interpreter needs real data), so a PyTorch stand-in that updates the state in place takes their place here;
test_gpu.py compiles the real step on CUDA. In the `core` subset: torch 2.11's dynamo broke the graph where 2.13's does
not."""

import copy

import pytest
import torch

import linearize
from linearize.hf import triton_step
from linearize.hf.mixers import FusedStepMixer, mixers_in
from tests.test_triton_step import window_option
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
    teacher = tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    model = linearize.convert(teacher, mixer, **window_option(mixer, 4)).eval()
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


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("mixer", sorted(triton_step.OPS))
def test_a_compiled_static_cache_step_writes_only_static_inputs(monkeypatch, mixer):
    """CUDA-graph trees record a compiled step only where every graph input it writes has a static address: the
    state's tensors (the static cache marks them) and parameters. Through the real fused op, with the padding mask
    generate() passes: what the step writes is the op's declared state, and the mask, a graph input, is only read. (On
    an H200, with the op seen through by inductor, its kernels were taken to write the mask too, and CUDA graphs were
    skipped: thirteenth session.) The compiled step's logits and state equal the eager fused step's (to float32
    rounding: the traced graph decomposes some ops)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "on")
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    model = linearize.convert(
        tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3),
        mixer, keep_attention=[0], **window_option(mixer, 4),
    ).eval()
    graphs = []

    def inspected(graph, inputs):
        meta = torch._guards.TracingContext.try_get().fw_metadata
        graphs.append(([i for i, info in enumerate(meta.input_info) if info.mutates_data], set(meta.static_input_indices), inputs))
        return graph.forward

    ids = random_ids(1, 12)
    cache = model.new_cache(32)
    keyword = linearize.hf.cache.cache_keyword(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones(1, 12, dtype=torch.long), **{keyword: cache}, cache_position=torch.arange(12)).logits
        step = dict(input_ids=logits[:, -1:].argmax(-1), attention_mask=torch.ones(1, 13, dtype=torch.long), cache_position=torch.tensor([12]))
        eager_cache = copy.deepcopy(cache)
        expected = model(**step, **{keyword: eager_cache}).logits
        compiled = torch.compile(model, backend=lambda gm, inputs: aot_module_simplified(gm, inputs, fw_compiler=inspected))
        got = compiled(**step, **{keyword: cache}).logits
    assert len(graphs) == 1
    written, static, inputs = graphs[0]
    assert len(written) >= 2 * len(triton_step.WINDOW_CACHE)  # two converted layers' windows at least
    assert set(written) <= static, [tuple(inputs[i].shape) for i in written if i not in static]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(cache.layers[1:], eager_cache.layers[1:]):
        assert mine.tensors.keys() == theirs.tensors.keys()
        for name in mine.tensors:
            torch.testing.assert_close(mine.tensors[name], theirs.tensors[name], rtol=1e-5, atol=1e-6)
