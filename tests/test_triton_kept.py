"""The kept keys' prefill kernel (triton_kept.py) against the quadratic reference `naive_kept_window_linear` (float64),
beside the PyTorch path (`ops_kept._heads`) of the same dtype, on the CPU through Triton's interpreter: one call and
two carried by the state, left padding, grouped heads, a softcap and per-head weights, in float32 and bfloat16; the
state it leaves equals the PyTorch path's; a tiny model's generation through it; and where it is left to PyTorch.
test_kernels_compile.py compiles it for sm_90. Skipped where Triton is not installed. The interpreter is slow, so the
shapes are small (head dim 16, feature maps 10 wide)."""

import pytest
import torch

import linearize
from linearize.hf import ops_kept, ops_window, triton_kept, triton_step
from linearize.hf.ops_kept import kept_window_linear, naive_kept_window_linear
from tests.test_prefill_memory import LargestTensor
from tests.test_triton_step import assert_close, generation_through_a_prefill_kernel, kernel_calls
from tests.tiny import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

needs_triton = pytest.mark.skipif(
    triton_step.TRITON_PROBLEM is not None or not triton_step.INTERPRETED,
    reason=f"runs Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, which conftest sets where there is no CUDA): "
    f"{triton_step.TRITON_PROBLEM or 'not interpreted'}",
)

BATCH, HEADS, KV_HEADS, DIM, WIDTH = 2, 4, 2, 16, 10


def inputs(length, dtype, seed=0):
    """q, k, v in dtype, fq, fk float32 softmax feature maps, row 0 left-padded by 3, per-head weights."""
    g = torch.Generator().manual_seed(seed)

    def r(*size):
        return torch.randn(*size, generator=g)

    q, k, v = r(BATCH, HEADS, length, DIM).to(dtype), r(BATCH, KV_HEADS, length, DIM).to(dtype), r(BATCH, KV_HEADS, length, DIM).to(dtype)
    fq, fk = torch.softmax(r(BATCH, HEADS, length, WIDTH), -1), torch.softmax(r(BATCH, KV_HEADS, length, WIDTH), -1)
    mask = torch.ones(BATCH, length, dtype=torch.bool)
    mask[0, :3] = False
    share = torch.sigmoid(r(HEADS))
    return (q, k, v, fq, fk), dict(scaling=DIM**-0.5, sm_weight=share, ln_weight=1 - share, key_mask=mask)


def in_pieces(tensors, options, cuts):
    """kept_window_linear over the pieces between `cuts`, each carried by the state: the output and the last state."""
    state, outs = None, []
    for start, end in zip(cuts, cuts[1:]):
        piece = [t[:, :, start:end] for t in tensors]
        out, state = kept_window_linear(
            *piece, **{**options, "key_mask": options["key_mask"][:, start:end]}, state=state, position=start, output_state=True
        )
        outs.append(out)
    return torch.cat(outs, dim=2), state


# (window, keep, block): LoLCATs-like proportions, a block of 8 with more kept keys than a block, and window 1.
SIZES = [(5, 3, 4), (8, 7, 8), (1, 5, 3)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "w{}-n{}-b{}".format(*s))
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["", "softcap"])
def test_the_kernel_matches_the_reference_and_leaves_the_pytorch_paths_state(monkeypatch, dtype, sizes, softcap):
    window, keep, block = sizes
    tensors, options = inputs(37, dtype)
    options.update(window=window, keep=keep, block=block, softcap=softcap)
    expected = naive_kept_window_linear(*(t.double() for t in tensors), **{**options, "sm_weight": options["sm_weight"].double(),
                                                                           "ln_weight": options["ln_weight"].double()})
    calls = kernel_calls(monkeypatch, ops_kept, "kept_window_prefill", lambda args, out: out.shape)
    cuts = [0, 13, 37]  # the second call starts inside a block, with a carried state
    with torch.no_grad():
        fused, fused_state = in_pieces(tensors, options, cuts)
        assert len(calls) == 2
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
        plain, plain_state = in_pieces(tensors, options, cuts)
    assert len(calls) == 2 and fused.dtype == dtype
    # The PyTorch path of the same dtype is the measure of its rounding: the kernel within the tolerance and not far off it.
    error = (fused.double() - expected).abs().max().item() / expected.abs().max().item()
    baseline = (plain.double() - expected).abs().max().item() / expected.abs().max().item()
    assert error <= TOLERANCE[dtype] and error <= 4 * baseline + 1e-6, (error, baseline)
    for name, tensor in plain_state.items():
        assert_close(fused_state[name], tensor, name, 0)


