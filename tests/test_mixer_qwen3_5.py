"""The qwen3_5 mixers (qwen3_5_gdn, qwen3_5_attention) on one layer of a converted tiny teacher, against plain
token-by-token references written as transformers' qwen3_5 layers compute."""

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize import LinearizeError
from linearize.hf.attention import apply_rotary, repeat_heads
from linearize.hf.cache import MixerState
from linearize.hf.mixers import mixers_in
from tests.mixer_steps import assert_close, assert_conv_state_forms_match, converted_mixer, forms, gradients, layer_inputs
from tests.tiny import tiny_model

GDN_NEW = {"conv_weight", "b_proj.weight", "a_proj.weight", "z_proj.weight", "A_log", "dt_bias", "norm_weight"}
ATTENTION_NEW = {"gate_proj.weight", "q_norm_weight", "k_norm_weight"}


def randomised(name: str, family: str = "llama", **options):
    """A converted layer of `family` whose new parameters are random, so every gate, norm and convolution matters."""
    model = linearize.convert(tiny_model(family), name, **options)
    mixer = mixers_in(model)[0]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in mixer.named_parameters():
            if not n.startswith("attn."):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return model, mixer


def l2(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gdn_reference(mixer, hidden, mask, initial):
    """qwen3_5's Gated DeltaNet one token at a time: conv, SiLU, L2 norms, q * D^-0.5, the gated delta rule, then
    the gated RMSNorm per head. Pads leave every state untouched and output 0. Returns heads and final state."""
    spec = mixer.spec
    batch, length, _ = hidden.shape
    h, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    weight = mixer.conv_weight
    kernel = weight.shape[1]
    x = torch.cat((mixer.attn.q_proj(hidden), mixer.attn.k_proj(hidden), mixer.attn.v_proj(hidden)), dim=-1)
    if initial is None:
        buffer = torch.zeros(batch, weight.shape[0], kernel - 1, dtype=x.dtype)
        memory = torch.zeros(batch, h, d, d, dtype=x.dtype)
    else:
        buffer, memory = initial["conv"], initial["recurrent"]
    real = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
    outputs = []
    for t in range(length):
        window = torch.cat((buffer, x[:, t, :, None]), dim=-1)
        mixed = F.silu((window * weight).sum(-1)).reshape(batch, h + 2 * hkv, d)
        qt, kt, vt = l2(mixed[:, :h]) * d**-0.5, l2(mixed[:, h : h + hkv]), mixed[:, h + hkv :]
        kt, vt = kt.repeat_interleave(h // hkv, dim=1), vt.repeat_interleave(h // hkv, dim=1)
        beta = torch.sigmoid(hidden[:, t] @ mixer.b_proj.weight.T)
        g = -mixer.A_log.exp() * F.softplus(hidden[:, t] @ mixer.a_proj.weight.T + mixer.dt_bias)
        decayed = g.exp()[..., None, None] * memory
        updated = decayed + beta[..., None, None] * kt[..., :, None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, decayed))[..., None, :]
        keep = real[:, t, None]
        buffer = torch.where(keep[..., None], window[..., 1:], buffer)
        memory = torch.where(keep[..., None, None], updated, memory)
        core = torch.einsum("bhk,bhkv->bhv", qt, updated)
        z = (hidden[:, t] @ mixer.z_proj.weight.T).reshape(batch, h, d)
        outputs.append(rms(core, mixer.options.eps) * mixer.norm_weight * F.silu(z) * keep[..., None])
    return torch.stack(outputs, dim=2), {"conv": buffer, "recurrent": memory}


def attention_reference(mixer, hidden, position_embeddings, mask):
    """qwen3_5's gated attention: per-head zero-centred RMSNorm on q and k, RoPE, causal softmax over real keys,
    times 2 * sigmoid(gate) per head (the export folds the 2 into o_proj)."""
    q, k, v = mixer.project(hidden)
    eps = mixer.options.eps
    q, k = rms(q, eps) * (1 + mixer.q_norm_weight), rms(k, eps) * (1 + mixer.k_norm_weight)
    q, k = apply_rotary(q, k, position_embeddings)
    groups = mixer.spec.groups
    scores = q @ repeat_heads(k, groups).transpose(-1, -2) * mixer.spec.scaling
    length = hidden.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ repeat_heads(v, groups)
    gate = (hidden @ mixer.gate_proj.weight.T).reshape(*hidden.shape[:2], -1, q.shape[-1]).transpose(1, 2)
    out = out * 2 * torch.sigmoid(gate)
    return out if mask is None else out * mask[:, None, :, None]


CASES = [(length, initial, pad) for length in (1, 63, 130) for initial in (False, True) for pad in (False, True)]


@pytest.mark.parametrize("length,with_initial,padded", CASES, ids=[f"T{t}-{'init' if i else 'fresh'}-{'pad' if p else 'full'}" for t, i, p in CASES])
def test_gdn_every_form_equals_the_reference(length, with_initial, padded):
    model, mixer = randomised("qwen3_5_gdn")
    assert_conv_state_forms_match(model, mixer, gdn_reference, GDN_NEW, length, with_initial, padded)


@pytest.mark.parametrize("length,padded", [(1, False), (63, True), (130, False), (130, True)])
def test_attention_every_form_equals_the_reference(length, padded):
    model, mixer = randomised("qwen3_5_attention")
    hidden, position_embeddings, mask = layer_inputs(model, 2, length, min(5, length) if padded else 0, offset=0)
    names, params = zip(*[(n, p) for n, p in mixer.named_parameters() if n in ATTENTION_NEW])
    expected = attention_reference(mixer, hidden, position_embeddings, mask)
    expected_grads = gradients(expected, [hidden, *params])
    for form, (out, _) in forms(mixer, hidden, position_embeddings, mask, None).items():
        assert_close(out, expected, f"{form} output")
        for name, grad, want in zip(("hidden", *names), gradients(out, [hidden, *params]), expected_grads):
            assert_close(grad, want, f"{form} gradient of {name}")


@pytest.mark.parametrize("pad", [0, 3])
def test_attention_keeps_a_key_mask_only_once_it_has_seen_padding(pad):
    """The state holds keys and values alone until a padded token comes (nothing to read, so no host sync at each
    decode step); after a padded prompt, its mask, extended for the steps that follow without a padding mask (as eager
    code calls them). Keys after the first step go into room kept beside the state (`MixerState.append`). Each step's
    output is the reference's, as if the whole sequence were one call."""
    model, mixer = randomised("qwen3_5_attention")
    hidden, position_embeddings, mask = layer_inputs(model, 2, 8, pad, offset=0)
    expected = attention_reference(mixer, hidden, position_embeddings, mask)
    state, outs, keys = MixerState(), [], []
    with torch.no_grad():
        for start, end, step_mask in ((0, 5, mask), (5, 6, None), (6, 8, None)):
            piece = hidden[:, start:end]
            cos, sin = position_embeddings
            outs.append(mixer.mix(piece, *mixer.project(piece), (cos[:, start:end], sin[:, start:end]),
                                  None if step_mask is None else step_mask[:, start:end], state))
            assert ("mask" in state.tensors) == bool(pad)
            keys.append(state.tensors["k"].data_ptr())
    assert_close(torch.cat(outs, dim=2), expected.detach(), "steps after the prompt")
    assert keys[2] == keys[1] != keys[0]  # the keys of later steps are written into the room the second one made
    if pad:
        assert torch.equal(state.tensors["mask"], mask)


@pytest.mark.parametrize("pad", [0, 3])
def test_a_decode_step_attends_over_the_kv_heads_with_its_query_heads_packed(pad, monkeypatch):
    """A decode step gives SDPA its query heads packed by kv head, (B, Hkv, groups, D), and the keys and values as
    cached: no `enable_gqa`, no repeated heads; after a padded prompt, the key mask broadcast over heads. Its output
    is the reference's."""
    from linearize.hf import mixer_qwen3_5_attention

    model, mixer = randomised("qwen3_5_attention")
    hidden, position_embeddings, mask = layer_inputs(model, 2, 6, pad, offset=0)
    expected = attention_reference(mixer, hidden, position_embeddings, mask)
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, kwargs))
        return sdpa(q, k, v, **kwargs)

    state, cos, sin = MixerState(), *position_embeddings
    with torch.no_grad():
        prompt = mixer.mix(hidden[:, :5], *mixer.project(hidden[:, :5]), (cos[:, :5], sin[:, :5]), mask[:, :5] if pad else None, state)
        monkeypatch.setattr(mixer_qwen3_5_attention.F, "scaled_dot_product_attention", spy)
        step = mixer.mix(hidden[:, 5:], *mixer.project(hidden[:, 5:]), (cos[:, 5:], sin[:, 5:]), None, state)
    (query, keys, kwargs), = calls
    heads, kv_heads = mixer.spec.num_heads, mixer.spec.num_kv_heads
    assert kv_heads < heads and query == (2, kv_heads, heads // kv_heads, mixer.spec.head_dim) and keys[1] == kv_heads
    assert not kwargs.get("enable_gqa") and (kwargs["attn_mask"] is None) == (pad == 0)
    assert_close(torch.cat((prompt, step), dim=2), expected.detach(), "the prompt, then a decode step")


def test_attention_starts_as_a_gate_of_one_and_keeps_a_qwen3_teachers_own_norms():
    _, mixer = converted_mixer("qwen3_5_attention")
    assert {n for n, _ in mixer.named_parameters() if not n.startswith("attn.")} == ATTENTION_NEW
    assert not mixer.gate_proj.weight.any() and not mixer.q_norm_weight.any()
    qwen3 = mixers_in(linearize.convert(tiny_model("qwen3"), "qwen3_5_attention"))[0]
    assert {n for n, _ in qwen3.named_parameters() if not n.startswith("attn.")} == {"gate_proj.weight"}


def test_gdn_names_and_start():
    model, mixer = converted_mixer("qwen3_5_gdn")
    assert {n for n, _ in mixer.named_parameters() if not n.startswith("attn.")} == GDN_NEW
    assert mixer.options.eps == model.config.text_config.rms_norm_eps
    hidden, _, _ = layer_inputs(model, 2, 9, pad=0, offset=0)
    beta, g = mixer.gates(hidden, None)
    assert torch.allclose(beta, torch.full_like(beta, mixer.initial_beta))
    assert torch.allclose(g.exp(), torch.full_like(g, mixer.initial_decay))
    assert 0 < mixer.z_proj.weight.std() < 0.05


@pytest.mark.parametrize("name", ["qwen3_5_gdn", "qwen3_5_attention"])
def test_cost_counts_new_parameters_and_state(name):
    model, mixer = converted_mixer(name)
    cost = type(mixer).cost(mixer.spec, mixer.options)
    assert cost.new_parameters == sum(p.numel() for p in mixer.new_parameters())
    hidden, position_embeddings, _ = layer_inputs(model, 1, 5, pad=0, offset=0)
    state = MixerState()
    mixer.mix(hidden, *mixer.project(hidden), position_embeddings, None, state)
    held = sum(t.numel() for n, t in state.tensors.items() if n != "mask")
    assert held == cost.state_fixed + 5 * cost.state_per_token
    assert type(mixer).state_grows == (cost.state_per_token > 0)


@pytest.mark.parametrize(
    "name,family,options,message",
    [
        ("qwen3_5_gdn", "llama", dict(conv_size=0), "option 'conv_size' of mixer 'qwen3_5_gdn' must be at least 1"),
        ("qwen3_5_gdn", "llama", dict(eps=0.0), "option 'eps' of mixer 'qwen3_5_gdn' must be positive"),
        ("qwen3_5_attention", "gemma2", {}, "slides or soft-caps its scores, which qwen3_5 cannot express"),
        ("qwen3_5_attention", "olmo2", {}, "normalises q and k across all heads (OLMo-2 style)"),
    ],
)
def test_bad_options_and_teachers_are_one_line_errors(name, family, options, message):
    with pytest.raises(LinearizeError) as info:
        linearize.convert(tiny_model(family), name, **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
