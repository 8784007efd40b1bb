"""The fused `hedgehog_swa` prefill (triton_window.py) against `naive_window_linear`, on the CPU through Triton's
interpreter: outputs and next states at awkward lengths and windows, with grouped heads, a carried state, left padding,
a softcap and per-head weights, in float32 and bfloat16; a tiny model's generation through it; and where it is left to
PyTorch. test_triton_step.py compiles the kernel for sm_90; test_gpu.py checks it on CUDA. Skipped where Triton is not
installed. The interpreter is slow, so the shapes are small (head dim 16, feature maps 32 wide)."""

import pytest
import torch

import linearize
from linearize import LinearizeError
from linearize.hf import mixer_hedgehog, triton_step, triton_window
from linearize.hf.ops_window import naive_window_linear
from tests.test_triton_step import assert_close, kernel_calls, left_to_pytorch_when_off_or_float64
from tests.tiny import compiled_twice, left_padded, random_ids, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

needs_triton = pytest.mark.skipif(
    triton_step.TRITON_PROBLEM is not None or not triton_step.INTERPRETED,
    reason=f"runs Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, which conftest sets where there is no CUDA; on a "
    f"GPU, test_gpu.py checks the kernel): {triton_step.TRITON_PROBLEM or 'not interpreted'}",
)

HEADS, KV_HEADS, DIM, WIDTH = 4, 2, 16, 32


def window_inputs(length, window, dtype, with_state, device="cpu", shape=(2, HEADS, KV_HEADS, DIM, WIDTH), seed=0):
    """q, k, v (dtype), fq, fk (float32 softmax feature maps, as Hedgehog's), a key mask with row 0 left-padded by 3
    (where `length` allows), and a state per kv head as the PyTorch path leaves it (or None): its window - 1 keys with
    some pads among them, and S, z that carry some weight."""
    batch, heads, kv_heads, dim, width = shape
    g = torch.Generator(device).manual_seed(seed)

    def r(*size):
        return torch.randn(*size, generator=g, device=device)

    q, k, v = r(batch, heads, length, dim).to(dtype), r(batch, kv_heads, length, dim).to(dtype), r(batch, kv_heads, length, dim).to(dtype)
    fq, fk = torch.softmax(r(batch, heads, length, width), -1), torch.softmax(r(batch, kv_heads, length, width), -1)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask[0, : min(3, length - 1)] = False
    state = None
    if with_state:
        keep = window - 1
        state = {
            "S": r(batch, kv_heads, width, dim).abs() * 4, "z": r(batch, kv_heads, width).abs() * 4,
            "k": r(batch, kv_heads, keep, dim).to(dtype), "v": r(batch, kv_heads, keep, dim).to(dtype),
            "fk": torch.softmax(r(batch, kv_heads, keep, width), -1), "mask": r(batch, keep) > -1.0,
        }
    return q, k, v, fq, fk, mask, state


def per_query_head(x, groups):
    return x.repeat_interleave(groups, dim=1)


def reference(q, k, v, fq, fk, state, **options):
    """`naive_window_linear` on every query head's own copy of its kv head's keys and state, and its next state per kv
    head."""
    groups = q.shape[1] // k.shape[1]
    repeated = None if state is None else {n: per_query_head(t, groups) if t.dim() > 2 else t for n, t in state.items()}
    o, new = naive_window_linear(
        q, per_query_head(k, groups), per_query_head(v, groups), fq, per_query_head(fk, groups), state=repeated, output_state=True, **options
    )
    return o, {n: t[:, ::groups] if t.dim() > 2 else t for n, t in new.items()}


