"""The gated_deltanet mixer on one layer of a converted tiny llama, against a plain token-by-token reference."""

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize import LinearizeError
from linearize.hf.cache import MixerState
from linearize.hf.mixer_gated_deltanet import convolve_heads, short_conv
from tests.mixer_steps import assert_conv_state_forms_match, assert_window_mix_matches, converted_mixer, layer_inputs, parallel
from tests.tiny import tiny_model

NEW = {"conv_weight", "beta_proj.weight", "beta_proj.bias", "decay_proj.weight", "A_log", "dt_bias"}


def randomised(conv_size: int = 4, window: int = 0):
    """A converted layer whose new parameters are random, so the convolution, both gates and the window share matter."""
    model, mixer = converted_mixer("gated_deltanet", conv_size=conv_size, window=window)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if not name.startswith("attn."):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return model, mixer


def reference(mixer, hidden, mask, initial):
    """Gated DeltaNet written as its recurrence, one token at a time (no RoPE); pads leave every state untouched.

    Returns heads (B, H, T, D) and the final {"conv", "recurrent"} state.
    """
    spec = mixer.spec
    batch, length, _ = hidden.shape
    h, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    weight = mixer.conv_weight  # (channels, K): q heads, then k heads, then v heads, each head's D channels
    kernel = weight.shape[1]
    q, k, v = spec.project(mixer.attn, hidden)
    x = torch.cat((q, k, v), dim=1).permute(0, 2, 1, 3).reshape(batch, length, -1)  # (B, T, channels)
    if initial is None:
        buffer = torch.zeros(batch, weight.shape[0], kernel - 1, dtype=x.dtype)
        memory = torch.zeros(batch, h, d, d, dtype=x.dtype)
    else:
        buffer, memory = initial["conv"], initial["recurrent"]
    real = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
    outputs = []
    for t in range(length):
        window = torch.cat((buffer, x[:, t, :, None]), dim=-1)
        mixed = (window * weight).sum(-1).reshape(batch, h + 2 * hkv, d)
        qt, kt, vt = mixed[:, :h], mixed[:, h : h + hkv], mixed[:, h + hkv :]
        qt, kt = qt / qt.norm(dim=-1, keepdim=True), kt / kt.norm(dim=-1, keepdim=True)
        kt, vt = kt.repeat_interleave(h // hkv, dim=1), vt.repeat_interleave(h // hkv, dim=1)
        beta = torch.sigmoid(hidden[:, t] @ mixer.beta_proj.weight.T + mixer.beta_proj.bias)  # (B, H)
        g = -mixer.A_log.exp() * F.softplus(hidden[:, t] @ mixer.decay_proj.weight.T + mixer.dt_bias)
        decayed = g.exp()[..., None, None] * memory
        error = vt - torch.einsum("bhk,bhkv->bhv", kt, decayed)
        updated = decayed + beta[..., None, None] * kt[..., :, None] * error[..., None, :]
        keep = real[:, t, None]
        buffer = torch.where(keep[..., None], window[..., 1:], buffer)
        memory = torch.where(keep[..., None, None], updated, memory)
        outputs.append(torch.einsum("bhk,bhkv->bhv", qt, updated) * keep[..., None])
    return torch.stack(outputs, dim=2), {"conv": buffer, "recurrent": memory}


CASES = [(length, initial, pad) for length in (1, 63, 130) for initial in (False, True) for pad in (False, True)]


@pytest.mark.parametrize("length,with_initial,padded", CASES, ids=[f"T{t}-{'init' if i else 'fresh'}-{'pad' if p else 'full'}" for t, i, p in CASES])
def test_every_form_equals_the_reference(length, with_initial, padded):
    model, mixer = randomised()
    assert_conv_state_forms_match(model, mixer, reference, NEW, length, with_initial, padded)


@pytest.mark.parametrize("length,padded", [(1, False), (63, True), (130, False), (130, True)])
def test_window_mix_equals_the_reference(length, padded):
    """share * (softmax over the last 5 keys, with RoPE) + (1 - share) * the gated delta rule, per head; pads give 0."""
    model, mixer = randomised(window=5)
    assert_window_mix_matches(model, mixer, lambda hidden, position_embeddings, mask: reference(mixer, hidden, mask, None)[0], NEW, length, padded)


def test_names_of_new_parameters():
    _, mixer = converted_mixer("gated_deltanet")
    assert {n for n, _ in mixer.named_parameters() if not n.startswith("attn.")} == NEW
    _, windowed = converted_mixer("gated_deltanet", window=8)
    assert {n for n, _ in windowed.named_parameters() if not n.startswith("attn.")} == NEW | {"window_logit"}
    assert torch.allclose(torch.sigmoid(windowed.window_logit), torch.full_like(windowed.window_logit, windowed.initial_window_share))


def test_convolution_starts_as_identity():
    model, mixer = converted_mixer("gated_deltanet")
    hidden, _, mask = layer_inputs(model, 2, 20, pad=4, offset=0)
    q, k, v = mixer.spec.project(mixer.attn, hidden)
    assert all(torch.equal(a, b) for a, b in zip(mixer.convolve(q, k, v, None, None), (q, k, v)))
    real = mask[:, None, :, None]
    assert all(torch.equal(a * real, b * real) for a, b in zip(mixer.convolve(q, k, v, mask, None), (q, k, v)))


def test_gates_start_input_independent():
    model, mixer = converted_mixer("gated_deltanet")
    hidden, _, _ = layer_inputs(model, 2, 9, pad=0, offset=0)
    beta, g = mixer.gates(hidden, None)
    assert torch.allclose(beta, torch.full_like(beta, mixer.initial_beta))
    assert torch.allclose(g.exp(), torch.full_like(g, mixer.initial_decay))


@pytest.mark.parametrize("conv_size,window", [(1, 0), (4, 0), (4, 6)])
def test_cost_counts_new_parameters_and_state(conv_size, window):
    model, mixer = converted_mixer("gated_deltanet", conv_size=conv_size, window=window)
    cost = type(mixer).cost(mixer.spec, mixer.options)
    assert cost.new_parameters == sum(p.numel() for p in mixer.new_parameters())
    assert cost.state_per_token == 0
    hidden, position_embeddings, _ = layer_inputs(model, 1, 5, pad=0, offset=0)
    state = MixerState()
    q, k, v = mixer.spec.project(mixer.attn, hidden)
    mixer.mix(hidden, q, k, v, position_embeddings, None, state)
    assert cost.state_fixed == sum(t.numel() for t in state.tensors.values())


def test_layer_output_goes_through_the_teachers_o_proj():
    model, mixer = randomised()
    hidden, position_embeddings, _ = layer_inputs(model, 2, 11, pad=0, offset=0)
    heads = parallel(mixer, hidden, position_embeddings, None)
    out, _ = mixer(hidden, position_embeddings=position_embeddings)
    assert torch.allclose(out, mixer.attn.o_proj(heads.transpose(1, 2).reshape(2, 11, -1)))


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(conv_size=0), "option 'conv_size' of mixer 'gated_deltanet' must be at least 1"),
        (dict(kernel=4), "does not take option(s) kernel; it takes: conv_size, window"),
        (dict(window=-1), "option 'window' of mixer 'gated_deltanet' must be at least 0"),
        (dict(window=4096), "option 'window' of mixer 'gated_deltanet' is 4096, longer than the model's context of 512 tokens"),
        (dict(conv_size="four"), "option 'conv_size' of mixer 'gated_deltanet' must be a int"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(LinearizeError) as info:
        linearize.convert(tiny_model(), "gated_deltanet", **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


CONV_CASES = [
    (1, True, False, torch.float32), (1, False, True, torch.bfloat16), (5, False, False, torch.float32),
    (37, True, True, torch.bfloat16), (130, True, True, torch.float32), (3, True, True, torch.float64),
]


@pytest.mark.parametrize("length,with_cache,padded,dtype", CONV_CASES, ids=[f"T{t}-{'cache' if c else 'fresh'}-{'pad' if p else 'full'}-{str(d)[6:]}" for t, c, p, d in CONV_CASES])
def test_convolve_heads_is_short_conv_over_the_concatenated_heads(length, with_cache, padded, dtype):
    """The convolution of q, k and v (time-major in a prefill, channel-major in a decode step) equals `short_conv` over
    their channel-major concatenation: outputs and cache bit for bit (the same products summed in the same order)."""
    generator = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, d, taps = 2, 4, 2, 8, 4
    q = torch.randn(batch, length, heads, d, generator=generator).to(dtype).transpose(1, 2)  # as the projections give them
    k, v = (torch.randn(batch, length, kv_heads, d, generator=generator).to(dtype).transpose(1, 2) for _ in range(2))
    channels = (heads + 2 * kv_heads) * d
    weight = torch.randn(channels, taps, generator=generator)
    wide = torch.promote_types(dtype, torch.float32)
    # The cache holds earlier inputs: values of the inputs' dtype, kept in float32 (or wider).
    cache = torch.randn(batch, channels, taps - 1, generator=generator).to(dtype).to(wide) if with_cache else None
    mask = None
    if padded:
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, : max(length - 2, 0)] = False
    got = convolve_heads(q, k, v, weight, mask, cache)
    x = torch.cat((q, k, v), dim=1).to(wide).transpose(2, 3).reshape(batch, channels, length)
    out, expected_cache = short_conv(x, weight, cache, mask)
    expected = out.reshape(batch, -1, d, length).transpose(2, 3).split((heads, kv_heads, kv_heads), dim=1)
    for name, mine, theirs in zip(("q", "k", "v", "cache"), got, (*expected, expected_cache)):
        assert mine.dtype == theirs.dtype == wide and mine.shape == theirs.shape, name
        assert torch.equal(mine, theirs), name
    assert got[3].is_contiguous() and all(t.stride(-1) == 1 for t in got[:3])
