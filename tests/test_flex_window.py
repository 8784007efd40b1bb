"""The fused window (`windows.flex_window`, flex_attention) against the quadratic reference.

On the CPU, flex_attention runs uncompiled (its dense form, which applies the mask everywhere) for outputs and
gradients, and compiled once, where the block mask decides which tiles run; the block mask itself is checked
tile by tile against torch's `create_block_mask`. The tests marked `gpu` run the compiled Triton kernels on
CUDA: `python -m pytest -q -m gpu tests/test_flex_window.py`.
"""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from linearize import LinearizeError
from linearize.hf import windows
from linearize.hf.attention import AttentionSpec, repeat_heads, softmax_attention
from linearize.hf.windows import flex_window, use_flex, window_attention

SCALING = 0.5
LIMIT = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_near(got, ref, dtype):
    """Largest error within LIMIT of the reference's largest entry (at least 1: some gradients are all 0)."""
    error = (got.double() - ref).abs().max().item()
    assert error <= LIMIT[dtype] * max(ref.abs().max().item(), 1.0), error


def window_inputs(length, context, padded, heads=(6, 2), dim=16, device="cpu", seed=0):
    """q (2, H, T, D) for the last T of S = context + T keys k, v (2, Hkv, S, D) in float64, and the key mask
    (row 0 left-padded by 5, so its first queries see no key; None unpadded)."""
    g = torch.Generator(device).manual_seed(seed)
    total = context + length

    def r(h, n):
        return torch.randn(2, h, n, dim, generator=g, device=device, dtype=torch.float64)

    mask = torch.ones(2, total, dtype=torch.bool, device=device)
    mask[0, :5] = False
    return r(heads[0], length), r(heads[1], total), r(heads[1], total), (mask if padded else None)


def reference(q, k, v, window, softcap, mask):
    groups = q.shape[1] // k.shape[1]
    return softmax_attention(q, repeat_heads(k, groups), repeat_heads(v, groups), SCALING, window, softcap, mask)


def check_against_reference(fused, length, context, window, padded, softcap, dtype, **shape):
    """`fused` (q, k, v, mask) -> output, in `dtype`, against the float64 reference: output and gradients."""
    q, k, v, mask = window_inputs(length, context, padded, **shape)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = fused(*leaves, mask)
    assert out.dtype == dtype
    weights = torch.randn(out.shape, generator=torch.Generator(q.device).manual_seed(1), device=q.device, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves, window, softcap, mask)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_leaves)
    assert_near(out, ref, dtype)
    if mask is not None:
        assert not out[0, :, : max(0, 5 - context)].any()  # queries that see no real key
    for got, expected in zip(grads, ref_grads):
        assert_near(got, expected, dtype)


@pytest.fixture
def eager_flex(monkeypatch):
    """flex_attention uncompiled: its dense form, with a backward. torch refuses every backward on the CPU because
    its compiled CPU kernel has none; the dense form's is the one it runs uncompiled on any device."""
    monkeypatch.setattr(windows, "_compiled_flex", lambda: flex_attention)
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


def dense_tiles(num_blocks, indices, columns):
    valid = torch.arange(indices.shape[-1]) < num_blocks[..., None]
    tiles = torch.zeros(*indices.shape[:-1], columns + 1, dtype=torch.bool)
    return tiles.scatter_(-1, torch.where(valid, indices.long(), columns), True)[..., :columns]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("window", [1, 3, 64, 100, 128, 129, 400])