# (length, window, dtype, carried state, softcap, per-head weights). Windows 1, 3, 64, and 100 (more than a tile and a
# prefix chunk together, 96); lengths around the tiles (32) and the prefix chunks (64).
FP32, BF16 = torch.float32, torch.bfloat16
CASES = [
    (1, 1, FP32, False, None, True),
    (2, 3, FP32, True, 2.0, True),
    (63, 64, FP32, True, None, False),
    (65, 3, FP32, False, None, True),
    (130, 64, FP32, True, 3.0, True),
    (130, 100, FP32, False, None, True),
    (1, 64, FP32, True, None, True),
    (65, 64, BF16, True, None, True),
    (130, 3, BF16, False, 3.0, True),
]

def case_ids(cases) -> list[str]:
    """Test ids of (length, window, dtype, with_state, softcap, per_head) cases."""
    return [f"T{t}-w{w}-{str(d)[6:]}{'-state' if s else ''}{'-softcap' if c else ''}{'-per_head' if p else ''}" for t, w, d, s, c, p in cases]


# Relative to the largest output: float32 to rounding; bfloat16 inputs round the window's weights and the linear ones to
# bfloat16 before they meet the values (as on the GPU), about an ulp of the output.
TOLERANCE = {FP32: 2e-5, BF16: 1e-2}


@needs_triton
@pytest.mark.parametrize(
    "length,window,dtype,with_state,softcap,per_head",
    # the oldest versions' run takes the cases up to 65 tokens; those at 130 run on the newest versions only
    [pytest.param(*case, id=name, marks=pytest.mark.core if case[0] <= 65 else ()) for case, name in zip(CASES, case_ids(CASES))],
)
def test_the_kernel_equals_the_reference(length, window, dtype, with_state, softcap, per_head):
    q, k, v, fq, fk, mask, state = window_inputs(length, window, dtype, with_state)
    share = torch.rand(HEADS, generator=torch.Generator().manual_seed(1)) if per_head else torch.tensor(0.3)
    options = dict(window=window, scaling=DIM**-0.5, sm_weight=share, ln_weight=1 - share, key_mask=mask, softcap=softcap)
    with torch.no_grad():
        o, new = triton_window.window_linear_prefill(q, k, v, fq, fk, state=state, output_state=True, **options)
        expected, expected_state = reference(q, k, v, fq, fk, state, **options)
    assert_same_prefill(o, new, expected, expected_state, dtype)


def assert_same_prefill(o, new, expected, expected_state, dtype):
    """The kernel's heads and next state are the reference's: the heads to `dtype`'s tolerance, the window's tail copied,
    S and z summed in another order."""
    assert o.dtype == expected.dtype and o.shape == expected.shape
    assert_close(o, expected, "heads", TOLERANCE[dtype])
    assert new.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert new[name].dtype == tensor.dtype and new[name].shape == tensor.shape, name
        if name in ("S", "z"):
            assert_close(new[name], tensor, name, 1e-6)
        else:
            assert torch.equal(new[name], tensor), name


# No key mask and no carried state (a fresh cache's prefill, unpadded): the prefix sums skip the mask, and the next
# state is read off the prefix states at a chunk's edge (128 keys, window 1: every key folded, the last chunk whole), a
# chunk past it (200 keys, window 3) and before the first edge (150 keys, window 100: 99 kept, 51 folded).
@needs_triton
@pytest.mark.parametrize("length,window,dtype", [pytest.param(128, 1, FP32, marks=pytest.mark.core), (200, 3, BF16), (150, 100, FP32)])
def test_an_unmasked_prefill_of_a_fresh_state_equals_the_reference(length, window, dtype):
    q, k, v, fq, fk, _, _ = window_inputs(length, window, dtype, False)
    options = dict(window=window, scaling=DIM**-0.5, sm_weight=0.4, ln_weight=0.6)
    with torch.no_grad():
        o, new = triton_window.window_linear_prefill(q, k, v, fq, fk, output_state=True, **options)
        expected, expected_state = reference(q, k, v, fq, fk, None, **options)
    assert_same_prefill(o, new, expected, expected_state, dtype)


