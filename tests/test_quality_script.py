"""benchmarks/quality.py's rows are plain JSON, and quality.json reads back into a results file for the report."""

import json

import pytest

import linearize
from linearize.record import RunRecord, Scores, StageReport
from tests.tiny import benchmark_script, tiny_model

quality = benchmark_script("quality")


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


def test_every_retrieval_kind_reaches_the_results():
    row = {"recipe": "hybrid_long", "teacher": {"passkey_2048_by_depth": {"0.1": 1.0}}, "stages": [],
           "student": {"passkey_2048": 0.5, "passkey_2048_by_depth": {"0.1": 0.5}, "kv_4096_by_depth": {"0.5": 0.25, "0.9": 0.75},
                       "passkey_2048_misses": {"0.1": [{"answer": "12345", "said": " the pass key."}]}}}
    results = quality.as_results([row], eval_tokens=4096)
    assert [(r["model"], r["length"], r["depth"], r["value"]) for r in results.of("passkey")] == [("teacher", 2048, 0.1, 1.0), ("hybrid_long", 2048, 0.1, 0.5)]
    assert [(r["length"], r["depth"], r["value"]) for r in results.of("kv")] == [(4096, 0.5, 0.25), (4096, 0.9, 0.75)]
    assert [r["misses"] for r in results.of("passkey")] == [[], [{"answer": "12345", "said": " the pass key."}]]


def test_resume_reads_a_trained_student_back_and_continues_an_interrupted_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(quality, "run", lambda recipe, **kwargs: calls.append(kwargs) or "trained")
    trained, interrupted, fresh = tmp_path / "trained", tmp_path / "interrupted", tmp_path / "fresh"
    trained.mkdir()
    (trained / "config.json").write_text("{}")
    RunRecord(recipe={"teacher": "t"}, stages=[StageReport(stage=0, kind="lora_kd", steps=1, tokens=512, seconds=1.0)]).save(trained)
    (tmp_path / "interrupted.checkpoints").mkdir()
    (tmp_path / "interrupted.checkpoints" / "run.json").write_text("{}")
    record = quality.train_or_resume("recipe", trained, True, log=lambda m: None)
    assert record.stages[0].tokens == 512 and calls == []
    assert quality.train_or_resume("recipe", interrupted, True, log=print) == "trained"
    assert quality.train_or_resume("recipe", fresh, True, log=print) == "trained"
    assert quality.train_or_resume("recipe", trained, False, log=print) == "trained"
    assert [(c["out"].name, c["resume"], c["overwrite"]) for c in calls] == [("interrupted", True, False), ("fresh", False, True), ("trained", False, True)]


def test_retrieval_prompts_are_seeded_per_kind_and_passkey_as_before(monkeypatch):
    """Teacher and student answer the same prompts; passkey's are those of the runs before --ruler (seeded by length),
    so its figures compare with BENCHMARKS.md's earlier ones."""
    import random

    from tests.tiny import tiny_tokenizer

    from linearize.evaluate import longcontext

    asked = []
    monkeypatch.setattr(longcontext, "answer", lambda model, tokenizer, probe: asked.append(probe.prompt_ids) or "")
    tokenizer = tiny_tokenizer()
    by_depth, misses = quality.retrieval(None, tokenizer, "passkey", 300, trials=2)
    rng = random.Random(300)
    probes = [quality.make_probe(tokenizer, "passkey", 300, d, rng) for d in quality.DEPTHS for _ in range(2)]
    assert asked == [p.prompt_ids for p in probes]
    assert probes[0].answer == str(random.Random(300).randint(10000, 99999))  # the draws of every earlier run
    assert by_depth == {"0.1": 0.0, "0.5": 0.0, "0.9": 0.0}
    assert misses["0.5"] == [{"answer": p.answer, "said": ""} for p in probes[2:4]]
    asked.clear()
    quality.retrieval(None, tokenizer, "kv", 300, trials=2)
    first = list(asked)
    asked.clear()
    quality.retrieval(None, tokenizer, "kv", 300, trials=2)
    assert asked == first and len({tuple(p) for p in first}) == 6


