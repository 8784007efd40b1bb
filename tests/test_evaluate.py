"""Scoring on tiny random models: lm-eval tasks, perplexity, retrieval, speed, results files and their errors."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import linearize
from linearize.evaluate.limits import check_lengths
from linearize.evaluate.longcontext import answer_of, make_probe
from linearize.evaluate.perplexity import agreement, perplexity, strided_perplexity
from linearize.evaluate.results import load_results
from linearize.evaluate.scoring import evaluate
from linearize.evaluate.speed import benchmark
from linearize.evaluate.suites import local_tasks, suites, task_specs
from linearize.evaluate.textsource import load_text
from linearize.config import DataConfig, load_recipe
from linearize.distillation.data import load_data
from linearize.hf.errors import LinearizeError
from linearize.hf.mixers import teacher_mode
from linearize.textdata import cut_windows, packaged_text, special_prefix
from tests.tiny import tiny_data, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


BOS = 127


def char_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 2..96), so a 128-token tiny model can read real text; with
    `bos`, every encoded text opens with a BOS token (id 127), as Llama's and Gemma's tokenizers do."""
    vocab = {"<unk>": 0, "<eos>": 1} | {chr(c): c - 30 for c in range(32, 127)} | {"<bos>": BOS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def tiny_student(mixer: str = "hedgehog", **overrides):
    model = tiny_model("llama", dtype=torch.float32, vocab_size=128, max_position_embeddings=2048, **overrides)
    return linearize.convert(model, mixer)


@pytest.fixture
def student():
    return tiny_student()


def test_suites_and_local_tasks_are_shipped_and_listed():
    assert "austen_next_sentence" in local_tasks()
    assert [s.task for s in suites()["commonsense"]["tasks"]] == ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu"]
    mmlu = next(s for s in suites()["commonsense"]["tasks"] if s.task == "mmlu")
    assert mmlu.num_fewshot == 5
    assert (ROOT / "eval" / "suites.yaml").is_file(), "the top-level eval/ must point at linearize/suites"
    specs = task_specs("arc_challenge:acc_norm, piqa", "local")
    assert [(s.task, s.metric) for s in specs] == [("austen_next_sentence", "acc_norm"), ("arc_challenge", "acc_norm"), ("piqa", None)]


def test_unknown_suite_lists_the_valid_ones():
    with pytest.raises(LinearizeError, match="unknown suite 'comonsense'; did you mean 'commonsense'.*local") as error:
        task_specs((), "comonsense")
    assert "\n" not in str(error.value)


def test_shipped_task_data_is_what_the_generator_builds():
    sys.path.insert(0, str(ROOT / "linearize" / "suites" / "tasks"))
    try:
        import austen
    finally:
        sys.path.pop(0)
    shipped = [json.loads(line) for line in austen.NEXT_SENTENCE.read_text().splitlines()]
    assert shipped == austen.build_next_sentence()
    assert all(len(row["choices"]) == 4 and 0 <= row["label"] < 4 for row in shipped)


@pytest.mark.core
def test_local_task_runs_in_process_for_teacher_and_student(student, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # outside any git repository: lm-eval's commit lookup must stay quiet
    results = evaluate(student, char_tokenizer(), suite="local", limit=6, progress=False)
    assert "fatal" not in capfd.readouterr().err
    names = [m.name for m in results.models]
    assert len(names) == 2 and results.models[0].role == "teacher" and results.models[1].teacher == names[0]
    for name in names:
        rows = {r["metric"]: r for r in results.of("task", name)}
        assert set(rows) == {"acc", "acc_norm"} and rows["acc_norm"]["primary"]
        assert all(0.0 <= r["value"] <= 1.0 and r["samples"] == 6 for r in rows.values())


def test_unknown_task_is_one_line_naming_the_valid_ones(student):
    with pytest.raises(LinearizeError) as error:
        evaluate(student, char_tokenizer(), tasks="austen_next_sentense", progress=False)
    message = str(error.value)
    assert "unknown task 'austen_next_sentense'" in message and "austen_next_sentence" in message and "suites: commonsense, local" in message
    assert "\n" not in message


@pytest.mark.core
def test_hub_task_offline_says_which_data_and_how_to_get_it(student, monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LinearizeError) as error:
        evaluate(student, char_tokenizer(), tasks="arc_easy", limit=2, progress=False)
    message = str(error.value)
    assert "task 'arc_easy' needs the Hugging Face dataset 'allenai/ai2_arc' (config 'ARC-Easy')" in message
    assert "run once with network" in message and "load_dataset('allenai/ai2_arc', 'ARC-Easy')" in message
    assert "\n" not in message
    assert datasets.config.HF_HUB_OFFLINE is False or os.environ.get("HF_HUB_OFFLINE") == "1"  # flags put back


def test_strided_perplexity_without_overlap_is_window_perplexity(student):
    ids = torch.randint(3, 128, (130,), generator=torch.Generator().manual_seed(0))
    value, tokens = strided_perplexity(student, ids, context=32, stride=32)
    assert tokens == 4 * 31 and math.isclose(value, perplexity(student, ids[:128].view(4, 32)), rel_tol=1e-5)


def test_strided_perplexity_scores_each_token_once_with_the_context_it_has(student):
    ids = torch.randint(3, 128, (64,), generator=torch.Generator().manual_seed(1))
    value, tokens = strided_perplexity(student, ids, context=32, stride=8)
    # Brute force: token t (t >= 32) is scored in the window ending at it, with 31..24 tokens before it.
    nll, count = 0.0, 0
    logits = student(ids[None, :32], use_cache=False).logits[0].float()
    nll += torch.nn.functional.cross_entropy(logits[:-1], ids[1:32], reduction="sum").item()
    count += 31
    for start in range(8, 64 - 32 + 1, 8):
        window = ids[start : start + 32]
        logits = student(window[None], use_cache=False).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits[-9:-1], window[-8:], reduction="sum").item()
        count += 8
    assert tokens == count and math.isclose(value, math.exp(nll / count), rel_tol=1e-5)
    with pytest.raises(LinearizeError, match="fewer than one window of 128"):
        strided_perplexity(student, ids, context=128)
    alone, tokens = strided_perplexity(student, ids[:40], context=32)  # one window: the rest of the text is too short
    assert tokens == 31 and math.isclose(alone, perplexity(student, ids[None, :32]), rel_tol=1e-5)


def test_the_special_prefix_is_what_the_tokenizer_opens_a_text_with():
    assert special_prefix(char_tokenizer()) == [] and special_prefix(tiny_tokenizer()) == []
    assert special_prefix(char_tokenizer(bos=True)) == [BOS]
    assert cut_windows(torch.arange(10), 4, stride=2, prefix=[BOS]).tolist() == [[BOS, 0, 1, 2], [BOS, 2, 3, 4], [BOS, 4, 5, 6], [BOS, 6, 7, 8]]
    with pytest.raises(LinearizeError, match="holds 0 text tokens after the tokenizer's 1 special ones"):
        cut_windows(torch.arange(10), 1, prefix=[BOS])


def test_strided_perplexity_after_a_bos_token_scores_every_text_token_once(student):
    ids = torch.randint(3, 97, (64,), generator=torch.Generator().manual_seed(2))
    value, tokens = strided_perplexity(student, ids, context=32, stride=8, prefix=[BOS])
    # Brute force: windows are BOS + 31 text tokens every 8; the first scores all 31 (the first from BOS alone).
    nll, count, start = 0.0, 0, 0
    while start + 31 <= 64:
        window = torch.cat((torch.tensor([BOS]), ids[start : start + 31]))
        logits = student(window[None], use_cache=False).logits[0].float()
        scored = 31 if start == 0 else 8
        nll += torch.nn.functional.cross_entropy(logits[-scored - 1 : -1], window[-scored:], reduction="sum").item()
        count, start = count + scored, start + 8
    assert tokens == count == 31 + 4 * 8 and math.isclose(value, math.exp(nll / count), rel_tol=1e-5)
    assert not math.isclose(value, strided_perplexity(student, ids, context=32, stride=8)[0], rel_tol=1e-3)


def test_every_scoring_path_presents_text_as_the_tokenizer_does(student):
    text = load_text("persuasion")[:3200]
    for tokenizer, prefix in ((char_tokenizer(), []), (char_tokenizer(bos=True), [BOS])):
        results = evaluate(student, tokenizer, perplexity="persuasion", contexts=[32], max_tokens=200, progress=False)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:200])
        for record in results.of("perplexity"):
            assert record["prefix"] == prefix
            with teacher_mode(student) if record["model"].startswith("teacher") else torch.no_grad():
                expected, tokens = strided_perplexity(student, ids, 32, prefix=prefix)
            assert record["value"] == pytest.approx(expected, rel=1e-6) and record["tokens"] == tokens
        probe = make_probe(tokenizer, "passkey", 400, 0.5, random.Random(0))
        assert probe.prompt_ids[: len(prefix)] == prefix and probe.prompt_ids[len(prefix)] != BOS
        data = load_data(DataConfig(heldout="persuasion", seq_len=32, heldout_tokens=256), tokenizer, train=False)
        windows = data.heldout_windows(32, 256)
        assert windows.shape[1] == 32 and (windows[:, : len(prefix)] == torch.tensor(prefix, dtype=torch.long)).all()
        assert (windows[:, len(prefix)] != BOS).all()