@needs_triton
def test_an_unmasked_prefills_gradients_equal_the_references():
    """The gradients through the prefix sums that skip the mask, 70 keys (a second chunk, read by the second query
    block), against float64 autograd through the reference."""
    q, k, v, fq, fk, _, _ = window_inputs(70, 3, FP32, False)
    share = torch.rand(HEADS, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, HEADS, 70, DIM, generator=torch.Generator().manual_seed(2))
    options = dict(window=3, scaling=DIM**-0.5)
    got = gradients(q, k, v, fq, fk, share, None, grad, triton_window.window_linear_prefill, **options)
    expected = gradients(q, k, v, fq, fk, share, None, grad, reference, **options)
    for name, mine, theirs in zip(GRADIENT_NAMES, got, expected):
        assert_close(mine, theirs, name, GRADIENT_TOLERANCE[FP32])


def gradients(q, k, v, fq, fk, share, state, grad, through, **options):
    """The gradients of (o * grad).sum() for q, k, v, fq, fk, the weights and the state's S and z (where there is a
    state), o from `through` (the kernel, or `reference` in float64)."""
    double = through is reference
    cast = (lambda t: t.detach().double()) if double else (lambda t: t.detach().clone())
    leaves = [cast(t).requires_grad_() for t in (q, k, v, fq, fk, share, 1 - share)]
    inputs = leaves[:5]
    carried = None
    if state is not None:
        carried = {n: cast(t).requires_grad_() if n in ("S", "z") else cast(t) if t.is_floating_point() and double else t for n, t in state.items()}
        leaves += [carried["S"], carried["z"]]
    if double:
        o = reference(*inputs, carried, sm_weight=leaves[5], ln_weight=leaves[6], **options)[0]
    else:
        o = triton_window.window_linear_prefill(*inputs, state=carried, sm_weight=leaves[5], ln_weight=leaves[6], **options)[0]
    return torch.autograd.grad((o * grad.to(o.dtype)).sum(), leaves)


GRADIENT_NAMES = ("q", "k", "v", "fq", "fk", "sm_weight", "ln_weight", "S", "z")
# (length, window, dtype, carried state, softcap, per-head weights): the forward's windows and lengths, fewer of them;
# in each dtype (its own blocks, BACKWARD) a case whose later query blocks read a prefix state past the first.
# Where no query has a linear key nor a state, the output does not depend on the weights: their gradients are 0 and
# float32's rounding, so the cases with windows longer than the prompt carry a state.
GRADIENT_CASES = [
    (1, 1, FP32, True, None, True),
    (2, 3, FP32, True, 2.0, True),
    (63, 64, FP32, True, 3.0, False),
    (110, 100, FP32, False, 3.0, True),
    (65, 64, BF16, True, None, True),
    (65, 3, BF16, False, 3.0, True),
]
# Relative to the largest gradient entry, against float64: float32 to rounding (8e-6 seen, sm_weight's, a sum that
# cancels); bfloat16 (5e-3 seen) rounds do, the weights and the score gradients to bfloat16 before their products, as
# flash attention's backward does.
GRADIENT_TOLERANCE = {FP32: 2e-5, BF16: 1e-2}


# The oldest versions' run (-m core) takes the bfloat16 cases and float32's short ones; float32's at 63 and 110 tokens
# (20 s on 2 cores) are the same code at more lengths, and run on the newest versions only.
GRADIENT_PARAMS = [
    pytest.param(*case, id=name, marks=() if case[2] is FP32 and case[0] > 60 else pytest.mark.core)
    for case, name in zip(GRADIENT_CASES, case_ids(GRADIENT_CASES))
]


