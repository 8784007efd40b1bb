"""The `swa` mixer (sliding-window softmax attention) against a quadratic reference and against the teacher."""

import pytest
import torch

import linearize
from linearize import LinearizeError
from linearize.hf import ops_window
from linearize.hf.attention import apply_rotary, repeat_heads
from linearize.hf.cache import MixerState
from linearize.hf.mixer_swa import SWAMixer
from linearize.hf.windows import window_attention
from tests.mixer_forms import assert_forms_match, build, call, inputs
from tests.tiny import left_padded, random_ids, tiny_model


def naive_window(q, k, v, scaling, window, softcap=None, key_mask=None):
    """Full T x S softmax over keys t - window < s <= t that are not masked; q are the last T of the S keys."""
    length, total = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    scores = torch.einsum("bhtd,bhsd->bhts", q, repeat_heads(k, groups)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    t = torch.arange(total - length, total)[:, None]
    s = torch.arange(total)[None, :]
    allowed = (s <= t) & (s > t - window)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return probs @ repeat_heads(v, groups)


def reference(mixer, hidden, position_embeddings, mask):
    q, k, v = mixer.spec.project(mixer.attn, hidden)
    q, k = apply_rotary(q, k, position_embeddings)
    heads = naive_window(q, k, v, mixer.spec.scaling, mixer.window, mixer.spec.softcap, mask)
    return mixer.spec.out(mixer.attn, heads)


@pytest.mark.parametrize("prefix", [0, 9], ids=["no-initial-state", "initial-state"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("length", [1, 63, 130])
@pytest.mark.parametrize("window", [5, 70], ids=["window5", "window70"])
def test_every_form_matches_the_reference(window, length, padded, prefix):
    mixer, rotary = build(SWAMixer, window=window)
    assert_forms_match(mixer, reference, rotary, length, padded, prefix)


def test_softcap_and_teacher_sliding_window_are_kept():
    """gemma2 layer 0 caps its logits and slides over 6 keys itself: a window of 8 narrows to the teacher's 6."""
    mixer, rotary = build(SWAMixer, family="gemma2", window=8)
    assert mixer.spec.softcap and mixer.window == 6
    assert_forms_match(mixer, reference, rotary, 40, True, 9)


@pytest.mark.parametrize("band", [1, 4, 5, 7, 64])
@pytest.mark.parametrize("window", [1, 5, 6, 20])
def test_bands_match_the_full_matrix(band, window):
    """Band edges: bands shorter than, equal to and one off the window, with a context before the queries."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 23, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 30, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, :9] = False
    got = window_attention(q, k, v, window=window, scaling=0.3, softcap=5.0, key_mask=mask, band=band)
    torch.testing.assert_close(got, naive_window(q, k, v, 0.3, window, 5.0, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("budget", [1, 3000])
@pytest.mark.parametrize("window", [5, 20])
def test_blocks_match_the_full_matrix(monkeypatch, budget, window):
    """A long prefill runs a block of bands at a time (ops_window.BLOCK_ELEMENTS), each block reading the window
    before its first query: blocks of one band and of a few give the full matrix's answer."""
    monkeypatch.setattr(ops_window, "BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(ops_window, "MIN_BLOCK_TOKENS", 1)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 230, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 241, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 241, dtype=torch.bool)
    mask[0, :30] = False
    got = window_attention(q, k, v, window=window, scaling=0.3, key_mask=mask, band=8)
    torch.testing.assert_close(got, naive_window(q, k, v, 0.3, window, None, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("keys", [1, 4, 6])
def test_one_query_decode_step_matches_the_full_matrix(keys):
    """A decode step (one query, at most `window` keys) takes the direct path; every key masked gives 0."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 1, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, keys, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, keys, dtype=torch.bool)
    mask[0] = False
    got = window_attention(q, k, v, window=6, scaling=0.3, softcap=5.0, key_mask=mask)
    torch.testing.assert_close(got, naive_window(q, k, v, 0.3, 6, 5.0, mask), atol=1e-12, rtol=0)
    assert not got[0].any()


# gemma2's own attention takes its softmax in float32 (hence 1e-6), and with left padding its eager attention
# turns the padded rows into NaN, which then reach the real tokens through 0 * NaN (hence no padding there).
TEACHERS = [("llama", 1e-12, [7, 0]), ("mistral", 1e-12, [7, 0]), ("gemma2", 1e-6, [0, 0])]


@pytest.mark.parametrize("family,atol,pads", TEACHERS, ids=[f for f, _, _ in TEACHERS])
def test_window_covering_the_input_is_the_teacher(family, atol, pads):
    """Compared on real tokens only: the teacher's output under left padding is arbitrary."""
    student = linearize.convert(tiny_model(family), "swa", window=64)
    ids, mask = left_padded(random_ids(2, 48), pads)
    got = student(ids, attention_mask=mask).logits
    with linearize.teacher_mode(student):
        expected = student(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=atol, rtol=0)


def test_cache_is_bounded_by_the_window():
    mixer, rotary = build(SWAMixer, window=32)
    cost = mixer.cost(mixer.spec, mixer.options)
    sizes = []
    for length in (64, 512):
        hidden, _, position_embeddings = inputs(rotary, mixer.attn.config.hidden_size, length, pad=0)
        state = MixerState()
        with torch.no_grad():
            call(mixer, hidden, position_embeddings, None, state, 0, length)
        assert state.tensors["k"].shape == (2, mixer.spec.num_kv_heads, 31, mixer.spec.head_dim)
        assert sum(t[:1].numel() for t in state.tensors.values()) == cost.state_fixed
        sizes.append(state.nbytes())
    assert sizes[0] == sizes[1]
    assert cost.new_parameters == 0 and cost.state_per_token == 0 and mixer.new_parameters() == []


BAD_OPTIONS = [
    (dict(windows=4), "does not take option(s) windows; it takes: window"),
    (dict(window=4096), "option 'window' of mixer 'swa' is 4096, longer than the model's context of 512 tokens"),
    (dict(window=0), "option 'window' of mixer 'swa' must be at least 1"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_options_raise_one_line(options, message):
    with pytest.raises(LinearizeError) as info:
        linearize.convert(tiny_model(), "swa", **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
