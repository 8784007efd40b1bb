"""The decode benchmarks' own logic: decode_dispatches.py's dispatches and host time per layer kind and its profile by
caller; sdpa_decode.py's three SDPA layouts compute the same attention; cpu_decode.py's ratios to each teacher and its
fastest round per model."""

import os
import sys

import pytest
import torch

import linearize
from linearize.evaluate.results import Results
from tests.tiny import benchmark_script, random_ids, tiny_model


def test_a_measured_step_counts_each_layer_kind_and_its_trace_names_the_mixer(tmp_path):
    decode_dispatches = benchmark_script("decode_dispatches")
    model = linearize.convert(tiny_model(num_hidden_layers=2), "gated_deltanet", keep_attention=[1]).eval()
    result = decode_dispatches.measure(model, context=16, steps=2, trace=tmp_path / "step.txt")
    kinds = result["layers"]
    assert {kind: row["count"] for kind, row in kinds.items()} == {"GatedDeltaNetMixer": 1, "LlamaAttention": 1, "LlamaMLP": 2}
    assert all(row["dispatches"] > 0 and row["ms"] > 0 for row in kinds.values())
    assert result["step_ms"] > 0
    table = (tmp_path / "step.txt").read_text()
    assert "Self CPU" in table and "aten::mm" in table  # the calling lines too where torch records stacks (2.13 does)


@pytest.mark.parametrize("length", [1, 7, 300])
def test_the_sdpa_layouts_timed_compute_the_same_attention(length):
    sdpa_decode = benchmark_script("sdpa_decode")
    generator = torch.Generator().manual_seed(length)
    q = torch.randn(1, 9, 1, 64, generator=generator)
    k, v = torch.randn(2, 1, 3, length, 64, generator=generator)
    expected = sdpa_decode.call("gqa", q, k, v)
    torch.testing.assert_close(sdpa_decode.call("packed", q, k, v).reshape(expected.shape), expected)
    torch.testing.assert_close(sdpa_decode.call("masked", q, k, v), expected)


def test_each_growing_sdpa_row_meets_key_lengths_no_row_before_it_used():
    """cuDNN keeps its graphs for the process: a growing row timed on lengths an earlier row built would time cache
    hits, not a decode step's build; a fixed row's warm-up is its own shape, so it times hits only."""
    sdpa_decode = benchmark_script("sdpa_decode")
    used = set()
    for row in range(12):
        grow = row % 2 == 0
        warm, timed = sdpa_decode.row_lengths(2048, 50, row, grow)
        assert len(timed) == 50 and len(warm) == sdpa_decode.WARM_CALLS
        if grow:
            assert timed == list(range(timed[0], timed[0] + 50)) and not used & set(timed) and not set(warm) & set(timed)
        else:
            assert set(warm) == set(timed) == {timed[0]}
        used |= set(warm) | set(timed)
    assert min(used) > 0
    k, v = sdpa_decode.keys([5, 9], "bshd", "cpu")[1]
    assert k.shape == v.shape == (1, 3, 9, 64) and k.stride(1) == 64


def speed(model: str, rate: float) -> dict:
    return {"model": model, "kind": "speed", "context": 2048, "batch": 1, "decode_tokens_per_s": rate}


def test_cpu_decode_gives_the_students_ratio_to_each_teacher_measured_beside_it():
    cpu_decode = benchmark_script("cpu_decode")
    both = Results(records=[speed("teacher of s", 10.0), speed("s", 12.0), speed("transformers teacher of s", 8.0)])
    assert cpu_decode.ratios(both, "s") == "student / teacher 2048: 1.20; student / transformers teacher 2048: 1.50"
    assert cpu_decode.ratios(Results(records=both.records[:2]), "s") == "student / teacher 2048: 1.20"


def test_cpu_decode_keeps_each_models_fastest_round():
    cpu_decode = benchmark_script("cpu_decode")
    first = Results(records=[speed("s", 12.0), speed("transformers teacher of s", 8.0)])
    second = Results(records=[speed("s", 11.0), speed("transformers teacher of s", 9.0)])
    best = {r["model"]: r["decode_tokens_per_s"] for r in cpu_decode.fastest([first, second]).of("speed")}
    assert best == {"s": 12.0, "transformers teacher of s": 9.0}


