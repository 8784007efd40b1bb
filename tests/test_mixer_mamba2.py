"""The mamba2 mixer on one layer of a converted tiny llama, against a plain token-by-token reference."""

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize import LinearizeError
from linearize.hf.cache import MixerState
from tests.mixer_steps import assert_close, assert_window_mix_matches, converted_mixer, forms, gradients, layer_inputs, parallel
from tests.tiny import tiny_model

NEW = {"dt_proj.weight", "dt_bias", "A_log", "D"}


def randomised(window: int = 0):
    """A converted layer whose new parameters are random, so the step, decay, skip and window share all matter."""
    model, mixer = converted_mixer("mamba2", window=window)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if not name.startswith("attn."):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return model, mixer


def reference(mixer, hidden, position_embeddings, mask, initial):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t, y_t = C_t h_t + D x_t with x, B, C = v, k, q (no RoPE), per token.

    Pads leave h untouched and output zero. Returns heads (B, H, T, D) and the final {"ssm"} state.
    """
    spec = mixer.spec
    batch, length, _ = hidden.shape
    h, d = spec.num_heads, spec.head_dim
    q, k, v = spec.project(mixer.attn, hidden)
    k, v = k.repeat_interleave(spec.groups, dim=1), v.repeat_interleave(spec.groups, dim=1)
    a = -mixer.A_log.exp()
    ssm = torch.zeros(batch, h, d, d, dtype=v.dtype) if initial is None else initial["ssm"]
    real = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
    outputs = []
    for t in range(length):
        dt = F.softplus(hidden[:, t] @ mixer.dt_proj.weight.T + mixer.dt_bias)  # (B, H)
        c, b, x = q[:, :, t], k[:, :, t], v[:, :, t]
        updated = (dt * a).exp()[..., None, None] * ssm + dt[..., None, None] * b[..., :, None] * x[..., None, :]
        keep = real[:, t, None]
        ssm = torch.where(keep[..., None, None], updated, ssm)
        y = spec.scaling * torch.einsum("bhk,bhkv->bhv", c, updated) + mixer.D[:, None] * x
        outputs.append(y * keep[..., None])
    return torch.stack(outputs, dim=2), {"ssm": ssm}


CASES = [(length, initial, pad) for length in (1, 63, 130) for initial in (False, True) for pad in (False, True)]


@pytest.mark.parametrize("length,with_initial,padded", CASES, ids=[f"T{t}-{'init' if i else 'fresh'}-{'pad' if p else 'full'}" for t, i, p in CASES])
def test_every_form_equals_the_reference(length, with_initial, padded):
    model, mixer = randomised()
    pad = min(5, length) if padded else 0
    hidden, position_embeddings, mask = layer_inputs(model, 2, length, pad, offset=7 if with_initial else 0)
    initial = None
    if with_initial:
        h, d = mixer.spec.num_heads, mixer.spec.head_dim
        initial = {"ssm": torch.randn(2, h, d, d, generator=torch.Generator().manual_seed(11), dtype=torch.float64)}
    names, params = zip(*[(n, p) for n, p in mixer.named_parameters() if n in NEW])
    expected, expected_state = reference(mixer, hidden, position_embeddings, mask, initial)
    expected_grads = gradients(expected, [hidden, *params])
    for form, (out, state) in forms(mixer, hidden, position_embeddings, mask, initial).items():
        assert_close(out, expected, f"{form} output")
        if state is not None:
            assert_close(state["ssm"], expected_state["ssm"], f"{form} final state")
        for name, grad, want in zip(("hidden", *names), gradients(out, [hidden, *params]), expected_grads):
            assert_close(grad, want, f"{form} gradient of {name}")


@pytest.mark.parametrize("length,padded", [(1, False), (63, True), (130, False), (130, True)])
def test_window_mix_equals_the_reference(length, padded):
    """share * (softmax over the last 5 keys, with RoPE) + (1 - share) * the SSM's output, per head; pads give 0."""
    model, mixer = randomised(window=5)
    assert_window_mix_matches(model, mixer, lambda hidden, position_embeddings, mask: reference(mixer, hidden, position_embeddings, mask, None)[0], NEW, length, padded)


def test_only_dt_A_and_D_are_new():
    _, mixer = converted_mixer("mamba2")
    spec = mixer.spec
    new = {n: p.shape for n, p in mixer.named_parameters() if not n.startswith("attn.")}
    h = spec.num_heads
    assert new == {"dt_proj.weight": (h, spec.hidden_size), "dt_bias": (h,), "A_log": (h,), "D": (h,)}
    _, windowed = converted_mixer("mamba2", window=8)
    assert {n for n, _ in windowed.named_parameters() if not n.startswith("attn.")} == set(new) | {"window_logit"}


@pytest.mark.parametrize("window", [0, 6])
def test_cost_counts_new_parameters_and_state(window):
    model, mixer = converted_mixer("mamba2", window=window)
    cost = type(mixer).cost(mixer.spec, mixer.options)
    assert cost.new_parameters == sum(p.numel() for p in mixer.new_parameters())
    assert cost.state_per_token == 0
    hidden, position_embeddings, _ = layer_inputs(model, 1, 5, pad=0, offset=0)
    state = MixerState()
    q, k, v = mixer.spec.project(mixer.attn, hidden)
    mixer.mix(hidden, q, k, v, position_embeddings, None, state)
    assert cost.state_fixed == sum(t.numel() for t in state.tensors.values())


def test_start_is_a_slow_decay_with_input_independent_step():
    model, mixer = converted_mixer("mamba2")
    hidden, _, _ = layer_inputs(model, 2, 9, pad=0, offset=0)
    dt = mixer.steps(hidden, None)
    assert torch.allclose(dt, torch.full_like(dt, mixer.initial_dt))
    decay = torch.exp(-mixer.A_log.exp()[:, None] * dt)
    assert bool((decay > 0.95).all() and (decay < 1).all())


def test_layer_output_goes_through_the_teachers_o_proj():
    model, mixer = randomised()
    hidden, position_embeddings, _ = layer_inputs(model, 2, 11, pad=0, offset=0)
    heads = parallel(mixer, hidden, position_embeddings, None)
    out, _ = mixer(hidden, position_embeddings=position_embeddings)
    assert torch.allclose(out, mixer.attn.o_proj(heads.transpose(1, 2).reshape(2, 11, -1)))


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(d_state=16), "mixer 'mamba2' does not take option(s) d_state; it takes: window"),
        (dict(window=-1), "option 'window' of mixer 'mamba2' must be at least 0"),
        (dict(window=4096), "option 'window' of mixer 'mamba2' is 4096, longer than the model's context of 512 tokens"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(LinearizeError) as info:
        linearize.convert(tiny_model(), "mamba2", keep_attention=[1], **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