@pytest.mark.parametrize("length,context", [(1, 0), (7, 0), (65, 9), (129, 0), (300, 9), (300, 200)])
def test_block_mask_is_create_block_masks(length, context, window, padded):
    """Skipped, partial and full tiles, built from the window's arithmetic, are those torch finds by evaluating
    the mask at every position (what `create_block_mask` does, T x S, which the fused path avoids)."""
    total = length + context
    mask = torch.ones(2, total, dtype=torch.bool)
    mask[0, :150] = False  # whole tiles of padding, and one cut by the padding's end
    blocks = windows._window_blocks(length, total, window, torch.device("cpu"))
    if padded:
        blocks = windows._padded_blocks(blocks, mask, window)
    expected = create_block_mask(blocks.mask_mod, 2 if padded else None, None, length, total, device="cpu")
    columns = -(-total // windows.FLEX_BLOCK)
    for got, want in [
        ((blocks.kv_num_blocks, blocks.kv_indices), (expected.kv_num_blocks, expected.kv_indices)),
        ((blocks.full_kv_num_blocks, blocks.full_kv_indices), (expected.full_kv_num_blocks, expected.full_kv_indices)),
    ]:
        assert torch.equal(dense_tiles(*got, columns), dense_tiles(*want, columns))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_masks_are_made_once_per_shape_and_an_all_real_key_mask_uses_it(monkeypatch):
    seen = []

    def spy(*args, block_mask, **kwargs):
        seen.append(block_mask)
        return flex_attention(*args, block_mask=block_mask, **kwargs)

    monkeypatch.setattr(windows, "_compiled_flex", lambda: spy)
    q, k, v, _ = window_inputs(70, 9, False)
    q, k, v = q.float(), k.float(), v.float()
    flex_window(q, k, v, window=20, scaling=SCALING)
    flex_window(q, k, v, window=20, scaling=SCALING, key_mask=torch.ones(2, 79, dtype=torch.bool))
    padded = torch.ones(2, 79, dtype=torch.bool)
    padded[1, :3] = False
    flex_window(q, k, v, window=20, scaling=SCALING, key_mask=padded)
    assert seen[0] is seen[1] is windows._window_blocks(70, 79, 20, q.device)
    assert seen[0].kv_num_blocks.shape[0] == 1 and seen[2].kv_num_blocks.shape[0] == 2


# Half the lengths follow a prefix of 9 keys; without one, row 0's first queries see only padding.
CASES = [(length, window) for length in (1, 7, 63, 65, 129, 300) for window in (1, 3, 64, 100, length + 5)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length,window", CASES, ids=[f"T{t}-w{w}" for t, w in CASES])
def test_flex_matches_the_reference(eager_flex, length, window, dtype):
    """Grouped heads (6 on 2), left padding and a softcap."""

    def fused(q, k, v, mask):
        return flex_window(q, k, v, window=window, scaling=SCALING, softcap=5.0, key_mask=mask)

    check_against_reference(fused, length, 9 if length in (63, 65, 300) else 0, window, True, 5.0, dtype)


PLAIN = [(7, 3, 0), (65, 64, 0), (129, 100, 9), (300, 400, 0)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length,window,context", PLAIN, ids=[f"T{t}-w{w}-c{c}" for t, w, c in PLAIN])
def test_flex_without_mask_softcap_or_groups(eager_flex, length, window, context, dtype):
    """The shared per-shape block mask and no score_mod, through `window_attention`, which dispatches to it."""

    def fused(q, k, v, mask):
        return window_attention(q, k, v, window=window, scaling=SCALING, fused=True)

    check_against_reference(fused, length, context, window, False, None, dtype, heads=(4, 4))


def test_compiled_flex_on_the_cpu_uses_the_block_mask(monkeypatch):
    """One compile (the CPU kernel takes static shapes only): there the block mask, not the mask, decides which
    tiles run, so a tile wrongly skipped or wrongly full would show. Windows inside one tile, across tiles and
    longer than the input, with padding over whole tiles in one row and none in the other."""
    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_shapes", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "simdlen", None)  # flex's CPU kernel is vector code only (conftest)
    q, k, v, _ = window_inputs(300, 9, False)
    mask = torch.ones(2, 309, dtype=torch.bool)
    mask[0, :150] = False
    for window in (3, 100, 400):
        with torch.no_grad():
            out = window_attention(q.float(), k.float(), v.float(), window=window, scaling=SCALING, softcap=5.0, key_mask=mask, fused=True)
        assert_near(out, reference(q, k, v, window, 5.0, mask), torch.float32)


def test_dispatch_rule():
    q, k, v, _ = window_inputs(7, 0, False)
    assert not use_flex(q.float(), k.float(), v.float(), None)  # the CPU: the bands
    assert not use_flex(q.float(), k.float(), v.float(), False)
    with pytest.raises(LinearizeError, match="float16/bfloat16/float32.*fused=None"):
        use_flex(q, k, v, True)
    small = torch.zeros(1, 1, 4, 8)
    with pytest.raises(LinearizeError, match="head dimensions from 16 to 256"):
        use_flex(small, small, small, True)


def test_window_attention_keeps_bands_on_the_cpu_and_one_query_for_decode(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("flex_window ran")

    monkeypatch.setattr(windows, "flex_window", refuse)
    q, k, v, mask = window_inputs(20, 0, True)
    q, k, v = q.float(), k.float(), v.float()
    window_attention(q, k, v, window=8, scaling=SCALING, key_mask=mask)
    decode = window_attention(q[:, :, -1:], k[:, :, -8:], v[:, :, -8:], window=8, scaling=SCALING, key_mask=mask[:, -8:], fused=True)
    torch.testing.assert_close(decode, window_attention(q, k, v, window=8, scaling=SCALING, key_mask=mask)[:, :, -1:])


def test_unpadded_inputs_reach_the_window_without_a_mask(monkeypatch):
    """No padding and no cache: no key mask, so the fused path needs no look at one (a device sync); the cache
    still gets its mask."""
    seen = []
    real_window_attention = windows.window_attention

    def spy(*args, key_mask, **kwargs):
        seen.append(key_mask)
        return real_window_attention(*args, key_mask=key_mask, **kwargs)

    monkeypatch.setattr(windows, "window_attention", spy)
    spec = AttentionSpec("separate", 64, 6, 2, 16, "o_proj", None, None, True, SCALING, None, None)
    q, k, v, mask = window_inputs(10, 0, True)
    _, cache = windows.sliding_window_heads(spec, 4, q, k, v, None, None, {})
    assert seen[-1] is None and cache["mask"].all() and cache["mask"].shape == (2, 3)
    windows.sliding_window_heads(spec, 4, q, k, v, None, None, None)
    assert seen[-1] is None
    windows.sliding_window_heads(spec, 4, q, k, v, None, mask, None)
    assert seen[-1] is mask
    _, cache = windows.sliding_window_heads(spec, 4, q, k, v, None, None, cache)
    assert seen[-1].shape == (2, 13) and seen[-1].all()


@pytest.fixture
def compiled_flex_only(monkeypatch):
    """Room for every variant the tests compile, and an error instead of a silent fall back to the dense form."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)


GPU_CASES = [(65, 0, 1), (129, 9, 3), (300, 9, 100), (200, 0, 400), (1000, 0, 64), (2048, 63, 64)]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap,padded", [(None, False), (5.0, True)], ids=["plain", "softcap-padded"])
def test_gpu_window_attention_is_flex_and_matches_the_reference(compiled_flex_only, dtype, softcap, padded):
    """The default rule on CUDA: the compiled Triton kernel, outputs and gradients, SmolLM2's head layout (each
    variant compiles forward and backward, twice: for the first shape, then for any)."""
    q, _, _, _ = window_inputs(8, 0, False, heads=(9, 3), dim=64, device="cuda")
    assert use_flex(q.to(dtype), q.to(dtype), q.to(dtype), None)
    for length, context, window in GPU_CASES:

        def fused(q, k, v, mask):
            return window_attention(q, k, v, window=window, scaling=SCALING, softcap=softcap, key_mask=mask)

        check_against_reference(fused, length, context, window, padded, softcap, dtype, heads=(9, 3), dim=64, device="cuda")


@pytest.mark.gpu
@cuda
def test_gpu_kernels_torch_keeps_the_bands(monkeypatch):
    q, k, v, _ = window_inputs(8, 0, False, dim=64, device="cuda")
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    assert not use_flex(q.float(), k.float(), v.float(), None)



def test_a_flex_compile_failure_falls_back_to_the_bands_with_one_warning(monkeypatch):
    """Where compiling flex_attention fails (seen on an H200 for a left-padded float32 window), the default rule
    computes the window on the bands, warns once and does not try flex_attention again; fused=True still raises."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise torch._dynamo.exc.BackendCompilerFailed(failing, RuntimeError("NoValidChoicesError: No choices to select"), None)

    monkeypatch.setattr(windows, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(windows, "flex_failure", None)
    monkeypatch.setattr(windows, "_compiled_flex", lambda: failing)
    q, k, v, mask = window_inputs(70, 0, True, heads=(2, 1), dim=16)
    q, k, v = q.float(), k.float(), v.float()
    with pytest.warns(UserWarning, match="compiling flex_attention for a window failed .*NoValidChoicesError"):
        out = window_attention(q, k, v, window=8, scaling=SCALING, key_mask=mask)
    assert calls == [1] and "NoValidChoicesError" in windows.flex_failure
    torch.testing.assert_close(out, window_attention(q, k, v, window=8, scaling=SCALING, key_mask=mask, fused=False))
    assert not use_flex(q, k, v, None)
    window_attention(q, k, v, window=8, scaling=SCALING, key_mask=mask)
    assert calls == [1]
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        window_attention(q, k, v, window=8, scaling=SCALING, key_mask=mask, fused=True)
