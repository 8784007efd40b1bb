"""`linearize report`: tables, comparisons and figures from results files."""

from __future__ import annotations

import json
import sys

import matplotlib.image
import pytest

from linearize.evaluate.results import ModelEntry, Results
from linearize.hf.errors import LinearizeError
from linearize.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEACHER, STUDENT = "teacher of tiny-hedgehog", "tiny-hedgehog"


def eval_results() -> Results:
    results = Results(environment={"device": "cpu"})
    results.add_model(ModelEntry(TEACHER, "teacher", source="tiny", via="teacher_mode"))
    results.add_model(ModelEntry(STUDENT, "student", source="tiny", teacher=TEACHER, mixers={"hedgehog": 3}))
    for model, acc, ppl in ((TEACHER, 0.60, 10.0), (STUDENT, 0.45, 12.5)):
        results.add(model, "task", task="arc_easy", metric="acc", value=acc, stderr=0.02, samples=100, primary=True)
        results.add(model, "task", task="arc_easy", metric="acc_norm", value=acc - 0.1, stderr=0.02, samples=100, primary=False)
        for context in (512, 2048):
            results.add(model, "perplexity", data="persuasion", context=context, stride=context // 2, value=ppl * 512 / context, tokens=4000)
        for length in (256, 1024):
            for depth in (0.0, 0.5, 1.0):
                misses = [] if model == TEACHER else [{"answer": f"1234{length % 10}", "said": " the pass key.\nIt is"}]
                results.add(model, "passkey", length=length, depth=depth, value=1.0 if model == TEACHER else 0.5, trials=2, tokens=length, misses=misses)
    results.add(STUDENT, "agreement", teacher=TEACHER, data="persuasion", context=512, kl=0.0805, top1=0.83, tokens=16384)
    results.add(STUDENT, "training", stage=1, stage_kind="lora_kd", tokens=8_000_000, seconds=200.0, tokens_per_s=40_000.0)
    results.add(STUDENT, "training", stage=0, stage_kind="attention_transfer", tokens=4_000_000, seconds=100.0, tokens_per_s=40_000.0)
    return results


def bench_results() -> Results:
    results = Results(environment={"device": "cpu"})
    results.add_model(ModelEntry(TEACHER, "teacher", source="tiny", via="teacher_mode"))
    results.add_model(ModelEntry(STUDENT, "student", source="tiny", teacher=TEACHER, mixers={"hedgehog": 3}))
    for context in (512, 2048, 8192):
        results.add(TEACHER, "speed", context=context, batch=1, decode_tokens=32, prefill_tokens_per_s=1000.0,
                    decode_tokens_per_s=40.0 * 512 / context, prefill_peak_bytes=context * 2000, decode_peak_bytes=context * 1000,
                    cache_bytes=context * 1000, memory_method="rss_peak (approximate)")
        results.add(STUDENT, "speed", context=context, batch=1, decode_tokens=32, prefill_tokens_per_s=900.0,
                    decode_tokens_per_s=50.0, prefill_peak_bytes=context * 500, decode_peak_bytes=400_000,
                    cache_bytes=300_000, memory_method="rss_peak (approximate)")
    return results


def test_report_writes_markdown_numbers_and_readable_pngs(tmp_path):
    files = [eval_results().save(tmp_path / "eval.json"), bench_results().save(tmp_path / "bench.json")]
    report = write_report(files, tmp_path / "report")
    text = report.read_text()
    assert "| arc_easy | acc | 0.600 | 0.450 | 75.0 |" in text
    assert "| persuasion | 512 | 10.00 | 12.50 | 1.250 |" in text
    assert "| 256 | 1.00 | 0.50 |" in text
    assert "| tiny-hedgehog | persuasion | 512 | 0.0805 | 83.0% | 16384 |" in text
    # The student's first two passkey misses (shortest length, lowest depth first), its words quoted on one line.
    said = text[text.index("What each model said in place of the answer"):].split("\n\n")[1].splitlines()
    assert said[2:] == ['| tiny-hedgehog | 256 | 0 | 12346 | " the pass key.\\nIt is" |', '| tiny-hedgehog | 256 | 0.5 | 12346 | " the pass key.\\nIt is" |']
    assert text.index("| tiny-hedgehog | 0 | attention_transfer | 4,000,000 | 100.0 | – | 40,000 |") < text.index("| tiny-hedgehog | 1 | lora_kd | 8,000,000 |")
    assert "| tiny-hedgehog | 1 | 8192 | 20.00 |" in text  # decode 50 tok/s against the teacher's 2.5 at 8K
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["accuracy"][0]["recovered"][STUDENT] == pytest.approx(75.0)
    assert numbers["perplexity"][0]["ratio"][STUDENT] == pytest.approx(1.25)
    assert numbers["pairs"] == [{"teacher": TEACHER, "student": STUDENT}]
    assert set(numbers["figures"]) == {"accuracy", "perplexity", "passkey", "speed", "memory"}
    for name in numbers["figures"].values():
        path = tmp_path / "report" / name
        assert f"]({name})" in text
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_report_pairs_a_student_with_a_separately_scored_original_teacher(tmp_path):
    results = Results()
    results.add_model(ModelEntry("smollm2-135m", "teacher", source="smollm2-135m", via="original"))
    results.add_model(ModelEntry("student", "student", source="smollm2-135m"))
    results.add("smollm2-135m", "perplexity", data="persuasion", context=512, stride=256, value=10.0, tokens=100)
    results.add("student", "perplexity", data="persuasion", context=512, stride=256, value=11.0, tokens=100)
    write_report([results], tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["perplexity"][0]["ratio"]["student"] == pytest.approx(1.1)


def test_report_reads_a_run_folder_and_its_results_file(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "quickstart"
    folder.mkdir()
    run = {
        "recipe": {"teacher": "smollm2-135m", "data": {"heldout": "/home/someone/texts/persuasion"}, "eval": {"seq_len": 512, "perplexity_tokens": 8192}},
        "teacher": {"perplexity": 36.6, "generation": " it"}, "converted": {"perplexity": 158.9, "generation": " a"},
        "distilled": {"perplexity": 52.1, "generation": " it"},
        "stages": [{"stage": 0, "kind": "attention_transfer", "tokens": 32768, "seconds": 16.0, "first_step_seconds": 9.5},
                   {"stage": 1, "kind": "lora_kd", "tokens": 8192, "seconds": 8.0}],
    }
    (folder / "results.json").write_text(json.dumps(run))
    for given in (folder, folder / "results.json"):
        write_report([given], tmp_path / "report")
        numbers = json.loads((tmp_path / "report" / "report.json").read_text())
        (row,) = numbers["perplexity"]
        assert row["context"] == 512 and row["data"] == "persuasion"
        assert row["ratio"]["quickstart"] == pytest.approx(52.1 / 36.6) and row["ratio"]["quickstart (converted)"] == pytest.approx(158.9 / 36.6)
        assert [(r["stage"], r["tokens_per_s"], r["first_step_seconds"]) for r in numbers["training"]] == [(0, 2048.0, 9.5), (1, 1024.0, None)]
        assert "| quickstart | 0 | attention_transfer | 32,768 | 16.0 | 9.5 | 2,048 |" in (tmp_path / "report" / "report.md").read_text()
        assert "perplexity" in numbers["figures"]

    from linearize import cli

    monkeypatch.setattr(sys, "argv", ["linearize", "report", str(folder / "results.json"), "--out", str(tmp_path / "cli")])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0 and (tmp_path / "cli" / "report.md").is_file(), capsys.readouterr().err


def test_report_errors_are_one_line(tmp_path):
    with pytest.raises(LinearizeError, match="no results given"):
        write_report([], tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LinearizeError, match="is a file; give a folder"):
        write_report([eval_results()], tmp_path / "file")
    with pytest.raises(LinearizeError, match="hold no measurements"):
        write_report([Results()], tmp_path / "out")


def test_report_command(tmp_path, monkeypatch, capsys):
    from linearize import cli

    results = eval_results().save(tmp_path / "eval.json")
    monkeypatch.setattr(sys, "argv", ["linearize", "report", str(results), "--out", str(tmp_path / "report")])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code in (0, None) and (tmp_path / "report" / "report.md").is_file()
    monkeypatch.setattr(sys, "argv", ["linearize", "report", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert "does not exist; write one with `linearize eval" in error and error.count("\n") == 1


def test_one_text_at_one_context_with_two_strides_is_two_rows(tmp_path):
    """A run's back-to-back windows and eval's strided ones are different numbers: neither hides the other."""
    results = Results()
    results.add_model(ModelEntry("teacher", "teacher"))
    results.add_model(ModelEntry("student", "student", teacher="teacher"))
    for stride, teacher, student in ((512, 36.6, 52.1), (256, 34.5, 49.7)):
        results.add("teacher", "perplexity", data="persuasion", context=512, stride=stride, value=teacher, tokens=4096)
        results.add("student", "perplexity", data="persuasion", context=512, stride=stride, value=student, tokens=4096)
    text = write_report([results], tmp_path).read_text()
    assert "| persuasion | 512 | 256 | 34.50 | 49.70 | 1.441 |" in text and "| persuasion | 512 | 512 | 36.60 | 52.10 | 1.423 |" in text