@needs_triton
@pytest.mark.parametrize("length,window,dtype,with_state,softcap,per_head", GRADIENT_PARAMS)
def test_the_kernels_gradients_equal_the_references(length, window, dtype, with_state, softcap, per_head):
    """Every input's gradient through the kernel's backward against torch.autograd through `naive_window_linear` in
    float64, with grouped heads, row 0 left-padded and a carried state whose S and z take gradients."""
    q, k, v, fq, fk, mask, state = window_inputs(length, window, dtype, with_state)
    share = torch.rand(HEADS, generator=torch.Generator().manual_seed(1)) if per_head else torch.full((HEADS,), 0.3)
    grad = torch.randn(2, HEADS, length, DIM, generator=torch.Generator().manual_seed(2))
    options = dict(window=window, scaling=DIM**-0.5, key_mask=mask, softcap=softcap)
    got = gradients(q, k, v, fq, fk, share, state, grad, triton_window.window_linear_prefill, **options)
    expected = gradients(q, k, v, fq, fk, share, state, grad, reference, **options)
    assert len(got) == len(expected) == (9 if with_state else 7)
    for name, mine, theirs, given in zip(GRADIENT_NAMES, got, expected, (q, k, v, fq, fk, share, share, None, None)):
        assert given is None or (mine.dtype == given.dtype and mine.shape == given.shape), name
        assert_close(mine, theirs, name, GRADIENT_TOLERANCE[dtype])


