"""The `gla` mixer (Liger GLA, and Liger attention with a window) against a quadratic reference written here."""

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize import LinearizeError
from linearize.hf.attention import repeat_heads
from linearize.hf.cache import MixerState
from linearize.hf.mixer_gla import GLAMixer
from linearize.hf.mixer_swa import SWAMixer
from tests.mixer_forms import assert_forms_match, build, call, inputs
from tests.mixer_steps import reference_window_heads
from tests.tiny import tiny_model


def reference_gla_heads(mixer, q, k, v, mask):
    """o_t = sum_{s<=t} w_ts v_s / sum_{s<=t} w_ts, w_ts = sum_d softmax(q_t)_d softmax(k_s)_d prod_{s<u<=t} exp(g_ud),
    g = logsigmoid(k) / gate_normalizer; padded keys have weight 0 and gate 0."""
    fq, fk = torch.softmax(q, -1), torch.softmax(k, -1)
    gate = F.logsigmoid(k) / mixer.options.gate_normalizer
    if mask is not None:
        fk, gate = fk * mask[:, None, :, None], gate * mask[:, None, :, None]
    groups = mixer.spec.groups
    fk, gate, v = repeat_heads(fk, groups), repeat_heads(gate, groups), repeat_heads(v, groups)
    cum = gate.cumsum(2)
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[:, :, None]
    decay = torch.exp(torch.where(causal, cum[:, :, :, None, :] - cum[:, :, None, :, :], float("-inf")))
    weights = torch.einsum("bhtd,bhsd,bhtsd->bhts", fq, fk, decay)
    total = weights.sum(-1, keepdim=True)
    return (weights @ v) / torch.where(total > 0, total, torch.ones_like(total))


def reference_heads(mixer, hidden, position_embeddings, mask):
    q, k, v = mixer.spec.project(mixer.attn, hidden)
    heads = reference_gla_heads(mixer, q, k, v, mask)
    if mixer.window:
        heads = 0.5 * reference_window_heads(mixer, q, k, v, mask, position_embeddings) + 0.5 * heads
    return heads


def reference(mixer, hidden, position_embeddings, mask):
    return mixer.spec.out(mixer.attn, reference_heads(mixer, hidden, position_embeddings, mask))


@pytest.mark.parametrize("prefix", [0, 9], ids=["no-initial-state", "initial-state"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("length", [1, 63, 130])
@pytest.mark.parametrize("window", [0, 5], ids=["gla", "liger-attention"])
def test_every_form_matches_the_reference(window, length, padded, prefix):
    mixer, rotary = build(GLAMixer, window=window)
    assert_forms_match(mixer, reference, rotary, length, padded, prefix)


def test_adds_no_parameters():
    teacher = tiny_model()
    count = sum(p.numel() for p in teacher.parameters())
    student = linearize.convert(teacher, "gla", window=4)
    assert sum(p.numel() for p in student.parameters()) == count
    for mixer in linearize.hf.mixers.mixers_in(student):
        assert mixer.new_parameters() == []
        assert mixer.cost(mixer.spec, mixer.options).new_parameters == 0


def test_window_mix_is_exactly_half_and_half():
    liger, rotary = build(GLAMixer, window=5)
    attn, config = liger.attn, liger.attn.config
    gla = GLAMixer.from_attention(attn, config, 0)
    swa = SWAMixer.from_attention(attn, config, 0, window=5)
    hidden, mask, position_embeddings = inputs(rotary, config.hidden_size, 40, pad=6)
    q, k, v = liger.spec.project(attn, hidden)
    got = liger.mix(hidden, q, k, v, position_embeddings, mask, None)
    gla_part = reference_gla_heads(liger, q, k, v, mask)
    window_part = reference_window_heads(liger, q, k, v, mask, position_embeddings)
    torch.testing.assert_close(got, 0.5 * window_part + 0.5 * gla_part, atol=1e-12, rtol=0)
    torch.testing.assert_close(gla.mix(hidden, q, k, v, position_embeddings, mask, None), gla_part, atol=1e-12, rtol=0)
    torch.testing.assert_close(swa.mix(hidden, q, k, v, position_embeddings, mask, None), window_part, atol=1e-12, rtol=0)
    assert (window_part - gla_part).abs().max() > 0.1, "the two halves should differ, or the mix proves nothing"


@pytest.mark.parametrize("window", [0, 5])
def test_state_is_what_cost_declares(window):
    mixer, rotary = build(GLAMixer, window=window)
    hidden, _, (cos, sin) = inputs(rotary, mixer.attn.config.hidden_size, 40, pad=0)
    state = MixerState()
    with torch.no_grad():
        call(mixer, hidden[:1], (cos[:1], sin[:1]), None, state, 0, 40)
    cost = mixer.cost(mixer.spec, mixer.options)
    assert sum(t.numel() for t in state.tensors.values()) == cost.state_fixed
    assert cost.state_per_token == 0


@pytest.mark.parametrize("window", [0, 5])
def test_padding_leaves_the_state_alone(window):
    """Row 0, left-padded by 11, ends in the state its 29 real tokens alone give."""
    mixer, rotary = build(GLAMixer, window=window)
    hidden, mask, (cos, sin) = inputs(rotary, mixer.attn.config.hidden_size, 40, pad=11)
    padded, alone = MixerState(), MixerState()
    with torch.no_grad():
        call(mixer, hidden, (cos, sin), mask, padded, 0, 40)
        call(mixer, hidden[:1, 11:], (cos[:1, 11:], sin[:1, 11:]), None, alone, 0, 29)
    assert padded.tensors.keys() == alone.tensors.keys()
    for name, tensor in alone.tensors.items():
        torch.testing.assert_close(padded.tensors[name][:1], tensor, atol=1e-12, rtol=0)
    # Left padding only ever meets an empty state; padded tokens after real ones show that they neither add
    # to the gated state nor decay it.
    before = alone.tensors["S"]
    with torch.no_grad():
        call(mixer, hidden[:1, :6], (cos[:1, :6], sin[:1, :6]), torch.zeros(1, 6, dtype=torch.bool), alone, 0, 6)
    torch.testing.assert_close(alone.tensors["S"], before, atol=0, rtol=0)


BAD_OPTIONS = [
    (dict(windw=4), "does not take option(s) windw; it takes: gate_normalizer, window"),
    (dict(window=4096), "longer than the model's context of 512 tokens"),
    (dict(window=-1), "option 'window' of mixer 'gla' must be at least 0"),
    (dict(gate_normalizer=0), "option 'gate_normalizer' of mixer 'gla' must be positive"),
    (dict(gate_normalizer="fast"), "option 'gate_normalizer' of mixer 'gla' must be a float"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_options_raise_one_line(options, message):
    with pytest.raises(LinearizeError) as info:
        linearize.convert(tiny_model(), "gla", **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
