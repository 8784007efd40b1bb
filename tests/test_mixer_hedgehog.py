"""`hedgehog` and `hedgehog_swa` layers in every form against a quadratic reference written out here."""

import pytest
import torch

from linearize.hf.attention import apply_rotary, repeat_heads
from linearize.hf.mixer_hedgehog import HedgehogMixer, HedgehogSWAMixer
from linearize.hf.cache import MixerState
from linearize.hf.ops_kept import naive_kept_window_linear
from tests.mixer_forms import BATCH, assert_forms_match, build, call, inputs


def reference(mixer, hidden, position_embeddings, mask):
    """For query t: keys t - window < s <= t score exp(q.k * scaling - max) * share; older keys score
    phi(q_t).phi(k_s) * (1 - share), times decay ** (t - window - s) with a decay; one normaliser. With window 0 every
    key is a linear key. phi reads q and k after RoPE, or with linear_rope off before it."""
    q, k, v = mixer.spec.project(mixer.attn, hidden)
    raw_q, raw_k = q, k
    q, k = apply_rotary(q, k, position_embeddings)
    groups = mixer.spec.groups
    linear_rope = getattr(mixer.options, "linear_rope", True)
    fq, fk = (mixer.feature_q(q), mixer.feature_k(k)) if linear_rope else (mixer.feature_q(raw_q), mixer.feature_k(raw_k))
    fk = repeat_heads(fk, groups)
    k, v = repeat_heads(k, groups), repeat_heads(v, groups)
    window = getattr(mixer, "window", 0)
    share = torch.sigmoid(mixer.window_logit)[None, :, None, None] if window else torch.zeros(())
    length = q.shape[2]
    t = torch.arange(length)[:, None]
    s = torch.arange(length)[None, :]
    valid = torch.ones(q.shape[0], length, dtype=torch.bool) if mask is None else mask
    valid = valid[:, None, None, :]
    in_window = (s <= t) & (s > t - window) & valid
    in_linear = (s <= t - window) & valid
    scores = (q @ k.transpose(-1, -2) * mixer.spec.scaling).masked_fill(~in_window, float("-inf"))
    peak = scores.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    linear = (fq @ fk.transpose(-1, -2)) * in_linear
    if getattr(mixer, "decay_logit", None) is not None:
        decay = repeat_heads(torch.sigmoid(mixer.decay_logit)[None, :, None, None], groups)
        linear = linear * decay ** (t - window - s).clamp_min(0)
    weights = torch.exp(scores - peak) * share + linear * (1 - share)
    total = weights.sum(-1, keepdim=True)
    heads = (weights @ v) / torch.where(total > 0, total, torch.ones_like(total))
    return mixer.spec.out(mixer.attn, heads)


CASES = [
    (HedgehogMixer, {"feature_dim": 12}),
    (HedgehogSWAMixer, {"window": 5}),
    (HedgehogSWAMixer, {"window": 70}),
    (HedgehogSWAMixer, {"window": 5, "decay": 0.9}),
    (HedgehogSWAMixer, {"window": 5, "linear_rope": False}),
]