@needs_triton
def test_bf16_feature_products_in_training_keep_the_gradients_within_bfloat16s_tolerance(monkeypatch):
    """With LOW_FEATURES_IN_TRAINING (the default) the training kernels multiply fq, fk, the prefix states and the linear
    weights' gradients as bf16 operands (as autocast's PyTorch form does): every gradient stays within bf16's tolerance
    of float64 autograd, across a carried state and several prefix states (65 tokens, window 3), and the feature
    gradients move off the float32 products' (the switch reaches the kernels)."""
    q, k, v, fq, fk, mask, state = window_inputs(65, 3, BF16, True, shape=(1, HEADS, KV_HEADS, DIM, WIDTH))
    share = torch.rand(HEADS, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(1, HEADS, 65, DIM, generator=torch.Generator().manual_seed(2))
    options = dict(window=3, scaling=DIM**-0.5, key_mask=mask, softcap=3.0)
    expected = gradients(q, k, v, fq, fk, share, state, grad, reference, **options)
    monkeypatch.setattr(triton_window, "LOW_FEATURES_IN_TRAINING", False)
    in_float32 = gradients(q, k, v, fq, fk, share, state, grad, triton_window.window_linear_prefill, **options)
    monkeypatch.setattr(triton_window, "LOW_FEATURES_IN_TRAINING", True)
    got = gradients(q, k, v, fq, fk, share, state, grad, triton_window.window_linear_prefill, **options)
    for name, mine, theirs in zip(GRADIENT_NAMES, got, expected):
        assert_close(mine, theirs, name, GRADIENT_TOLERANCE[BF16])
    assert not torch.equal(got[3], in_float32[3]) and not torch.equal(got[4], in_float32[4])


@pytest.mark.core
@needs_triton
def test_the_window_max_gradient_goes_to_the_first_of_equal_keys():
    """m_t's gradient goes to its top key's score; where two keys tie (here every key is repeated), the kernel gives it
    to the earlier one and torch's amax splits it between them: every gradient but k's is the reference's, and k's
    summed over each pair of equal keys."""
    q, k, v, fq, fk, mask, _ = window_inputs(40, 3, FP32, False)
    k = k[:, :, ::2].repeat_interleave(2, dim=2)
    share = torch.rand(HEADS, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, HEADS, 40, DIM, generator=torch.Generator().manual_seed(2))
    options = dict(window=3, scaling=DIM**-0.5, key_mask=mask, softcap=None)
    got = gradients(q, k, v, fq, fk, share, None, grad, triton_window.window_linear_prefill, **options)
    expected = gradients(q, k, v, fq, fk, share, None, grad, reference, **options)
    for name, mine, theirs in zip(GRADIENT_NAMES, got, expected):
        if name == "k":
            assert_close(mine.unflatten(2, (20, 2)).sum(3), theirs.unflatten(2, (20, 2)).sum(3), "k, pairs summed", 2e-5)
            assert not torch.allclose(mine.double(), theirs, atol=1e-3), "no pair tied at a window's top"
        else:
            assert_close(mine, theirs, name, 2e-5)


@pytest.mark.core
@needs_triton
def test_the_custom_op_computes_what_the_eager_launch_does():
    q, k, v, fq, fk, mask, _ = window_inputs(40, 5, FP32, False)
    weights = torch.full((HEADS,), 0.5)
    prefix = triton_window.prefix_states(fk, v, mask, torch.zeros(2, KV_HEADS, WIDTH, DIM), torch.zeros(2, KV_HEADS, WIDTH), triton_window.CHUNK)
    args = (q, k, v, fq, fk, mask, *prefix, weights, weights, 5, 0.25, None)
    with torch.no_grad():
        assert torch.equal(triton_window.window_prefill(*args), triton_window.OP(*args))


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("length,masked,dtype", [(1, True, FP32), (64, False, BF16), (65, True, FP32), (200, True, BF16), (130, False, FP32)])
def test_the_prefix_state_kernels_equal_the_pytorch_sums(monkeypatch, length, masked, dtype):
    """The prefix states of an inference prefill (two kernels: each chunk's sums, then their running sums) equal the
    PyTorch path's (which autograd takes in training), from a carried state, with pads masked or not read, v strided as
    a projection leaves it, at lengths on, past and before a chunk's edge (64), the running sums taken in tiles of 2
    chunks (the last one part empty)."""
    monkeypatch.setattr(triton_window, "SCAN_TILE", 2)
    _, _, _, _, fk, mask, state = window_inputs(length, 4, dtype, True)
    v = torch.randn(2, length, KV_HEADS, DIM, generator=torch.Generator().manual_seed(5)).to(dtype).transpose(1, 2)
    mask[1, length // 2] = False
    S = state["S"].requires_grad_(True)
    with torch.no_grad():
        got = triton_window.prefix_states(fk, v, mask, S, state["z"], triton_window.CHUNK, masked=masked)
    expected = triton_window.prefix_states(fk, v, mask, S, state["z"], triton_window.CHUNK, masked=masked)
    assert expected[0].requires_grad and not got[0].requires_grad  # the PyTorch path, and the kernels
    chunks = -(-length // triton_window.CHUNK)
    for name, mine, theirs in zip(("S", "z"), got, expected):
        assert mine.shape == theirs.shape and mine.shape[2] == chunks and mine.dtype == torch.float32
        assert_close(mine, theirs.detach(), f"prefix {name}", 1e-6)
    assert torch.equal(got[0][:, :, 0], state["S"]) and torch.equal(got[1][:, :, 0], state["z"])
    with torch.no_grad():  # the custom op, as a compiled model calls it
        op = triton_window.PREFIX_OP(fk, v, mask, state["S"], state["z"], triton_window.CHUNK, masked)
    assert all(torch.equal(a, b) for a, b in zip(op, got))


@pytest.fixture
def fused(monkeypatch):
    """hedgehog_swa's prefills take the kernel (CPU tensors through the interpreter); returns the list of their output
    shapes."""
    return kernel_calls(monkeypatch, mixer_hedgehog, "window_linear_prefill", lambda args, out: out[0].shape)


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("window", [1, 4])
def test_generation_through_the_kernel_equals_uncached_and_the_pytorch_path(fused, monkeypatch, window):
    """A tiny two-layer model (4 query heads on 2 kv heads), left-padded batch: greedy generation with a cache (the
    prompt through the kernel, then the fused decode step) gives the PyTorch path's logits and the tokens of uncached
    generation (every step a prefill through the kernel); and a prompt taken in two prefills, the second from the
    first's state, gives the logits of one."""
    model = linearize.convert(tiny_model(dtype=torch.float32, num_hidden_layers=2), "hedgehog_swa", window=window)
    ids, mask = left_padded(random_ids(2, 7), [2, 0])
    settings = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )
    generated = model.generate(**settings)
    assert fused == [(2, 4, 7, 16)] * 2  # each layer's prompt
    assert torch.equal(generated.sequences, model.generate(**settings, use_cache=False).sequences)
    assert len(fused) == 2 + 2 * 4
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :3], attention_mask=mask[:, :3], cache=cache, use_cache=True)
        second = model(ids[:, 3:], attention_mask=mask, cache=cache, use_cache=True).logits
        whole = model(ids, attention_mask=mask).logits
    assert_close(second, whole[:, 3:], "logits of a prompt in two prefills", 1e-5)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    calls = len(fused)
    assert_close(torch.stack(generated.logits), torch.stack(model.generate(**settings).logits), "logits", 1e-5)
    assert len(fused) == calls