def test_perplexity_text_sources(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "First row."}) + "\n" + json.dumps({"body": "Second row."}) + "\n")
    assert load_text(rows, text_field="body") == "First row.\n\nSecond row."
    with pytest.raises(LinearizeError, match="has no column 'text'; its columns are body: pass --text-field"):
        load_text(rows)
    assert load_text("persuasion").startswith("Persuasion")


def test_hub_text_offline_names_the_dataset_and_the_fix(monkeypatch, tmp_path):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(LinearizeError, match=r"'nobody/no-such-text'.*unreachable: run once with network, or pre-download"):
        load_text("nobody/no-such-text", name="raw", split="test")


def test_agreement_is_the_mean_kl_and_top1_over_every_position(student):
    windows = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(2))
    other = tiny_student(seed=1)

    # Tiny random models are near uniform: sharpened logits make the two disagree measurably.
    def student_logits(batch):
        return 20 * student(batch, use_cache=False).logits

    def teacher_logits(batch):
        return 20 * other(batch, use_cache=False).logits

    assert agreement(student_logits, student_logits, windows) == (pytest.approx(0.0, abs=1e-5), 1.0, 120)
    kl, top1, tokens = agreement(teacher_logits, student_logits, windows)
    teacher, converted = teacher_logits(windows).double().log_softmax(-1), student_logits(windows).double().log_softmax(-1)
    expected = (teacher.exp() * (teacher - converted)).sum(-1).mean().item()
    assert tokens == 120 and kl > 0.01 and kl == pytest.approx(expected, rel=1e-4)
    assert top1 == pytest.approx((teacher.argmax(-1) == converted.argmax(-1)).double().mean().item())


