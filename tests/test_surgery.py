"""The surgery pass on tiny models of several families: exact teacher reuse, validation, errors."""

import pytest
import torch

import linearize
from linearize import LinearizeError
from linearize.hf.attention import decoder_layers
from linearize.hf.mixers import mixers_in
from tests.tiny import FAMILIES, random_ids, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_teacher_mode_is_exactly_the_teacher(family):
    teacher = tiny_model(family)
    ids = random_ids(2, 13)
    expected = teacher(ids).logits
    student = linearize.convert(teacher, "hedgehog_swa", window=4)
    with linearize.teacher_mode(student):
        assert torch.equal(student(ids).logits, expected)
    assert not torch.allclose(student(ids).logits, expected, atol=1e-3), "the student should differ from the teacher"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_layer_converted_to_attention_changes_nothing(family):
    teacher = tiny_model(family)
    ids = random_ids(2, 13)
    expected = teacher(ids).logits
    student = linearize.convert(teacher, "attention")
    assert student.config.mixer_names() == ["attention"] * teacher.config.num_hidden_layers
    assert torch.equal(student(ids).logits, expected)


def test_partial_conversion_keeps_the_rest_exact():
    teacher = tiny_model()
    ids = random_ids(2, 13)
    expected = teacher(ids).logits
    student = linearize.convert(teacher, "hedgehog", keep_attention="first:1", layers="last:1")
    assert student.config.mixer_names() == ["attention", "attention", "hedgehog"]
    with linearize.teacher_mode(student):
        assert torch.equal(student(ids).logits, expected)


def test_all_attention_layout_is_refused():
    with pytest.raises(LinearizeError, match="nothing would be converted"):
        linearize.convert(tiny_model(), "hedgehog", keep_attention="0-2")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reading_reproduces_each_teacher_attention(family):
    """The reading of q/k/v/o that every mixer relies on gives the teacher's own attention output."""
    linearize.surgery.verify_reading(tiny_model(family), range(FAMILIES[family]["num_hidden_layers"]))


def test_mixer_reuses_teacher_weights_in_place():
    teacher = tiny_model()
    q_weight = teacher.model.layers[1].self_attn.q_proj.weight
    student = linearize.convert(teacher, "hedgehog")
    layer = decoder_layers(student, 3)[1]
    assert layer.self_attn.attn.q_proj.weight is q_weight
    new = {n for n, _ in layer.self_attn.named_parameters() if not n.startswith("attn.")}
    assert new == {"feature_q.weight", "feature_q.bias", "feature_k.weight", "feature_k.bias"}


BAD_PLANS = [
    (dict(mixer="hedgehog_swq"), "did you mean 'hedgehog_swa'"),
    (dict(mixer="hedgehog", keep_attention=[5]), "layer 5 is out of range; the model has layers 0-2"),
    (dict(mixer="hedgehog", keep_attention=[1, 1]), "layer 1 is listed twice"),
    (dict(mixer="hedgehog", keep_attention=[0], layers=[0, 1]), "layer 0 is claimed twice"),
    (dict(mixer="hedgehog", window=8), "does not take option(s) window; it takes: feature_dim"),
    (dict(mixer="hedgehog_swa", window="x"), "option 'window' of mixer 'hedgehog_swa' must be a int"),
    (dict(mixer="hedgehog_swa", window=4096), "longer than the model's context of 512 tokens"),
    (dict(mixer="hedgehog", keep_attention="every:0"), "bad pattern"),
    (dict(mixer="hedgehog", keep_attention="auto:1"), "chooses layers by distillation"),
]


@pytest.mark.parametrize("kwargs,message", BAD_PLANS, ids=[m for _, m in BAD_PLANS])
def test_bad_plan_raises_and_leaves_model_untouched(kwargs, message):
    teacher = tiny_model()
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    modules = [type(m) for m in teacher.modules()]
    with pytest.raises(LinearizeError) as info:
        linearize.convert(teacher, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert [type(m) for m in teacher.modules()] == modules
    assert all(torch.equal(before[n], p) for n, p in teacher.state_dict().items())


def test_model_without_recognisable_attention_is_refused():
    teacher = tiny_model()
    for layer in teacher.model.layers:
        layer.self_attn.qkv = layer.self_attn.q_proj
        del layer.self_attn.q_proj
    with pytest.raises(LinearizeError, match="no q/k/v projections linearize recognises"):
        linearize.convert(teacher, "hedgehog")


def test_attention_computed_differently_is_refused():
    """A teacher whose attention does something linearize does not read (here: an extra output scale) is caught."""
    teacher = tiny_model()
    teacher.model.layers[1].self_attn.register_forward_hook(lambda module, args, out: (out[0] * 1.5, out[1]))
    with pytest.raises(LinearizeError, match="layer 1: LlamaAttention computes attention differently"):
        linearize.convert(teacher, "hedgehog")


def test_converting_a_converted_model_is_refused():
    student = linearize.convert(tiny_model(), "hedgehog")
    with pytest.raises(LinearizeError, match="already converted"):
        linearize.convert(student, "hedgehog")


def test_plan_is_recorded_with_resolved_options():
    student = linearize.convert(tiny_model(), "hedgehog_swa", keep_attention=[2], window=5)
    assert student.config.layers == [
        {"mixer": "hedgehog_swa", "options": {"feature_dim": 16, "window": 5, "decay": 0.0, "linear_rope": True, "keep": 0, "keep_block": 64}},
        {"mixer": "hedgehog_swa", "options": {"feature_dim": 16, "window": 5, "decay": 0.0, "linear_rope": True, "keep": 0, "keep_block": 64}},
        {"mixer": "attention", "options": {}},
    ]


def test_a_restored_layer_generates_from_its_own_cache():
    """One converted layer back on softmax attention (its mixer's `teacher` set, as a layer selection restores it) keeps
    keys and values in the cache while the others keep their states: cached greedy decoding equals uncached."""
    student = linearize.convert(tiny_model(dtype=torch.float32), "hedgehog_swa", window=4, keep_attention=[1])
    mixers = {m.layer_idx: m for m in mixers_in(student)}
    mixers[0].teacher = True
    assert student.cache_kinds() == ["kv", "kv", "state"]
    ids = random_ids(2, 9)
    cached = student.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    uncached = ids
    with torch.no_grad():
        for _ in range(6):
            uncached = torch.cat((uncached, student(uncached, use_cache=False).logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(cached, uncached)
    mixers[0].teacher = False
    assert student.cache_kinds() == ["state", "kv", "state"]
