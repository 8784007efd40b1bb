"""sources: every kind of source string classified, the offline check honouring each flag, one answer at every call site."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from linearize.distillation.data import check_source
from linearize.evaluate.textsource import load_text
from linearize.hf.errors import LinearizeError
from linearize.loaders import resolve_source
from linearize.publish.card import teacher_identity
from linearize.sources import OFFLINE_FLAGS, classify_source, offline_flag

NAMES = ("persuasion", "SmolLM2-135M")


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("text")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "text, kind",
    [
        ("model.Q4_0.gguf", "gguf"),
        ("notes.txt", "file"),
        ("folder", "folder"),
        ("./folder", "folder"),
        ("gpt2", "hub"),
        ("HuggingFaceTB/SmolLM2-135M", "hub"),
        ("Qwen/Qwen2.5-0.5B", "hub"),
        ("Salesforce/wikitext", "hub"),
        ("missing.gguf", "missing"),
        ("org/model.gguf", "missing"),
        ("org/data.jsonl", "missing"),
        ("notes.md", "missing"),
        ("a/b/c", "missing"),
        ("./gpt2", "missing"),
        ("/no/such/folder", "missing"),
        ("~/no-such-folder", "missing"),
        ("-name", "missing"),
    ],
)
def test_each_kind_of_string(here, text, kind):
    found = classify_source(text, names=NAMES)
    assert found.kind == kind
    assert found.text == text
    assert found.path == Path(text).expanduser()


def test_names_match_case_insensitively_and_give_the_callers_spelling(here):
    for text in ("persuasion", " Persuasion ", "PERSUASION"):
        found = classify_source(text, names=NAMES)
        assert (found.kind, found.text) == ("name", "persuasion")
    found = classify_source("smollm2-135m", names=NAMES)
    assert (found.kind, found.text) == ("name", "SmolLM2-135M")
    assert classify_source("persuasion").kind == "hub"  # not a name this caller knows


def test_an_existing_path_wins_over_a_name(here):
    (here / "persuasion").mkdir()
    assert classify_source("persuasion", names=NAMES).kind == "folder"


def test_a_pathlike_is_never_a_name_or_a_hub_id(here):
    assert classify_source(Path("persuasion"), names=NAMES).kind == "missing"
    assert classify_source(Path("gpt2")).kind == "missing"
    assert classify_source(here / "folder").kind == "folder"


def test_home_is_expanded(here, monkeypatch):
    monkeypatch.setenv("HOME", str(here))
    found = classify_source("~/notes.txt")
    assert (found.kind, found.path) == ("file", here / "notes.txt")


@pytest.fixture
def online(monkeypatch):
    for name in OFFLINE_FLAGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return monkeypatch


def test_offline_flag_is_none_when_nothing_says_offline(online):
    assert offline_flag() is None
    online.setenv("HF_HUB_OFFLINE", "0")
    online.setenv("TRANSFORMERS_OFFLINE", "")
    assert offline_flag() is None


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"])
@pytest.mark.parametrize("value", ["1", "ON", "yes", "True"])
def test_offline_flag_honours_each_environment_flag(online, flag, value):
    online.setenv(flag, value)
    assert offline_flag() == flag


def test_offline_flag_honours_huggingface_hubs_own_setting(online):
    online.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert offline_flag() == "HF_HUB_OFFLINE"


def test_every_call_site_takes_a_missing_path_for_missing(here):
    # Shaped almost like a Hub id, but a data-file name: missing everywhere, never sent to the Hub.
    for call in (resolve_source, check_source, load_text):
        with pytest.raises(LinearizeError, match="does not exist"):
            call("org/notes.txt")
    assert teacher_identity("org/notes.txt") == (None, None)


def test_importing_sources_imports_neither_torch_nor_transformers():
    path = Path(__file__).resolve().parents[1] / "linearize" / "sources.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sources', {str(path)!r})\n"
        "module = sys.modules['sources'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