def test_evaluate_measures_each_students_agreement_with_its_teacher_on_the_perplexity_text(student):
    results = evaluate(student, char_tokenizer(), perplexity="persuasion", contexts=[32, 64], max_tokens=200, progress=False)
    records = results.of("agreement")
    (entry,) = [m for m in results.models if m.role == "student"]
    assert [(r["model"], r["teacher"], r["context"], r["tokens"]) for r in records] == [
        (entry.name, entry.teacher, 32, 192), (entry.name, entry.teacher, 64, 192)
    ]
    ids = torch.tensor(char_tokenizer()(load_text("persuasion")[:3200], add_special_tokens=False)["input_ids"][:200])

    def view(teacher: bool):
        def logits(batch):
            with teacher_mode(student) if teacher else torch.no_grad():
                return student(batch, use_cache=False).logits

        return logits

    assert records[0]["kl"] == pytest.approx(agreement(view(True), view(False), ids[:192].view(6, 32))[0], rel=1e-5)
    assert all(r["kl"] > 0 and 0 <= r["top1"] <= 1 for r in records)
    assert not evaluate(student, char_tokenizer(), perplexity="persuasion", contexts=[32], max_tokens=64, teacher=False, progress=False).of("agreement")


def test_a_saved_run_folder_adds_its_stages_as_training_records(student, tmp_path):
    student.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    stages = [{"stage": 0, "kind": "attention_transfer", "tokens": 4096, "seconds": 2.0}, {"stage": 1, "kind": "lora_kd", "tokens": 8192, "seconds": 8.0}]
    (tmp_path / "results.json").write_text(json.dumps({"recipe": {}, "stages": stages}))
    results = evaluate(str(tmp_path), perplexity="persuasion", contexts=[32], max_tokens=64, progress=False)
    assert [(r["stage"], r["stage_kind"], r["tokens"], r["tokens_per_s"]) for r in results.of("training")] == [
        (0, "attention_transfer", 4096, 2048.0), (1, "lora_kd", 8192, 1024.0)
    ]
    assert {r["model"] for r in results.of("training")} == {m.name for m in results.models if m.role == "student"}
    for foreign in ("[1, 2]", '{"stages": {"a": 1}}', '{"stages": [1, "x"]}', "not json"):  # other tools' results.json
        (tmp_path / "results.json").write_text(foreign)
        assert not evaluate(str(tmp_path), perplexity="persuasion", contexts=[32], max_tokens=64, progress=False).of("training")


