"""Every causal-LM family of the installed transformers, through every mixer: converted and checked, or refused in one line.

Each family's tiny model gets one layer per mixer beside a kept softmax layer (`families.MIXER_LAYOUT`), so one
conversion exercises every mixer and the per-layer cache that mixes them. A converted family must give finite
logits wherever its teacher does, reload to the same weights and logits, and generate the same 12 greedy tokens
with and without the cache for a left-padded batch of two. A family that cannot be converted must say so in one
line (LinearizeError), never crash.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.hf.errors import LinearizeError
from tests.families import MIXER_LAYOUT, causal_lm_families, eager_experts, tiny_family_config, tiny_family_model
from tests.tiny import assert_reloaded, left_padded, random_ids

pytestmark = pytest.mark.core

# Families that must convert on every supported transformers version: a refusal here is a regression.
MUST_CONVERT = {"gemma", "gemma2", "gemma3_text", "gpt_neox", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3", "qwen3_moe", "starcoder2"}
FAMILIES = causal_lm_families()


def convert_every_mixer(model):
    layers: dict[str, list[int]] = {}
    for index, (mixer, _) in enumerate(MIXER_LAYOUT):
        layers.setdefault(mixer, []).append(index)
    hybrid = {mixer: indices for mixer, indices in layers.items() if mixer not in ("attention", "hedgehog")}
    options = {mixer: options for mixer, options in MIXER_LAYOUT if options}
    return linearize.convert(model, "hedgehog", keep_attention=layers["attention"], hybrid=hybrid, mixer_options=options)


def test_the_family_table_covers_the_installed_transformers():
    built = [name for name in FAMILIES if tiny_family_config(name)[0] is not None]
    assert MUST_CONVERT <= set(built), MUST_CONVERT - set(built)
    assert len(built) >= 80, f"only {len(built)} of {len(FAMILIES)} families could be built tiny"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_converts_through_every_mixer_or_is_refused_in_one_line(family, tmp_path):
    config, why = tiny_family_config(family)
    if config is None:
        pytest.skip(why)
    model = tiny_family_model(config)
    ids, mask = left_padded(random_ids(2, 12), [3, 0])
    try:
        student = convert_every_mixer(model)
    except LinearizeError as error:
        assert family not in MUST_CONVERT, str(error)
        assert "\n" not in str(error) and len(str(error)) < 400
        return
    assert [entry["mixer"] for entry in student.config.layers] == [mixer for mixer, _ in MIXER_LAYOUT]
    with torch.no_grad(), linearize.teacher_mode(student):
        teacher_finite = torch.isfinite(student(input_ids=ids, attention_mask=mask).logits)
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(logits[teacher_finite]).all()

    # 12 steps, twice the longest window in the layout (a family's own sliding window, 6) past a prompt longer than
    # it: every window, sliding-window and convolution state turns over while decoding, as it did in 20 steps
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    cached = student.generate(**settings)
    assert cached.shape[1] == 12 + 12
    assert torch.equal(cached, student.generate(**settings, use_cache=False))

    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, **eager_experts(config))
    assert type(reloaded).__name__ == "LinearizedForCausalLM"
    assert_reloaded(reloaded, student, input_ids=ids[1:])


@pytest.mark.parametrize("family", ["bamba", "falcon_h1", "qwen3_next"])
def test_a_teacher_that_already_keeps_a_recurrent_state_is_refused_in_one_line(family):
    """Mamba or linear-attention layers beside its attention: marked `_is_stateful` up to transformers 5.24, known by
    `config.layer_types` from 5.25 (where falcon_h1 converted and then broke in its cache)."""
    config, why = tiny_family_config(family)
    assert config is not None, why
    with pytest.raises(LinearizeError, match="already keeps a recurrent state") as error:
        linearize.convert(tiny_family_model(config), "hedgehog")
    assert "\n" not in str(error.value)
