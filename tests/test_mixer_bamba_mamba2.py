"""The bamba_mamba2 mixer on one layer of a converted tiny llama, against a plain token-by-token reference written
as transformers' BambaMixer computes (in_proj split into z, x, B, C, dt; conv and SiLU; the selective state update;
the gated RMSNorm per group)."""

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize import LinearizeError
from linearize.hf.cache import MixerState
from linearize.hf.mixers import mixers_in
from tests.mixer_steps import assert_conv_state_forms_match, converted_mixer, layer_inputs
from tests.tiny import tiny_model

NEW = {"conv_weight", "conv_bias", "z_proj.weight", "dt_proj.weight", "dt_bias", "A_log", "D", "norm_weight"}


def randomised():
    """A converted layer whose new parameters are random, so every tap, bias, step, decay, skip and gate matters."""
    model, mixer = converted_mixer("bamba_mamba2", conv_size=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name in NEW:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return model, mixer


def reference(mixer, hidden, mask, initial):
    """bamba's Mamba-2 layer one token at a time, before its out_proj. The projections are in_proj's rows: z, then
    x = v and B = k (kv heads repeated), C = q, then dt. The state is bamba's (P x N per head, S = exp(dt A) S +
    dt x B^T, y = S C + D x); the mixer keeps its transpose. Pads leave every state untouched and output 0 (for a
    fresh state bamba's zeroed pads do the same). Returns heads (B, H, T, D) and the final state in the mixer's layout."""
    spec, attn = mixer.spec, mixer.attn
    batch, length, _ = hidden.shape
    h, d, groups = spec.num_heads, spec.head_dim, spec.groups

    def heads(x, count):
        return x.reshape(batch, length, count, d).repeat_interleave(h // count, dim=2).reshape(batch, length, h * d)

    xbc = torch.cat((heads(attn.v_proj(hidden), h // groups), heads(attn.k_proj(hidden), h // groups), attn.q_proj(hidden)), dim=-1)
    z = (hidden @ mixer.z_proj.weight.T).reshape(batch, length, h, d)
    kernel = mixer.conv_weight.shape[1]
    if initial is None:
        buffer = torch.zeros(batch, 3 * h * d, kernel - 1, dtype=hidden.dtype)
        ssm = torch.zeros(batch, h, d, d, dtype=hidden.dtype)
    else:
        buffer, ssm = initial["conv"], initial["ssm"].transpose(-1, -2)
    a = -mixer.A_log.exp()
    real = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
    outputs = []
    for t in range(length):
        window = torch.cat((buffer, xbc[:, t, :, None]), dim=-1)
        x, b, c = F.silu((window * mixer.conv_weight).sum(-1) + mixer.conv_bias).reshape(batch, 3, h, d).unbind(1)
        dt = F.softplus(hidden[:, t] @ mixer.dt_proj.weight.T + mixer.dt_bias)  # (B, H)
        updated = (dt * a).exp()[..., None, None] * ssm + dt[..., None, None] * x[..., :, None] * b[..., None, :]
        y = torch.einsum("bhpn,bhn->bhp", updated, c) + mixer.D[:, None] * x
        gated = y * F.silu(z[:, t])
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + mixer.options.eps) * mixer.norm_weight
        keep = real[:, t, None]
        buffer = torch.where(keep[..., None], window[..., 1:], buffer)
        ssm = torch.where(keep[..., None, None], updated, ssm)
        outputs.append(normed * keep[..., None])
    return torch.stack(outputs, dim=2), {"conv": buffer, "ssm": ssm.transpose(-1, -2)}


CASES = [(length, initial, pad) for length in (1, 63, 130) for initial in (False, True) for pad in (False, True)]


@pytest.mark.parametrize("length,with_initial,padded", CASES, ids=[f"T{t}-{'init' if i else 'fresh'}-{'pad' if p else 'full'}" for t, i, p in CASES])
def test_every_form_equals_the_reference(length, with_initial, padded):
    """Parallel, recurrent and chunked forms: outputs, final states and gradients (the input and every new
    parameter), from a fresh or a random state, with or without left pads."""
    model, mixer = randomised()
    assert_conv_state_forms_match(model, mixer, reference, NEW, length, with_initial, padded, recurrent="ssm")


def test_names_and_start():
    """The new parameters are bamba's; the start reads attention as mamba2 does: taps of 0.25 on the current token,
    the step and decay folded to mamba2's write and decay, D = 0, and a small norm weight."""
    model, mixer = converted_mixer("bamba_mamba2")
    spec = mixer.spec
    h, d = spec.num_heads, spec.head_dim
    shapes = {n: tuple(p.shape) for n, p in mixer.named_parameters() if not n.startswith("attn.")}
    assert shapes == {
        "conv_weight": (3 * h * d, 4), "conv_bias": (3 * h * d,), "z_proj.weight": (h * d, spec.hidden_size),
        "dt_proj.weight": (h, spec.hidden_size), "dt_bias": (h,), "A_log": (h,), "D": (h,), "norm_weight": (h, d),
    }
    assert mixer.options.eps == model.config.text_config.rms_norm_eps
    assert torch.equal(mixer.conv_weight[:, :-1], torch.zeros_like(mixer.conv_weight[:, :-1]))
    assert bool((mixer.conv_weight[:, -1] == 0.25).all()) and not mixer.conv_bias.any() and not mixer.D.any()
    hidden, _, _ = layer_inputs(model, 2, 9, pad=0, offset=0)
    dt = mixer.steps(hidden, None)
    tap = (0.25 / 2) ** 2
    assert torch.allclose(dt * tap, torch.full_like(dt, 0.001 * spec.scaling))
    assert torch.allclose(-mixer.A_log.exp()[:, None] * dt, torch.full_like(dt, -0.03))
    assert bool((mixer.norm_weight == 0.05).all()) and 0.9 < mixer.z_proj.weight.std() < 1.1


def test_cost_counts_new_parameters_and_state():
    model, mixer = converted_mixer("bamba_mamba2")
    cost = type(mixer).cost(mixer.spec, mixer.options)
    assert cost.new_parameters == sum(p.numel() for p in mixer.new_parameters())
    assert cost.state_per_token == 0 and not type(mixer).state_grows
    hidden, position_embeddings, _ = layer_inputs(model, 1, 2, pad=0, offset=0)
    state = MixerState()
    mixer.mix(hidden, *mixer.project(hidden), position_embeddings, None, state)
    assert {n: tuple(t.shape) for n, t in state.tensors.items()} == {"conv": (1, mixer.conv_weight.shape[0], 3), "ssm": (1, 4, 16, 16)}
    assert sum(t.numel() for t in state.tensors.values()) == cost.state_fixed


def test_a_qwen3_teachers_qk_norms_stay_out():
    """bamba's in_proj has no q/k norms, so B and C are the teacher's k and q projections as they are."""
    mixer = mixers_in(linearize.convert(tiny_model("qwen3"), "bamba_mamba2"))[0]
    hidden = torch.randn(1, 5, 64, dtype=torch.float64)
    q, k, _ = mixer.project(hidden)
    assert torch.equal(q, mixer.attn.q_proj(hidden).reshape(1, 5, 4, 16).transpose(1, 2))
    assert torch.equal(k, mixer.attn.k_proj(hidden).reshape(1, 5, 2, 16).transpose(1, 2))


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(conv_size=0), "option 'conv_size' of mixer 'bamba_mamba2' must be at least 1"),
        (dict(eps=0.0), "option 'eps' of mixer 'bamba_mamba2' must be positive"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(LinearizeError) as info:
        linearize.convert(tiny_model(), "bamba_mamba2", **options)
    assert message in str(info.value) and "\n" not in str(info.value)