@pytest.mark.parametrize("prefix", [0, 9], ids=["no-initial-state", "initial-state"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("length", [1, 63, 130])
@pytest.mark.parametrize("case", CASES, ids=["hedgehog", "hedgehog_swa-5", "hedgehog_swa-70", "hedgehog_swa-5-decay", "hedgehog_swa-5-no-linear-rope"])
def test_every_form_matches_the_reference(case, length, padded, prefix):
    cls, options = case
    mixer, rotary = build(cls, **options)
    with torch.no_grad():  # trained-looking feature maps and window balance, not the identity start
        for p in mixer.new_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert_forms_match(mixer, reference, rotary, length, padded, prefix)


def test_feature_map_starts_as_identity_softmax_pair():
    mixer, _ = build(HedgehogMixer)
    x = torch.randn(2, mixer.spec.num_heads, 5, mixer.spec.head_dim, dtype=torch.float64)
    phi = mixer.feature_q(x)
    torch.testing.assert_close(phi, torch.cat((torch.softmax(x, -1), torch.softmax(-x, -1)), -1))


@pytest.mark.parametrize("window", [1, 5])
def test_swa_state_is_per_kv_head_and_its_cost(window):
    """hedgehog_swa keeps one state per kv head, of cost().state_fixed elements, after a prefill and a decode step."""
    mixer, rotary = build(HedgehogSWAMixer, window=window)
    cost = type(mixer).cost(mixer.spec, mixer.options)
    hidden, _, position_embeddings = inputs(rotary, mixer.attn.config.hidden_size, 7, pad=0)
    state = MixerState()
    with torch.no_grad():
        for start, end in [(0, 6), (6, 7)]:
            call(mixer, hidden, position_embeddings, None, state, start, end)
            assert state.tensors["S"].shape[1] == mixer.spec.num_kv_heads < mixer.spec.num_heads
            assert sum(t.numel() for t in state.tensors.values()) == BATCH * cost.state_fixed


def test_a_decay_is_a_learnable_retention_per_kv_head_and_its_prefill_on_the_pytorch_path():
    mixer, _ = build(HedgehogSWAMixer, window=5, decay=0.99)
    assert mixer.decay_logit.shape == (mixer.spec.num_kv_heads,) and mixer.decay_logit in set(mixer.new_parameters())
    torch.testing.assert_close(torch.sigmoid(mixer.decay_logit), torch.full_like(mixer.decay_logit, 0.99))
    plain, _ = build(HedgehogSWAMixer, window=5)
    extra = type(mixer).cost(mixer.spec, mixer.options).new_parameters - type(plain).cost(plain.spec, plain.options).new_parameters
    assert extra == mixer.spec.num_kv_heads and not hasattr(plain, "decay_logit")
    assert mixer.cuda_path(torch.bfloat16) == "PyTorch (no prefill kernel for option 'decay' yet); decode: fused Triton step"


@pytest.mark.parametrize("decay", [1.0, -0.5, 2])
def test_a_decay_outside_0_1_is_one_line_naming_the_fix(decay):
    from linearize import LinearizeError

    with pytest.raises(LinearizeError, match=r"option 'decay' of mixer 'hedgehog_swa' must be 0 \(off\) or between 0 and 1, got .*0.99 is a start"):
        build(HedgehogSWAMixer, window=5, decay=decay)


@pytest.mark.parametrize("linear_rope", [True, False])
def test_without_linear_rope_a_shifted_sequence_gives_the_same_output(linear_rope):
    """RoPE makes the window's scores depend on relative positions alone; the linear part's feature maps of rotated q
    and k see absolute rotations (those past the training length never seen), and without linear_rope none: the same
    tokens placed 1,000 positions on give the same output only then."""
    mixer, rotary = build(HedgehogSWAMixer, window=3, linear_rope=linear_rope)
    with torch.no_grad():
        for p in mixer.new_parameters():
            p.add_(torch.randn_like(p) * 0.3)
        hidden, _, _ = inputs(rotary, mixer.attn.config.hidden_size, 12, pad=0)
        outs = [call(mixer, hidden, rotary(hidden, torch.arange(12)[None] + shift), None, None, 0, 12) for shift in (0, 1000)]
    # RoPE's angles are float32 (transformers'): at position 1,000 the window's scores move by about 1e-6 of the output.
    assert ((outs[0] - outs[1]).abs().max() < 1e-4 * outs[0].abs().max()) != linear_rope


def kept_reference(mixer, hidden, position_embeddings, mask):
    """hedgehog_swa with kept keys: `ops_kept`'s quadratic reference on the layer's own q, k, v and features."""
    q, k, v = mixer.spec.project(mixer.attn, hidden)
    raw_q, raw_k = q, k
    q, k = apply_rotary(q, k, position_embeddings)
    fq, fk = (mixer.feature_q(q), mixer.feature_k(k)) if mixer.options.linear_rope else (mixer.feature_q(raw_q), mixer.feature_k(raw_k))
    share = torch.sigmoid(mixer.window_logit)
    heads = naive_kept_window_linear(
        q, k, v, fq, fk, window=mixer.window, keep=mixer.options.keep, block=mixer.options.keep_block, scaling=mixer.spec.scaling,
        sm_weight=share, ln_weight=1 - share, key_mask=mask,
    )
    return mixer.spec.out(mixer.attn, heads)


@pytest.mark.parametrize("prefix", [0, 9], ids=["no-initial-state", "initial-state"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("length", [1, 63, 130])
@pytest.mark.parametrize("options", [{"keep": 4, "keep_block": 8}, {"keep": 3, "keep_block": 5, "linear_rope": False}], ids=["keep-4", "keep-3-no-linear-rope"])
def test_kept_keys_in_every_form_match_the_reference(options, length, padded, prefix):
    mixer, rotary = build(HedgehogSWAMixer, window=5, **options)
    with torch.no_grad():
        for p in mixer.new_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert_forms_match(mixer, kept_reference, rotary, length, padded, prefix)


def test_kept_keys_add_no_parameters_and_their_state_is_its_cost():
    """keep adds no parameter (a trained student takes it as it is); its state is cost().state_fixed elements after a
    prefill and after a step that decides a block; its state is static (fixed-size: the decisions every keep_block
    steps follow a compiled step, `test_static_cache.py`) and its CUDA path the kept keys' prefill kernel (inference)
    and the fused step (`test_triton_kept.py`, `test_triton_step.py`)."""
    mixer, rotary = build(HedgehogSWAMixer, window=5, keep=3, keep_block=4)
    plain, _ = build(HedgehogSWAMixer, window=5)
    assert [n for n, _ in mixer.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert HedgehogSWAMixer.static_state(mixer.options_dict()) and HedgehogSWAMixer.static_state(plain.options_dict())
    assert HedgehogSWAMixer.decision_period(mixer.options_dict()) == 4 and not HedgehogSWAMixer.decision_period(plain.options_dict())
    assert mixer.cuda_path(torch.bfloat16) == "Triton (linearize; training on the PyTorch path); decode: fused Triton step"
    cost = type(mixer).cost(mixer.spec, mixer.options)
    hidden, _, position_embeddings = inputs(rotary, mixer.attn.config.hidden_size, 8, pad=0)
    state = MixerState()
    with torch.no_grad():
        for start, end in [(0, 7), (7, 8)]:  # the step at position 7 decides the block that starts at 8
            call(mixer, hidden, position_embeddings, None, state, start, end)
            assert sum(t.numel() for t in state.tensors.values()) == BATCH * cost.state_fixed


@pytest.mark.parametrize(
    "options, message",
    [
        ({"keep": -1}, r"options 'keep' and 'keep_block' of mixer 'hedgehog_swa' must be at least 0 and 1, got -1 and 64; keep=128 is a start"),
        ({"keep": 8, "keep_block": 0}, r"must be at least 0 and 1, got 8 and 0"),
        ({"keep": 8, "decay": 0.99}, r"option 'keep' of mixer 'hedgehog_swa' does not take 'decay' yet; set decay=0 or keep=0"),
    ],
)
def test_bad_kept_key_options_are_one_line_naming_the_fix(options, message):
    from linearize import LinearizeError

    with pytest.raises(LinearizeError, match=message):
        build(HedgehogSWAMixer, window=5, **options)
