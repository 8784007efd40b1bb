"""Scoring and reporting on the real SmolLM2-135M-Instruct teacher and its Hedgehog conversion (a real student's push is
checked with its save and reload in test_real_teacher.py)."""

from __future__ import annotations

import copy
import json

import matplotlib.image
import pytest
import torch

import linearize
from linearize.evaluate.perplexity import strided_perplexity
from linearize.evaluate.scoring import evaluate
from linearize.evaluate.speed import benchmark
from linearize.report import write_report
from linearize.textdata import packaged_text
from tests.test_report import PNG_SIGNATURE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(smollm2):
    teacher, tokenizer = smollm2
    return linearize.convert(copy.deepcopy(teacher), "hedgehog", source="smollm2-135m"), tokenizer


def test_teacher_retrieves_the_passkey_at_256_tokens(smollm2):
    teacher, tokenizer = smollm2
    results = evaluate(teacher, tokenizer, passkey=True, lengths=[256], depths=[0, 0.5, 1], trials=2, progress=False)
    scores = [r["value"] for r in results.of("passkey")]
    assert len(scores) == 3 and sum(scores) / len(scores) >= 0.8
    assert all(200 <= r["tokens"] <= 256 for r in results.of("passkey"))


def test_real_text_is_far_more_predictable_than_its_tokens_shuffled(smollm2):
    teacher, tokenizer = smollm2
    ids = torch.tensor(tokenizer(packaged_text("persuasion")[:8000], add_special_tokens=False)["input_ids"][:1024])
    shuffled = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
    real, tokens = strided_perplexity(teacher, ids, context=256)
    noise, _ = strided_perplexity(teacher, shuffled, context=256)
    assert tokens == 255 + 6 * 128
    assert real < 40 and noise > 10 * real


def test_local_task_perplexity_speed_and_report_end_to_end(converted, tmp_path):
    student, tokenizer = converted
    results = evaluate(
        student, tokenizer, name="smollm2-hedgehog", suite="local", limit=8, batch_size=16, perplexity="persuasion", contexts=[256], max_tokens=512,
        progress=False,
    )
    teacher_name = "teacher of smollm2-hedgehog"
    for model in (teacher_name, "smollm2-hedgehog"):
        assert {r["metric"] for r in results.of("task", model)} == {"acc", "acc_norm"}
        assert all(0.0 <= r["value"] <= 1.0 and r["samples"] == 8 for r in results.of("task", model))
    accuracy = {r["model"]: r["value"] for r in results.of("task") if r["primary"]}
    assert accuracy[teacher_name] > 0.3  # four choices: chance is 0.25
    ppl = {r["model"]: r["value"] for r in results.of("perplexity")}
    assert 1 < ppl[teacher_name] < 40 and ppl["smollm2-hedgehog"] > ppl[teacher_name]  # undistilled: worse

    speed = benchmark(student, name="smollm2-hedgehog", lengths=[64, 128], decode_tokens=4, progress=False)
    report = write_report([results.save(tmp_path / "eval.json"), speed.save(tmp_path / "bench.json")], tmp_path / "report")
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(numbers["figures"]) == {"accuracy", "perplexity", "speed", "memory"}
    assert "austen_next_sentence" in report.read_text()
    for name in numbers["figures"].values():
        path = tmp_path / "report" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE and matplotlib.image.imread(path).ndim == 3