def test_retrieval_prompts_hide_the_key_at_the_asked_depth():
    tokenizer = char_tokenizer()
    rng = __import__("random").Random(0)

    def position(probe) -> float:
        """Where the key's tokens first occur in the prompt, as a fraction of its length."""
        key = tokenizer(probe.answer, add_special_tokens=False)["input_ids"]
        ids = probe.prompt_ids
        return next(i for i in range(len(ids)) if ids[i : i + len(key)] == key) / len(ids)

    for kind in ("passkey", "needle"):
        first = make_probe(tokenizer, kind, 1200, 0.0, rng)
        last = make_probe(tokenizer, kind, 1200, 1.0, rng)
        assert 1000 <= first.length <= 1200 and 1000 <= last.length <= 1200
        assert position(first) < 0.3 < 0.7 < position(last)
    assert answer_of(" 12345. Remember") == "12345" and answer_of(" none") is None


def test_lengths_beyond_the_model_are_one_line_naming_the_fix(student):
    with pytest.raises(LinearizeError) as error:
        evaluate(student, char_tokenizer(), passkey=True, lengths=[512, 4096], progress=False)
    message = str(error.value)
    assert "4096 plus 8 generated tokens exceed the model's context of 2048" in message and "--allow-longer" in message
    assert check_lengths([4096], 2048, True, "x") == [4096]
    with pytest.raises(LinearizeError, match="benchmark length"):
        benchmark(student, lengths=[2048], decode_tokens=4, progress=False)


def test_retrieval_records_every_cell_for_both_views(student):
    results = evaluate(student, char_tokenizer(), passkey=True, needle=True, lengths=[300], depths=[0, 1], trials=1, progress=False)
    for kind in ("passkey", "needle"):
        cells = {(r["model"], r["length"], r["depth"]) for r in results.of(kind)}
        assert len(cells) == 4 and all(r["value"] in (0.0, 1.0) for r in results.of(kind))
        # A miss keeps the hidden number and what the model said in its place.
        for r in results.of(kind):
            assert len(r["misses"]) == 1 - r["value"]
            assert all(m["answer"].isdigit() and len(m["answer"]) == 5 and isinstance(m["said"], str) for m in r["misses"])


def test_benchmark_decodes_one_token_per_step_from_the_cache(student):
    lengths_seen = []
    original = student.forward

    def spy(*args, **kwargs):
        lengths_seen.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    student.forward = spy
    results = benchmark(student, lengths=[32, 128], decode_tokens=5, progress=False)
    # Per view and length: warm-up aside (an untimed step and two), one prefill of the full length, then an untimed
    # single-token step and five timed ones.
    assert lengths_seen.count(128) == 2 and lengths_seen.count(1) == 2 * 3 + 4 * 6
    rows = {(r["model"], r["context"]): r for r in results.of("speed")}
    teacher, student_name = results.models[0].name, results.models[1].name
    assert rows[(student_name, 32)]["cache_bytes"] == rows[(student_name, 128)]["cache_bytes"] > 0
    # The teacher view keeps keys and values: its cache grows with the context (plus 6 decoded tokens).
    assert rows[(teacher, 128)]["cache_bytes"] / rows[(teacher, 32)]["cache_bytes"] == pytest.approx(134 / 38)
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows.values())