def training_step(window: int):
    """A tiny two-layer hedgehog_swa model (4 query heads on 2 kv heads), every parameter trained, its window's share away
    from one half (so that its gradient is not near 0), and a step on a left-padded batch that returns the loss and
    every parameter's gradient."""
    model = linearize.convert(tiny_model(dtype=torch.float32, num_hidden_layers=2), "hedgehog_swa", window=window)
    model.requires_grad_(True)
    ids, mask = left_padded(random_ids(2, 9), [3, 0])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("window_logit"):
                parameter.normal_(generator=torch.Generator().manual_seed(3))

    def step():
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    return model, step


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("window", [1, 3])
def test_a_training_step_through_the_kernel_equals_the_pytorch_paths(fused, monkeypatch, window):
    """The loss and every parameter's gradient through the kernel's backward equal the PyTorch path's."""
    _, step = training_step(window)
    loss, grads = step()
    assert fused == [(2, 4, 9, 16)] * 2
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    expected_loss, expected = step()
    assert len(fused) == 2
    assert_close(loss, expected_loss, "loss", 1e-6)
    assert grads.keys() == expected.keys() and any("window_logit" in name for name in grads)
    for name, tensor in expected.items():
        assert_close(grads[name], tensor, name, 1e-4)


@needs_triton
def test_a_mixed_precision_training_step_takes_the_kernels(fused, monkeypatch):
    """Under bf16 autocast (every GPU recipe's training) q and k leave the projections in bf16 and cos and sin come in
    float32: RoPE rotates in bf16, so the RoPE and window kernels both run (before, the rotation left q and k in float32
    beside a bf16 v, and both kernels fell back to PyTorch). The step equals the PyTorch path's under autocast to bf16's
    rounding, and a backward inside autocast keeps the kernel's float32 sums."""
    from linearize.hf import attention

    _, step = training_step(3)
    rotations = kernel_calls(monkeypatch, attention, "rotary", lambda args, out: out[0].dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = step()
    assert fused == [(2, 4, 9, 16)] * 2 and rotations == [torch.bfloat16] * 2
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected = step()
    assert len(fused) == 2 and len(rotations) == 2
    assert_close(loss, expected_loss, "loss", 2e-2)
    for name, tensor in expected.items():
        assert_close(grads[name], tensor, name, 5e-2)


@needs_triton
def test_a_compiled_training_step_equals_the_eager_one_through_the_kernel(fused, monkeypatch):
    """A recipe's compiled training step (`compile_layers`: one graph per decoder layer) runs the PyTorch form, which
    inductor fuses faster than the kernel's backward (`mixer_hedgehog.compiled_training`), and gives the loss and
    gradients of the eager step, which takes the kernel."""
    model, step = training_step(3)
    loss, grads = step()
    compiled_loss, compiled = compiled_twice(model, step)
    assert fused == [(2, 4, 9, 16)] * 2
    assert_close(compiled_loss, loss, "loss", 1e-6)
    for name, tensor in grads.items():
        assert_close(compiled[name], tensor, name, 1e-4)


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("masked", [True, False], ids=["key-mask", "no-key-mask"])
def test_a_compiled_inference_prefill_calls_the_kernels_ops_and_equals_the_eager_one(masked):
    """Compiled (a static cache's chunked prefill runs through transformers' compiled forward), the prefill calls the
    kernel's custom ops, whose fakes give the compiler their outputs: the same heads and next state as the eager call.
    The heads' fake passed `new_empty` a memory format, which it does not take: every compiled inference prefill through
    the kernel raised (H100, sixty-first session). Without a key mask, after a chunk that left a state, the prefill asked
    `bool()` of the state's dict, which torch 2.11's Dynamo does not trace: a graph break in every layer, 5.6x the
    teacher's prefill time at 4K (H100, sixty-third session); fullgraph fails on that (the oldest versions' run)."""
    q, k, v, fq, fk, mask, state = window_inputs(37, 8, torch.float32, True)
    mask = mask if masked else None

    def prefill(q, k, v, fq, fk, mask, state):
        return triton_window.window_linear_prefill(q, k, v, fq, fk, window=8, scaling=0.25, key_mask=mask, state=state, output_state=True)

    with torch.no_grad():
        eager_out, eager_state = prefill(q, k, v, fq, fk, mask, state)
        torch._dynamo.reset()
        out, new_state = torch.compile(prefill, backend="aot_eager", fullgraph=True)(q, k, v, fq, fk, mask, state)
    assert torch.equal(out, eager_out)
    assert new_state.keys() == eager_state.keys() and all(torch.equal(new_state[n], eager_state[n]) for n in eager_state)


@needs_triton
def test_the_prefill_is_left_to_pytorch_where_it_cannot_run(fused, monkeypatch):
    """Under LINEARIZE_KERNELS=torch or LINEARIZE_FUSED_STEP=off, or in float64, a prefill takes the PyTorch path; else
    the kernel, with gradients or without."""
    model = linearize.convert(tiny_model(dtype=torch.float32), "hedgehog_swa", window=4)
    ids = random_ids(1, 5)
    left_to_pytorch_when_off_or_float64(monkeypatch, model, ids, fused)
    model(ids)  # gradients on
    assert len(fused) == 2 * model.config.text_config.num_hidden_layers


@pytest.mark.core
@needs_triton
def test_the_problems_name_what_to_do(monkeypatch):
    q, k, v, fq, fk, _, _ = window_inputs(4, 3, FP32, False)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "auto")
    if not q.is_cuda:
        assert "CUDA tensors" in triton_window.window_prefill_problem(q, k, v, fq, fk, 3)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "on")
    with torch.no_grad():
        assert "head dimensions up to" in triton_window.kernel_problem(q, k, v, fq.repeat(1, 1, 1, 9), fk.repeat(1, 1, 1, 9), 3)
        assert "float16/bfloat16/float32" in triton_window.kernel_problem(q.double(), k, v, fq, fk, 3)
    assert triton_window.kernel_problem(q, k, v, fq, fk, 3) is None  # gradients on: training takes the kernel too


@pytest.mark.core
@needs_triton
def test_impossible_inputs_and_a_bad_switch_are_one_line_errors(monkeypatch):
    q, k, v, fq, fk, _, _ = window_inputs(4, 3, FP32, False)
    with torch.no_grad(), pytest.raises(LinearizeError, match="got 0, 4 on 2; for anything else call ops_window.chunk_window_linear") as info:
        triton_window.window_linear_prefill(q, k, v, fq, fk, window=0, scaling=0.25)
    assert "\n" not in str(info.value)
    with pytest.raises(LinearizeError, match="got 3, 3 on 2;"):
        with torch.no_grad():
            triton_window.window_linear_prefill(q[:, :3], k, v, fq[:, :3], fk, window=3, scaling=0.25)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "yes")
    with pytest.raises(LinearizeError, match="LINEARIZE_FUSED_STEP='yes' is not one of auto, on, off; unset it") as info:
        triton_window.window_prefill_problem(q, k, v, fq, fk, 3)
    assert "\n" not in str(info.value)
