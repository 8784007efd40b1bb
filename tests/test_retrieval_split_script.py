"""benchmarks/retrieval_split.py: a retrieval probe scored greedily and split into its answer's opening and the rest."""

import json
import random

import pytest
import torch

import linearize
from linearize.evaluate.longcontext import answer, answer_of, make_probe
from tests.tiny import benchmark_script, run_as_script, run_main, tiny_model, tiny_tokenizer

retrieval_split = benchmark_script("retrieval_split")


def test_the_split_reads_each_answer_token_where_the_model_predicts_it():
    model, tokenizer = tiny_model(dtype=torch.float32).eval(), tiny_tokenizer()
    probe = make_probe(tokenizer, "passkey", 320, 0.5, random.Random(0))
    scored = retrieval_split.split(model, tokenizer, probe)
    tokens = tokenizer(" " + probe.answer, add_special_tokens=False)["input_ids"]
    logprobs, argmaxes = [], []
    with torch.no_grad():
        for i, token in enumerate(tokens):  # one prefix at a time: the next token's distribution after prompt + answer[:i]
            last = model(torch.tensor([probe.prompt_ids + tokens[:i]])).logits[0, -1].log_softmax(-1)
            logprobs.append(last[token].item())
            argmaxes.append(last.argmax().item())
    assert scored["opening"] == pytest.approx(logprobs[0], abs=1e-4)
    assert scored["rest"] == pytest.approx(sum(logprobs[1:]), abs=1e-4)
    assert scored["copied"] == (argmaxes[1:] == tokens[1:])
    assert scored["greedy"] == (answer_of(answer(model, tokenizer, probe)) == probe.answer)


def test_a_summary_counts_and_averages_the_probes():
    rows = [{"greedy": True, "copied": True, "opening": -0.5, "rest": -0.1}, {"greedy": False, "copied": True, "opening": -2.5, "rest": -0.3}]
    assert retrieval_split.summary(rows) == {"greedy": 1, "copied": 2, "probes": 2, "opening_logprob": -1.5, "rest_logprob": -0.2}


def run_script(*args):
    return run_main(retrieval_split, *args)


def test_each_converted_layer_restored_in_turn_is_a_row(tmp_path):
    teacher = tiny_model(dtype=torch.float32)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    linearize.convert(teacher, "hedgehog_swa", window=8, keep_attention=[1]).save_pretrained(tmp_path / "student")
    out = tmp_path / "split.json"
    done = run_script("--teacher", str(tmp_path / "teacher"), "--students", str(tmp_path / "student"), "--lengths", "300",
                      "--trials", "1", "--restore-each", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"][-7:], r.get("restored"), r["probes"]) for r in rows] == [("teacher", None, 3), ("student", None, 3), ("student", [0], 3), ("student", [2], 3)]
    assert all(r["greedy"] == 0 for r in rows[2:])  # restored rows are teacher-forced only


def test_restoring_without_a_student_is_one_line_naming_the_fix(tmp_path):
    """As a script, in a process of its own (the other tests call its main() here)."""
    done = run_as_script("retrieval_split", "--restore-each", "--out", tmp_path / "x.json")
    assert done.returncode != 0 and "pass one with --students" in done.stderr.strip().splitlines()[-1]


def test_a_restored_layer_makes_the_student_compute_it_as_its_teacher(tmp_path):
    teacher = tiny_model(dtype=torch.float32)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    linearize.convert(teacher, "hedgehog_swa", window=8, keep_attention=[1]).save_pretrained(tmp_path / "student")
    common = ["--teacher", str(tmp_path / "teacher"), "--students", str(tmp_path / "student"), "--lengths", "300", "--trials", "1", "--device", "cpu"]
    done = run_script(*common, "--restore", "0,2", "--out", str(tmp_path / "split.json"))
    assert done.returncode == 0, done.stderr
    teacher_row, student_row = json.loads((tmp_path / "split.json").read_text())["rows"]
    assert student_row["restored"] == [0, 2]  # every layer softmax again: the teacher's own scores
    assert student_row["opening_logprob"] == pytest.approx(teacher_row["opening_logprob"], abs=1e-3)
    assert student_row["rest_logprob"] == pytest.approx(teacher_row["rest_logprob"], abs=1e-3)
    done = run_script(*common, "--restore", "1", "--out", str(tmp_path / "x.json"))  # layer 1 was kept, not converted
    assert done.returncode != 0 and "its converted layers are [0, 2]" in done.stderr.strip().splitlines()[-1]


def test_window_only_layers_score_as_the_sliding_window_alone(tmp_path):
    """With its linear branch switched off, a hedgehog_swa layer is the plain sliding-window softmax of `swa`."""
    teacher = tiny_model(dtype=torch.float32)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    linearize.convert(tiny_model(dtype=torch.float32), "hedgehog_swa", window=8, keep_attention=[1]).save_pretrained(tmp_path / "student")
    linearize.convert(tiny_model(dtype=torch.float32), "swa", window=8, keep_attention=[1]).save_pretrained(tmp_path / "window")
    linearize.convert(tiny_model(dtype=torch.float32), "hedgehog", keep_attention=[1]).save_pretrained(tmp_path / "linear")
    common = ["--teacher", str(tmp_path / "teacher"), "--lengths", "300", "--trials", "1", "--device", "cpu"]
    done = run_script(*common, "--students", str(tmp_path / "student"), "--window-only", "0,2", "--out", str(tmp_path / "off.json"))
    assert done.returncode == 0, done.stderr
    done = run_script(*common, "--students", str(tmp_path / "window"), "--out", str(tmp_path / "window.json"))
    assert done.returncode == 0, done.stderr
    (_, off), (_, window) = (json.loads((tmp_path / f"{name}.json").read_text())["rows"] for name in ("off", "window"))
    assert off["window_only"] == [0, 2] and "window_only" not in window
    assert off["opening_logprob"] == pytest.approx(window["opening_logprob"], abs=1e-3)
    assert off["rest_logprob"] == pytest.approx(window["rest_logprob"], abs=1e-3)
    for student, layers, message in (("student", "1", "its converted layers are [0, 2]"), ("linear", "0", "have no window and linear branch"),
                                     ("student", "six", "--window-only takes layer indices")):
        done = run_script(*common, "--students", str(tmp_path / student), "--window-only", layers, "--out", str(tmp_path / "x.json"))
        assert done.returncode != 0 and message in done.stderr.strip().splitlines()[-1]