@pytest.mark.parametrize("as_generate", [False, True])
def test_a_measured_step_passes_what_generate_passes_only_when_asked(as_generate):
    decode_dispatches = benchmark_script("decode_dispatches")
    model = linearize.convert(tiny_model(num_hidden_layers=2), "gated_deltanet", keep_attention=[1]).eval()
    steps = []
    model.register_forward_pre_hook(lambda module, args, kwargs: steps.append(kwargs), with_kwargs=True)
    decode_dispatches.measure(model, context=16, steps=2, as_generate=as_generate)
    decode = steps[1:]  # after the prefill: 3 warm-up steps, 2 timed, 1 counted
    assert len(decode) == 6
    seen = [(k["attention_mask"].shape[1], k["position_ids"].item(), k["cache_position"].item()) for k in decode] if as_generate else []
    assert seen == ([(17 + i, 16 + i, 16 + i) for i in range(6)] if as_generate else [])
    assert all(("attention_mask" in k) == as_generate for k in decode)


def test_paired_decode_keeps_a_softmax_layers_context_and_rates_each_block_against_the_teachers():
    """A block of steps starts from the prompt's context in a softmax layer (its cache cut back), while a converted
    layer's state moves on; each block's ratio is the teacher's ms over the model's, averaged with its error."""
    decode_paired = benchmark_script("decode_paired")
    ids = random_ids(1, 12)
    for model in (tiny_model(num_hidden_layers=2).eval(), linearize.convert(tiny_model(num_hidden_layers=2), "gated_deltanet", keep_attention=[1]).eval()):
        with torch.no_grad():
            run = decode_paired.Decoding(model, ids)
            assert run.cache.get_seq_length() == 13
            assert run.block(3) > 0 and run.cache.get_seq_length() == 15
    rows = decode_paired.paired({"teacher": [10.0, 12.0], "s": [5.0, 12.0]})
    assert rows["teacher"] == {"median_ms": 11.0, "ratio_mean": 1.0, "ratio_error": 0.0}
    assert rows["s"]["ratio_mean"] == 1.5 and rows["s"]["ratio_error"] == pytest.approx(0.5) and rows["s"]["median_ms"] == 8.5


def test_paired_prefills_run_each_model_on_the_whole_prompt_in_turns():
    """With `Prefilling`, a block runs its model on the whole prompt (a fresh cache each time), once per prefill asked,
    in the rotated order of the decode's blocks."""
    decode_paired = benchmark_script("decode_paired")
    ids = random_ids(1, 12)
    models = {"teacher": tiny_model(num_hidden_layers=2), "s": linearize.convert(tiny_model(num_hidden_layers=2), "gated_deltanet", keep_attention=[1])}
    calls = []
    for name, model in models.items():
        model.register_forward_pre_hook(lambda module, args, kwargs, name=name: calls.append((name, args[0].shape[1], kwargs.get("past_key_values"))), with_kwargs=True)
    times = decode_paired.in_turns(models, ids, blocks=3, steps=2, kind=decode_paired.Prefilling)
    assert {name: len(ms) for name, ms in times.items()} == {"teacher": 3, "s": 3} and all(m > 0 for ms in times.values() for m in ms)
    assert [name for name, _, _ in calls] == ["teacher", "s"] + ["teacher"] * 2 + ["s"] * 2 + ["s"] * 2 + ["teacher"] * 2 + ["teacher"] * 2 + ["s"] * 2
    assert all(length == 12 and cache is None for _, length, cache in calls)


def test_decode_paired_decodes_a_students_pytorch_path_with_the_cpu_step_switched_off(monkeypatch):
    decode_paired = benchmark_script("decode_paired")
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "auto")
    decode_paired.switch_path("lolcats@pytorch")
    assert os.environ["LINEARIZE_FUSED_STEP"] == "off"
    decode_paired.switch_path("lolcats")
    assert "LINEARIZE_FUSED_STEP" not in os.environ


@pytest.mark.parametrize("script, argv, message", [
    ("cpu_decode", ["--threads", "-1"], "--threads must be 0 (torch's default) or more, got -1"),
    ("decode_paired", ["--blocks", "1"], "--blocks must be at least 2"),
])
def test_a_decode_script_refuses_bad_arguments_before_loading_anything(monkeypatch, capsys, script, argv, message):
    module = benchmark_script(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    monkeypatch.setattr(module, "load_teacher", lambda *a, **k: pytest.fail("loaded a teacher"))
    with pytest.raises(SystemExit):
        module.main()
    assert message in capsys.readouterr().err