class MadeTensors(LargestTensor):
    """LargestTensor but for the interpreter's byte copies of a kernel's arguments' storage (uint8, which none of the
    kept keys' operations makes), which a GPU does not make."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in (out if isinstance(out, (tuple, list)) else (out,))):
            self.record(out, func)
        return out


@needs_triton
def test_the_kernels_segments_are_longer_with_no_larger_tensor(monkeypatch):
    """The kernel scores without materialising the scores, so a long prefill through it runs in longer segments than
    the PyTorch path's (`ops_kept.segment_length`: fewer segments, fewer host-bound operations), to the same heads and
    state as one pass, and no tensor it makes grows past the bound the PyTorch path keeps."""
    tensors, options = inputs(150, torch.float32)
    options.update(window=5, keep=24, block=8)
    with torch.no_grad():
        whole, whole_state = kept_window_linear(*tensors, **options, output_state=True)
    monkeypatch.setattr(ops_window, "BLOCK_ELEMENTS", 8192)
    monkeypatch.setattr(ops_window, "MIN_BLOCK_TOKENS", 1)
    lengths = kernel_calls(monkeypatch, ops_kept, "_kept_segment", lambda args, out: args[0].shape[2])
    runs = {}
    for switch in ("off", "on"):
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", switch)
        lengths.clear()
        with torch.no_grad(), MadeTensors() as largest:
            runs[switch] = kept_window_linear(*tensors, **options, output_state=True)
        runs[switch] += (list(lengths), largest.numel)
    assert runs["off"][2] == [16] * 9 + [6] and runs["on"][2] == [72, 72, 6]
    assert runs["on"][3] <= max(2 * ops_window.BLOCK_ELEMENTS, tensors[0].numel()), runs["on"][3]
    for out, state, _, _ in runs.values():
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
        for name, tensor in whole_state.items():
            assert_close(state[name], tensor, name, 1e-5)


@needs_triton
def test_the_custom_op_computes_what_the_eager_launch_does(monkeypatch):
    """A compiled model calls the registered op (`OP`), eager code launches the kernel itself: the same heads, bit for
    bit."""
    tensors, options = inputs(23, torch.float32)
    options.update(window=5, keep=3, block=4)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "on")
    outs = []
    for launch in (triton_kept.kept_prefill, triton_kept.OP):
        monkeypatch.setattr(triton_kept, "kept_prefill", launch)
        with torch.no_grad():
            outs.append(kept_window_linear(*tensors, **options)[0])
    assert torch.equal(outs[0], outs[1])


@needs_triton
def test_generation_through_the_kernel_equals_uncached_and_the_pytorch_path(monkeypatch):
    model = linearize.convert(tiny_model(dtype=torch.float32, num_hidden_layers=2), "hedgehog_swa", window=4, keep=3, keep_block=4)
    calls = kernel_calls(monkeypatch, ops_kept, "kept_window_prefill", lambda args, out: out.shape)
    first = generation_through_a_prefill_kernel(model, calls, monkeypatch)
    assert len(first) == 2  # each layer's prefill


@needs_triton
def test_it_is_left_to_pytorch_with_gradients_or_switched_off(monkeypatch):
    tensors, options = inputs(9, torch.float32)
    q, k, v, fq, _ = tensors
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "on")
    assert triton_kept.kept_prefill_problem(q, k, v, fq) is None
    assert "one dtype" in triton_kept.kept_prefill_problem(q.double(), k, v, fq)
    assert "no backward" in triton_kept.kept_prefill_problem(q.clone().requires_grad_(), k, v, fq)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    assert "turned off" in triton_kept.kept_prefill_problem(q, k, v, fq)