def test_heldout_windows_are_cut_at_every_context_asked(tmp_path):
    from tests.tiny import tiny_tokenizer

    (tmp_path / "persuasion.txt").write_text("It is a truth universally acknowledged. " * 400)
    (tmp_path / "python-docs.txt").write_text("def f(x):\n    return x + 1\n" * 400)
    heldout = quality.heldout_windows(tiny_tokenizer(), tmp_path, [512, 2048], max_tokens=4096)
    assert sorted(heldout) == ["docs", "docs_2048", "persuasion", "persuasion_2048"]
    assert heldout["persuasion"].shape[1] == 512 and heldout["persuasion_2048"].shape == (2, 2048)
    assert [quality.text_and_context(f"ppl_{key}") for key in ("docs", "docs_2048")] == [("docs", 512), ("docs", 2048)]


def test_scoring_goes_on_from_the_first_measure_it_lacks(monkeypatch):
    """Under --resume a row cut short while scoring keeps its figures: only the missing measures are taken, each saved
    as it lands."""
    taken = []
    monkeypatch.setattr(quality, "perplexity", lambda model, windows, batch_size: taken.append(windows.shape[1]) or 9.0)
    monkeypatch.setattr(quality, "retrieval", lambda model, tokenizer, kind, n, trials: taken.append((kind, n)) or ({"0.1": 1.0, "0.9": 0.0}, {"0.1": [], "0.9": [{"answer": "12345", "said": " 123456."}]}))
    monkeypatch.setattr(quality, "tasks", lambda model, tokenizer, suite, limit: taken.append(suite) or {"tasks": []})
    model = tiny_model()
    heldout = {"persuasion": quality.torch.zeros(2, 512, dtype=quality.torch.long), "persuasion_2048": quality.torch.zeros(1, 2048, dtype=quality.torch.long)}
    into = {"ppl_persuasion": 30.0, "passkey_2048": 1.0, "passkey_2048_by_depth": {"0.1": 1.0}}
    saves = []
    quality.score(model, None, heldout, [2048, 4096], ["passkey", "kv"], 3, "local", None, into, lambda: saves.append(dict(into)))
    assert taken == [2048, ("passkey", 4096), ("kv", 2048), ("kv", 4096), "local"]
    assert into["ppl_persuasion"] == 30.0 and into["ppl_persuasion_2048"] == 9.0 and into["kv_4096"] == 0.5
    assert into["kv_4096_misses"]["0.9"] == [{"answer": "12345", "said": " 123456."}]
    assert len(saves) == 5
    taken.clear()
    quality.score(model, None, heldout, [2048, 4096], ["passkey", "kv"], 3, "local", None, into, lambda: saves.append(dict(into)))
    assert taken == [] and len(saves) == 5


def test_teacher_scores_come_from_an_earlier_run_and_a_bad_file_is_one_line(tmp_path):
    earlier = tmp_path / "quality.json"
    earlier.write_text(json.dumps([{"recipe": "hybrid_long", "teacher": {"ppl_persuasion": 35.05, "passkey_2048": 0.67}, "student": {}}]))
    assert quality.earlier_teacher(earlier) == {"ppl_persuasion": 35.05, "passkey_2048": 0.67}
    (tmp_path / "empty.json").write_text("[]")
    for bad, message in ((tmp_path / "missing.json", "give the quality.json of an earlier run"),
                         (tmp_path / "empty.json", "no teacher figures in it")):
        with pytest.raises(SystemExit, match=message):
            quality.earlier_teacher(bad)



def test_each_recipe_trains_on_its_own_windows_with_the_budgets_asked(tmp_path):
    """lolcats keeps its 2,048-token windows and the others their 512 (a forced 512 once made lolcats a different
    recipe); the token budgets, batch size and compile switch reach every stage, the scoring stays at 512."""
    args = quality.argparse.Namespace(teacher="t", eval_tokens=4096, batch_size=16, compile=True, overrides=["lolcats:stages.1.lr=0.001"])
    lolcats = quality.quality_recipe("lolcats", args, tmp_path, [100, 200])
    assert lolcats.data.seq_len == 2048 and lolcats.eval.seq_len == 512 and lolcats.data.train == str(tmp_path / "train")
    assert [(s.tokens, s.batch_size, s.compile) for s in lolcats.stages] == [(100, 16, True), (200, 16, True)] and lolcats.stages[1].lr == 0.001
    liger = quality.quality_recipe("liger", quality.argparse.Namespace(**{**vars(args), "batch_size": 0, "compile": False}), tmp_path, [300])
    assert liger.data.seq_len == 512 and all(s.tokens == 300 and not s.compile for s in liger.stages)
    assert [s.batch_size for s in liger.stages] == [s.batch_size for s in quality.load_recipe("liger").stages]
