"""benchmarks/quality.py's rows are plain JSON, and quality.json reads back into a results file for the report."""

import importlib.util
import json
import sys

import linearize
from linearize.record import RunRecord, Scores, StageReport
from tests.conftest import REPO_ROOT
from tests.tiny import tiny_model

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # quality.py imports its sibling passkey_probe, as when run as a script
_SPEC = importlib.util.spec_from_file_location("quality", REPO_ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)


def test_a_trained_recipe_row_is_json_and_reaches_the_results():
    model = linearize.convert(tiny_model(), "gated_deltanet", keep_attention=[1], window=4)
    stages = [StageReport(stage=0, kind="attention_transfer", steps=3, tokens=3000, seconds=2.0, first={"loss": 1.0}),
              StageReport(stage=1, kind="lora_kd", steps=3, tokens=6000, seconds=3.0, details={"targets": 8})]
    record = RunRecord(recipe={}, stages=stages, selection={"kept_attention": [1]}, converted=Scores(perplexity=170.7))
    row = quality.training_row("hybrid_gdn", record, model, {"ppl_persuasion": 35.05}, 12.5)
    row["student"] = {"ppl_persuasion": 35.91, "ppl_dialogue_2048": 20.0}
    row = json.loads(json.dumps([row]))[0]
    assert row["attention_layers"] == [1] and row["mixer_counts"] == {"gated_deltanet": 2, "attention": 1}
    assert row["stages"][1]["details"] == {"targets": 8} and row["selection"] == {"kept_attention": [1]}
    results = quality.as_results([row], eval_tokens=4096)
    perplexities = {(r["model"], r["data"], r["context"]): r["value"] for r in results.of("perplexity")}
    assert perplexities == {("teacher", "persuasion", 512): 35.05, ("hybrid_gdn", "persuasion", 512): 35.91,
                            ("hybrid_gdn", "dialogue", 2048): 20.0}
    assert [r["tokens_per_s"] for r in results.of("training")] == [1500.0, 2000.0]
