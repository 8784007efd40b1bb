"""The layer plan: typed, kept in config.json in the format saved checkpoints already have, read through LayerPlan."""

import json

import pytest

import linearize
from linearize import LinearizeError
from linearize.hf.configuration_linearized import LinearizedConfig
from linearize.hf.plan import ATTENTION, LayerPlan, LayerSpec
from tests.tiny import tiny_config, tiny_model

pytestmark = pytest.mark.core

# `layers` as config.json holds it (and as every checkpoint saved so far has it).
SAVED = [{"mixer": "attention", "options": {}}, {"mixer": "hedgehog_swa", "options": {"feature_dim": 16, "window": 5}}]


def test_the_plan_round_trips_through_the_layers_of_config_json():
    plan = LayerPlan.from_json(SAVED)
    assert plan == LayerPlan((LayerSpec(ATTENTION), LayerSpec("hedgehog_swa", {"feature_dim": 16, "window": 5})))
    assert plan.to_json() == SAVED and LayerPlan.from_json(plan.to_json()) == plan
    assert plan.mixer_names() == ["attention", "hedgehog_swa"] and plan.converted() == [1]
    assert [entry.is_attention for entry in plan] == [True, False] and len(plan) == 2


def test_an_entry_without_options_takes_none():
    assert LayerPlan.from_json([{"mixer": "swa"}, {"mixer": "swa", "options": None}]).to_json() == [{"mixer": "swa", "options": {}}] * 2


def test_a_saved_config_keeps_the_layers_format_and_reads_back_the_same_plan(tmp_path):
    config = LinearizedConfig(text_config=tiny_config(), layers=SAVED)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layers"] == SAVED and "plan" not in saved
    reloaded = LinearizedConfig.from_pretrained(tmp_path)
    assert reloaded.layers == SAVED and reloaded.plan == config.plan == LayerPlan.from_json(SAVED)


def test_setting_the_plan_rewrites_the_layers():
    config = LinearizedConfig(text_config=tiny_config(), layers=LayerPlan.from_json(SAVED))
    config.plan = config.plan.with_layers({1: LayerSpec(ATTENTION)})
    assert config.layers == [{"mixer": "attention", "options": {}}] * 2
    assert config.plan.with_options([{}, {"window": 3}]).to_json()[1] == {"mixer": "attention", "options": {"window": 3}}


@pytest.mark.parametrize(
    "layers, message",
    [
        ({"mixer": "gla"}, "the plan (layers in config.json) is dict, not a list"),
        ([{"options": {}}], "layer 0 of the plan is {'options': {}}"),
        ([{"mixer": "gla"}, {"mixer": "gla", "options": [4]}], "layer 1 of the plan is"),
        (["gla"], "layer 0 of the plan is 'gla'"),
    ],
)
def test_a_malformed_plan_is_refused_in_one_line(layers, message):
    with pytest.raises(LinearizeError) as info:
        LinearizedConfig(text_config=tiny_config(), layers=layers)
    assert message in str(info.value) and "config.json" in str(info.value) and "\n" not in str(info.value)


def test_convert_records_the_resolved_plan_and_revert_rewrites_it():
    student = linearize.convert(tiny_model(), "gla", keep_attention=[0], window=4)
    gla = LayerSpec("gla", {"gate_normalizer": 16.0, "window": 4})
    assert student.config.plan == LayerPlan((LayerSpec(ATTENTION), gla, gla))
    linearize.surgery.revert_to_attention(student, [1])
    assert student.config.plan == LayerPlan((LayerSpec(ATTENTION), LayerSpec(ATTENTION), gla))
    assert student.cache_kinds() == ["kv", "kv", "state"]
