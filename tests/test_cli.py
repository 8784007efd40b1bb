"""`linearize convert`, `info` and `mixers` on a tiny teacher folder: what they write and print, and the one-line
errors (exit code 2, nothing on disk) for every bad input the foundation issue lists."""

import json
import re
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize import cli
from linearize.hf import kernel_dispatch
from linearize.hf.errors import LinearizeError
from tests.conftest import wide_console
from tests.tiny import assert_reloaded, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def run(monkeypatch, capsys, *args, columns: int = 250):
    """The console script in this process: (exit code, stdout, stderr), on a terminal `columns` wide."""
    monkeypatch.setattr(sys, "argv", ["linearize", *map(str, args)])
    wide_console(monkeypatch, columns)
    with pytest.raises(SystemExit) as exit:
        cli.main()
    captured = capsys.readouterr()
    return exit.value.code, captured.out, captured.err


def error_line(stderr: str) -> str:
    """The error itself: the last line (a model's load may print progress bars above it)."""
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    return lines[-1]


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_convert_writes_a_model_that_reloads_to_the_same_logits(teacher_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "student"
    code, stdout, stderr = run(monkeypatch, capsys, "convert", teacher_folder, "--out", out, "--mixer", "gla",
                               "--keep-attention", "0", "--option", "window=4")
    assert code == 0, stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    rows = table_rows(stdout)
    assert [(r[0], r[1]) for r in rows] == [("0", "attention"), ("1-2", "gla")]
    expected = linearize.convert(AutoModelForCausalLM.from_pretrained(teacher_folder), "gla", keep_attention=[0], window=4)
    ids = torch.randint(0, expected.config.text_config.vocab_size, (2, 9))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert_reloaded(reloaded, expected, input_ids=ids)


def test_info_shows_the_plan_state_and_kernel_path_per_layer(teacher_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hybrid"
    code, _, stderr = run(monkeypatch, capsys, "convert", teacher_folder, "--out", out, "--mixer", "hedgehog",
                          "--hybrid", "hedgehog_swa=last:1", "--option", "feature_dim=8")
    assert code == 0, stderr
    # as on a GPU host with fla installed
    monkeypatch.setattr(kernel_dispatch, "FLA_PROBLEM", None)
    monkeypatch.setattr(kernel_dispatch, "FLA_VERSION", "0.6.0")
    code, stdout, stderr = run(monkeypatch, capsys, "info", out)
    assert code == 0, stderr
    rows = table_rows(stdout)
    assert [(r[0], r[1], r[6], r[7]) for r in rows] == [
        ("0-1", "hedgehog", "no", "fla simple_gla; decode: fused Triton step"),
        ("2", "hedgehog_swa", "no", "Triton (linearize); decode: fused Triton step"),
    ]
    assert "parameters added" in stdout

    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    rows = table_rows(run(monkeypatch, capsys, "info", out)[1])
    assert (rows[0][7], rows[1][7]) == ("PyTorch (LINEARIZE_KERNELS=torch)", "PyTorch (no fla kernel)")
    monkeypatch.delenv("LINEARIZE_KERNELS")
    monkeypatch.setattr(kernel_dispatch, "FLA_PROBLEM", "flash-linear-attention is not usable (ImportError: no module)")
    rows = table_rows(run(monkeypatch, capsys, "info", out, columns=320)[1])  # its long cell on one line
    assert rows[0][7] == "PyTorch: flash-linear-attention is not usable (ImportError: no module); decode: fused Triton step"


def test_info_fits_a_narrow_terminal_and_groups_identical_layers(teacher_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "all"
    assert run(monkeypatch, capsys, "convert", teacher_folder, "--out", out, "--mixer", "hedgehog_swa")[0] == 0
    monkeypatch.setattr(sys, "argv", ["linearize", "info", str(out)])
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(cli.console, "_width", 80)
    with pytest.raises(SystemExit) as done:
        cli.main()
    stdout = capsys.readouterr().out
    assert done.value.code == 0 and max(len(line) for line in stdout.splitlines()) <= 80
    rows = table_rows(stdout)
    assert rows[0][:2] == ["0-2", "hedgehog_swa"] and "…" not in stdout
    assert not any(row[0] and row[0] != "0-2" for row in rows[1:])  # one row (folded lines continue it)


def test_info_says_which_layers_grow_with_context(teacher_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "kept"
    assert run(monkeypatch, capsys, "convert", teacher_folder, "--out", out, "--mixer", "swa", "--keep-attention", "1", "--option", "window=4")[0] == 0
    rows = table_rows(run(monkeypatch, capsys, "info", out)[1])
    assert [(r[1], r[6]) for r in rows] == [("swa", "no"), ("attention", "yes"), ("swa", "no")]
    assert rows[1][7].startswith("teacher attention")


def test_mixers_lists_every_registered_mixer(monkeypatch, capsys):
    code, stdout, _ = run(monkeypatch, capsys, "mixers")
    assert code == 0
    names = {row[0] for row in table_rows(stdout) if row and row[0]}
    assert set(linearize.MIXERS) <= names


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mixer", "hedgehg"], "did you mean 'hedgehog'"),
        (["--keep-attention", "5"], "out of range"),
        (["--keep-attention", "0,0"], "layer 0 is listed twice"),
        (["--mixer", "mamba2", "--option", "d_state=16"], "does not take option(s) d_state"),
        (["--option", "window"], "must look like key=value"),
        (["--mixer", "hedgehog_swa", "--option", "decay=1"], "option 'decay' of mixer 'hedgehog_swa' must be 0 (off) or between 0 and 1"),
        (["--mixer", "hedgehog_swa", "--option", "linear_rope=before"], "option 'linear_rope' of mixer 'hedgehog_swa'"),
    ],
)
def test_bad_conversions_are_one_line_errors_that_write_nothing(teacher_folder, tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "never"
    code, _, stderr = run(monkeypatch, capsys, "convert", teacher_folder, "--out", out, *args)
    assert code == 2
    assert message in error_line(stderr)
    assert not out.exists()


def test_unknown_source_and_existing_output_are_named(teacher_folder, tmp_path, monkeypatch, capsys):
    code, _, stderr = run(monkeypatch, capsys, "convert", tmp_path / "no-such-folder", "--out", tmp_path / "x")
    assert code == 2 and "no-such-folder" in error_line(stderr)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, stderr = run(monkeypatch, capsys, "convert", teacher_folder, "--out", existing)
    assert code == 2 and "--overwrite" in error_line(stderr)
    assert (existing / "keep.txt").read_text() == "mine"


def test_info_refuses_a_folder_that_is_not_a_converted_model(teacher_folder, tmp_path, monkeypatch, capsys):
    code, _, stderr = run(monkeypatch, capsys, "info", teacher_folder)
    assert code == 2 and "linearize convert" in error_line(stderr)
    code, _, stderr = run(monkeypatch, capsys, "info", tmp_path / "missing")
    assert code == 2 and "missing" in error_line(stderr)


@pytest.mark.parametrize("edit", ["layer kept as attention", "other feature_dim"])
def test_a_checkpoint_whose_weights_do_not_match_its_plan_is_refused(teacher_folder, tmp_path, monkeypatch, capsys, edit):
    out = tmp_path / "student"
    assert run(monkeypatch, capsys, "convert", teacher_folder, "--out", out, "--mixer", "hedgehog", "--option", "feature_dim=8")[0] == 0
    config = json.loads((out / "config.json").read_text())
    if edit == "layer kept as attention":
        config["layers"][1] = {"mixer": "attention", "options": {}}
    else:
        config["layers"][1]["options"]["feature_dim"] = 4
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LinearizeError, match="do not match the plan in its config.json") as error:
        AutoModelForCausalLM.from_pretrained(out)
    assert "\n" not in str(error.value) and "re-convert" in str(error.value)


@pytest.fixture(scope="module")
def damaged(teacher_folder, tmp_path_factory):
    """Folders a user might hand over: a converted model with its weights cut short or overwritten, a model of a
    type this transformers does not know, a broken config.json, and a .gguf file that is not GGUF."""
    root = tmp_path_factory.mktemp("damaged")
    folders = {}
    for name, cut in (("truncated", lambda data: data[: len(data) // 2]), ("garbage", lambda data: b"not a safetensors file" * 9)):
        folder = root / name
        linearize.convert(AutoModelForCausalLM.from_pretrained(teacher_folder), "hedgehog").save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        weights = folder / "model.safetensors"
        weights.write_bytes(cut(weights.read_bytes()))
        folders[name] = folder
    folders["unknown type"] = root / "unknown"
    shutil.copytree(teacher_folder, folders["unknown type"])
    config = json.loads((folders["unknown type"] / "config.json").read_text())
    (folders["unknown type"] / "config.json").write_text(json.dumps({**config, "model_type": "llama9000"}))
    folders["broken config"] = root / "broken"
    shutil.copytree(teacher_folder, folders["broken config"])
    (folders["broken config"] / "config.json").write_text('{"model_type": "llama", ')
    folders["not gguf"] = root / "model.gguf"
    folders["not gguf"].write_bytes(b"PK\x03\x04 a zip file renamed")
    return folders


EXPECTED = {
    "truncated": "model.safetensors' is truncated or damaged",
    "garbage": "model.safetensors' is truncated or damaged",
    "unknown type": "has model_type 'llama9000', which transformers",
    "broken config": "config.json' is not valid JSON",
    "not gguf": "is not a GGUF file (it does not start with the GGUF magic bytes",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_damaged_inputs_are_one_line_errors_in_every_command(damaged, case, tmp_path, monkeypatch, capsys):
    commands = [
        ("convert", damaged[case], "--out", tmp_path / "out"),
        ("eval", damaged[case], "--out", tmp_path / "eval.json"),
        ("distill", "quickstart", f"teacher={damaged[case]}", "--out", tmp_path / "out"),
    ]
    if case in ("truncated", "garbage"):
        commands.append(("info", damaged[case]))
    for command in commands:
        code, _, stderr = run(monkeypatch, capsys, *command)
        assert code == 2 and EXPECTED[case] in error_line(stderr), (command[0], stderr[-500:])
        assert not (tmp_path / "out").exists() and not (tmp_path / "eval.json").exists()
    with pytest.raises(LinearizeError, match=re.escape(EXPECTED[case])):
        linearize.load_teacher(str(damaged[case]))


def test_eval_with_fewer_perplexity_tokens_than_the_context_scores_one_window(teacher_folder, tmp_path, monkeypatch, capsys):
    code, _, stderr = run(monkeypatch, capsys, "eval", teacher_folder, "--perplexity", "persuasion", "--contexts", "128",
                          "--ppl-tokens", "16", "--out", tmp_path / "eval.json")
    assert code == 0, stderr
    (record,) = [r for r in json.loads((tmp_path / "eval.json").read_text())["records"] if r["kind"] == "perplexity"]
    assert record["context"] == 128 and record["tokens"] == 127 and record["value"] > 1


@pytest.mark.parametrize("option, value", [("decay", 0.95), ("linear_rope", False)])
def test_convert_with_a_hedgehog_swa_option_saves_it_and_reloads_to_the_same_logits(teacher_folder, tmp_path, monkeypatch, capsys, option, value):
    out = tmp_path / "student"
    code, _, stderr = run(monkeypatch, capsys, "convert", teacher_folder, "--out", out, "--mixer", "hedgehog_swa",
                          "--option", "window=4", "--option", f"{option}={str(value).lower()}")
    assert code == 0, stderr
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert {spec.options[option] for spec in reloaded.config.plan} == {value}
    expected = linearize.convert(AutoModelForCausalLM.from_pretrained(teacher_folder), "hedgehog_swa", window=4, **{option: value})
    ids = torch.randint(0, expected.config.text_config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits)


def test_set_options_keeps_keys_on_a_saved_student_and_the_copy_reloads_to_the_same_logits(teacher_folder, tmp_path, monkeypatch, capsys):
    """`set-options` gives a saved (or distilled) student kept keys: the weights as they were, the plan with keep, the
    logits of the same student with keep set in Python; the layers keep their softmax-kept neighbours as they were."""
    student, kept = tmp_path / "student", tmp_path / "kept"
    code, _, stderr = run(monkeypatch, capsys, "convert", teacher_folder, "--out", student, "--mixer", "hedgehog_swa",
                          "--keep-attention", "0", "--option", "window=4")
    assert code == 0, stderr
    code, stdout, stderr = run(monkeypatch, capsys, "set-options", student, "--out", kept, "--option", "keep=3", "--option", "keep_block=4")
    assert code == 0, stderr
    assert "keep=3, keep_block=4 on 2 layers" in stdout
    reloaded = AutoModelForCausalLM.from_pretrained(kept)
    assert [(spec.mixer, spec.options.get("keep")) for spec in reloaded.config.plan] == [("attention", None), ("hedgehog_swa", 3), ("hedgehog_swa", 3)]
    expected = AutoModelForCausalLM.from_pretrained(student)
    assert linearize.set_options(expected, keep=3, keep_block=4) == [1, 2]
    ids = torch.randint(0, expected.config.text_config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits)
        assert not torch.allclose(reloaded(ids).logits, AutoModelForCausalLM.from_pretrained(student)(ids).logits)


def test_set_options_on_some_layers_gives_each_layer_its_own_kept_keys(teacher_folder, tmp_path, monkeypatch, capsys):
    """`set-options --layers` changes those layers alone: the plan per layer, and the logits of the same student set in
    Python layer by layer (a budget of kept keys spread unevenly across layers)."""
    student, kept = tmp_path / "student", tmp_path / "kept"
    assert run(monkeypatch, capsys, "convert", teacher_folder, "--out", student, "--mixer", "hedgehog_swa", "--option", "window=4")[0] == 0
    code, stdout, stderr = run(monkeypatch, capsys, "set-options", student, "--out", kept, "--option", "keep=5", "--layers", "1-2")
    assert code == 0, stderr
    assert "keep=5 on 2 layers" in stdout
    reloaded = AutoModelForCausalLM.from_pretrained(kept)
    assert [spec.options.get("keep") for spec in reloaded.config.plan] == [0, 5, 5]
    expected = AutoModelForCausalLM.from_pretrained(student)
    assert linearize.set_options(expected, keep=2) == [0, 1, 2]
    assert linearize.set_options(expected, layers=[1, 2], keep=5) == [1, 2]
    ids = torch.randint(0, expected.config.text_config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        uneven = expected(ids).logits
        assert not torch.allclose(uneven, reloaded(ids).logits)  # layer 0 keeps 2 here, none in the saved copy
        linearize.set_options(expected, layers="0", keep=0)
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits)
        assert not torch.allclose(uneven, expected(ids).logits)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--option", "keep=3", "--layers", "0"], r"layer 0 \(attention\) does not take 'keep'; name layers that do: 1, 2"),
        (["--option", "keep=3", "--layers", "7"], r"layers: layer 7 is out of range; the model has layers 0-2"),
        (["--option", "keep=3", "--layers", "one"], r"layers: cannot read 'one'; use indices like 0,7"),
        (["--option", "keep=3", "--layers", "none"], r"layers 'none' selects no layer; name at least one, e.g. layers=\[1\]"),
        (["--option", "window=8"], r"no converted layer takes 'window' after conversion \(hedgehog_swa takes keep, keep_block\); convert the teacher again"),
        (["--option", "keep=-2"], r"must be at least 0 and 1, got -2 and 64; keep=128 is a start"),
        ([], r"set_options needs at least one option, e.g. keep=128"),
    ],
)
def test_set_options_refuses_bad_options_in_one_line_and_writes_nothing(teacher_folder, tmp_path, monkeypatch, capsys, args, message):
    student = tmp_path / "student"
    assert run(monkeypatch, capsys, "convert", teacher_folder, "--out", student, "--option", "window=4", "--keep-attention", "0")[0] == 0
    code, _, stderr = run(monkeypatch, capsys, "set-options", student, "--out", tmp_path / "kept", *args)
    assert code == 2 and re.search(message, error_line(stderr)) and not (tmp_path / "kept").exists()


def test_set_options_refuses_a_teacher_folder(teacher_folder, tmp_path, monkeypatch, capsys):
    code, _, stderr = run(monkeypatch, capsys, "set-options", teacher_folder, "--out", tmp_path / "kept", "--option", "keep=3")
    assert code == 2 and "is not a converted model; convert it first with `linearize convert" in error_line(stderr)