def test_scoring_a_model_object_needs_its_tokenizer(student):
    with pytest.raises(LinearizeError, match="needs its tokenizer: pass tokenizer="):
        evaluate(student, perplexity="persuasion", progress=False)


def test_model_folder_without_tokenizer_is_one_line(student, tmp_path):
    student.save_pretrained(tmp_path)
    with pytest.raises(LinearizeError, match="no tokenizer files .* tokenizer.save_pretrained"):
        evaluate(str(tmp_path), perplexity="persuasion", progress=False)


def test_results_round_trip_and_bad_files(student, tmp_path):
    results = evaluate(student, char_tokenizer(), perplexity="persuasion", contexts=[64], max_tokens=256, progress=False)
    loaded = load_results(results.save(tmp_path / "eval.json"))
    assert loaded.records == json.loads(json.dumps(results.records)) and [m.name for m in loaded.models] == [m.name for m in results.models]
    with pytest.raises(LinearizeError, match="does not exist; write one with `linearize eval"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(LinearizeError, match="is not a linearize results file"):
        load_results(tmp_path / "other.json")


def test_lm_eval_command_line_knows_the_linearize_model(student, tmp_path):
    """`python -m linearize.evaluate` is lm-eval's CLI with the model name "linearize" registered."""
    folder = tmp_path / "tiny"
    student.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    command = [
        sys.executable, "-m", "linearize.evaluate", "run", "--model", "linearize",
        "--model_args", f"pretrained={folder},teacher=True,dtype=float32", "--device", "cpu",
        "--tasks", "austen_next_sentence", "--limit", "3",  # a local task: found without --include_path
        "--output_path", str(tmp_path / "lm_eval_out"),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = list((tmp_path / "lm_eval_out").rglob("results_*.json"))
    assert outputs and "acc_norm,none" in json.loads(outputs[0].read_text())["results"]["austen_next_sentence"]


def test_after_lora_kd_the_teacher_figures_come_from_the_original_teacher(tmp_path):
    """LoRA KD merges into the teacher's own q/k/v/o, so teacher_mode is no longer the teacher: the saved model
    records it, and scoring loads the original from the recorded source (teacher_mode only with a warning)."""
    teacher_dir = tmp_path / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(teacher_dir)
    tiny_tokenizer().save_pretrained(teacher_dir)
    student = linearize.convert(AutoModelForCausalLM.from_pretrained(teacher_dir), "hedgehog", source=str(teacher_dir))
    assert not student.config.tuned_projections
    stage = "stages=[{kind: lora_kd, tokens: 256, batch_size: 2, lr: 0.05, ce_weight: 1.0}]"
    student = linearize.distill(student, tiny_data(seq_len=32), load_recipe("quickstart", ["data.seq_len=32", stage]), log=lambda m: None, progress=False)
    assert student.config.tuned_projections
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(packaged_text("persuasion")[:4000])
    settings = dict(perplexity=str(text), contexts=[32], max_tokens=512, progress=False)

    def teacher_figure(results):
        (entry,) = [m for m in results.models if m.role == "teacher"]
        (record,) = results.of("perplexity", entry.name)
        return entry.via, record["value"]

    original = teacher_figure(evaluate(str(teacher_dir), **settings))
    assert teacher_figure(evaluate(str(folder), **settings)) == pytest.approx(("original", original[1]))

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"source": str(tmp_path / "gone")}))
    with pytest.warns(UserWarning, match="could not be loaded"):
        via, tuned = teacher_figure(evaluate(str(folder), **settings))
    assert via == "teacher_mode" and tuned != pytest.approx(original[1], rel=1e-4)
