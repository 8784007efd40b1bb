"""`linearize push` and HF's own `push_to_hub` against a loopback Hub stand-in: what is uploaded, that it loads
in a fresh process without linearize, and the one-line errors; and the push of a folder `linearize export` wrote
(a native Qwen3_5ForCausalLM: no modeling code goes up, its card names the engines that serve it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml

import linearize
from linearize.hf.errors import LinearizeError
from tests.hub_standin import HubStandIn
from tests.test_evaluate import char_tokenizer, tiny_student
from tests.test_report import eval_results
from tests.tiny import reload_probe, run_python, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_standin_secret_token_0123456789"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubStandIn(tmp_path / "hub", forbidden=("someone-else/model",)) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        yield standin


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "tiny-hedgehog"
    model = tiny_student()
    model.config.source = "smollm2-135m"  # as `linearize convert smollm2-135m` records it
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    (path / "recipe.yaml").write_text(yaml.safe_dump({"teacher": "smollm2-135m", "stages": [{"kind": "transfer", "tokens": 20000}, {"kind": "finetune", "tokens": 40000}]}))
    from linearize.report import write_report

    write_report([eval_results()], path / "report")
    return path


@pytest.fixture
def folder(saved_folder, tmp_path):
    """A converted model folder of this test's own (tests add files to it), copied from the one saved per module."""
    return Path(shutil.copytree(saved_folder, tmp_path / saved_folder.name))


def test_push_uploads_a_repo_that_loads_with_remote_code(hub, folder, tmp_path, capsys):
    url = linearize.push(str(folder), "me/tiny-hedgehog", private=True)
    assert url.startswith(hub.url) and hub.authorizations == {f"Bearer {TOKEN}"}
    assert hub.created[0]["name"] == "tiny-hedgehog" and (hub.created[0].get("private") or hub.created[0].get("visibility") == "private")
    files = set(hub.commits[0]["files"])
    assert {"model.safetensors", "config.json", "modeling_linearized.py", "configuration_linearized.py", "mixers.py"} <= files
    assert {"tokenizer.json", "tokenizer_config.json", "recipe.yaml", "README.md", "report/report.json", "report/accuracy.png"} <= files
    repo = hub.folder("me/tiny-hedgehog")
    assert json.loads((repo / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == "modeling_linearized.LinearizedForCausalLM"

    card = (repo / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and "mixer:hedgehog" in meta["tags"]
    assert "Training tokens: 60,000." in card and "| arc_easy | acc | 0.600 | 0.450 | 75.0 |" in card
    assert "](report/accuracy.png)" in card and 'from_pretrained("me/tiny-hedgehog", trust_remote_code=True)' in card
    assert TOKEN not in capsys.readouterr().out

    original = linearize.LinearizedForCausalLM.from_pretrained(folder)
    output = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(repo)!r}, trust_remote_code=True)
        AutoTokenizer.from_pretrained({str(repo)!r})
        """
        + reload_probe(original, tmp_path / "probe.pt", input_ids=torch.tensor([[5, 6, 7, 8, 9]])),
        cwd=tmp_path,
    )
    assert "reloaded exactly True" in output


def test_push_of_a_model_object_and_to_a_branch(hub, tmp_path):
    model = tiny_student()
    linearize.push(model, "me/from-object", tokenizer=char_tokenizer(), revision="v1")
    assert hub.commits[0]["revision"] == "v1" and "modeling_linearized.py" in hub.commits[0]["files"]
    with pytest.raises(LinearizeError, match="needs its tokenizer"):
        linearize.push(model, "me/from-object")


def test_push_errors_are_one_line_and_never_show_the_token(hub, folder, tmp_path, monkeypatch):
    with pytest.raises(LinearizeError) as error:
        linearize.push(str(folder), "someone-else/model")
    assert "cannot write to 'someone-else/model' (403 forbidden)" in str(error.value) and TOKEN not in str(error.value)

    with pytest.raises(LinearizeError, match="must look like ORG/NAME"):
        linearize.push(str(folder), "no-slash")

    teacher = tmp_path / "teacher"
    tiny_student().model.save_pretrained(teacher)
    with pytest.raises(LinearizeError, match="not a converted one; convert it first"):
        linearize.push(str(teacher), "me/teacher")

    no_tokenizer = tmp_path / "no-tokenizer"
    tiny_student().save_pretrained(no_tokenizer)
    with pytest.raises(LinearizeError, match=r"has no tokenizer; save it there with tokenizer.save_pretrained"):
        linearize.push(str(no_tokenizer), "me/x")

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    with pytest.raises(LinearizeError, match=r"no Hugging Face token: run `hf auth login` \(or set HF_TOKEN\)"):
        linearize.push(str(folder), "me/tiny-hedgehog")
    assert hub.commits == []


def test_push_uploads_only_what_a_model_needs_and_refuses_a_folder_with_secrets(hub, folder):
    beside = {"hf_token.txt": TOKEN, "secrets.env": "KEY=1", "id_rsa": "-----BEGIN", "optimizer.pt": "x", "nohup.out": "log", "eval.json": "{}"}
    for name, text in beside.items():
        (folder / name).write_text(text)
    with pytest.raises(LinearizeError) as error:
        linearize.push(str(folder), "me/tiny-hedgehog")
    message = str(error.value)
    assert "hf_token.txt, id_rsa, secrets.env, which looks like a secret; nothing was uploaded" in message
    assert "--ignore hf_token.txt --ignore id_rsa --ignore secrets.env" in message and "\n" not in message
    assert hub.created == [] and hub.commits == []

    said = []
    linearize.push(str(folder), "me/tiny-hedgehog", ignore=["hf_token.txt", "secrets.env", "id_rsa"], log=said.append)
    files = set(hub.commits[0]["files"])
    assert not files & set(beside)
    assert {"model.safetensors", "config.json", "modeling_linearized.py", "mixers.py", "tokenizer.json", "recipe.yaml", "README.md"} <= files
    assert said[1] == f"left behind in {folder}: eval.json, hf_token.txt, id_rsa, nohup.out, optimizer.pt, secrets.env"
    assert said[0].startswith("uploading to me/tiny-hedgehog: attention.py, cache.py, config.json,") and "report/report.md" in said[0]


def test_push_dry_run_lists_the_files_and_touches_no_network(hub, folder, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", "/nonexistent/token")
    paths = linearize.push(str(folder), "me/tiny-hedgehog", dry_run=True)
    assert "model.safetensors" in paths and "README.md" in paths and "report/accuracy.png" in paths
    assert hub.created == [] and hub.commits == [] and hub.authorizations == set()

    from linearize import cli

    monkeypatch.setattr(sys, "argv", ["linearize", "push", str(folder), "--repo-id", "me/tiny-hedgehog", "--dry-run"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    assert "would upload to me/tiny-hedgehog: attention.py, cache.py, config.json," in " ".join(capsys.readouterr().out.split())
    assert hub.commits == []


def test_the_repo_holds_no_local_absolute_path(hub, folder, tmp_path):
    home = "/home/someone/private-models"
    config = json.loads((folder / "config.json").read_text())
    config["source"] = f"{home}/teacher"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"teacher": f"{home}/teacher", "data": {"train": f"{home}/corpus", "heldout": "persuasion"}}))
    (folder / "results.json").write_text(json.dumps({"recipe": {"teacher": f"{home}/teacher"}, "stages": [{"stage": 0, "tokens": 10}]}))
    linearize.push(str(folder), "me/tiny-hedgehog")
    repo = hub.folder("me/tiny-hedgehog")
    for path in repo.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".md", ".jsonl"):
            assert home not in path.read_text(), path.name
    assert yaml.safe_load((repo / "recipe.yaml").read_text())["data"] == {"train": "corpus", "heldout": "persuasion"}
    assert json.loads((repo / "config.json").read_text())["source"] == "teacher" and "`teacher`" in (repo / "README.md").read_text()
    assert linearize.LinearizedForCausalLM.from_pretrained(repo).config.layers == config["layers"]


def test_push_command_line(hub, folder, monkeypatch, capsys):
    from linearize import cli

    monkeypatch.setattr(sys, "argv", ["linearize", "push", str(folder), "--repo-id", "someone-else/model"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    captured = capsys.readouterr()
    assert done.value.code == 2 and "403 forbidden" in captured.err and captured.err.count("\n") == 1
    assert TOKEN not in captured.out + captured.err


def test_transformers_push_to_hub_uploads_the_modeling_files(hub, tmp_path):
    """HF's own model.push_to_hub saves the same folder, so the repo it makes loads with remote code too."""
    code = """
import torch, linearize
from tests.tiny import tiny_model
model = linearize.convert(tiny_model("llama", dtype=torch.float32), "hedgehog")
model.push_to_hub("me/via-transformers")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    files = set(hub.commits[0]["files"])
    assert {"model.safetensors", "config.json", "modeling_linearized.py", "configuration_linearized.py", "mixers.py"} <= files
    repo = hub.folder("me/via-transformers")
    assert "auto_map" in json.loads((repo / "config.json").read_text())
    output = run_python(
        f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(repo)!r}, trust_remote_code=True)
        print(type(model).__name__, len(model.config.layers))
        """,
        cwd=tmp_path,
    )
    assert "LinearizedForCausalLM 3" in output


def hybrid_qwen3_5():
    """A tiny student whose layers are qwen3_5's: Gated DeltaNet, with layer 1 kept as gated softmax attention."""
    return linearize.convert(tiny_model("llama", dtype=torch.float32), "qwen3_5_gdn", keep_attention=[1], keep_as="qwen3_5_attention")


@pytest.fixture
def exported(tmp_path):
    """The exported student, with the source run's recipe and record beside it and a stray .py file."""
    from linearize.export import export
    from linearize.record import RunRecord, StageReport

    out = export(hybrid_qwen3_5(), tmp_path / "tiny-native", tokenizer=tiny_tokenizer(), log=lambda m: None)
    recipe = {"teacher": "smollm2-135m", "convert": {"mixer": "qwen3_5_gdn", "keep_as": "qwen3_5_attention"}}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    RunRecord(recipe=recipe, stages=[StageReport(stage=0, kind="attention_transfer", tokens=12000)]).save(out)
    (out / "file.py").write_text("print('stray')\n")
    return out


EXPORTED_REPO = {
    "config.json", "model.safetensors", "generation_config.json", "export.json", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "recipe.yaml", "results.json", "README.md",
}


def test_push_of_an_exported_folder_uploads_a_native_repo_and_a_serving_card(hub, exported, monkeypatch):
    from transformers import AutoModelForCausalLM

    from linearize.export import TARGETS

    said = []
    assert set(linearize.push(str(exported), "me/tiny-native", dry_run=True, log=said.append)) == EXPORTED_REPO
    assert said[1] == f"left behind in {exported}: file.py" and hub.commits == []

    linearize.push(str(exported), "me/tiny-native")
    assert set(hub.commits[0]["files"]) == EXPORTED_REPO
    repo = hub.folder("me/tiny-native")
    assert type(AutoModelForCausalLM.from_pretrained(repo)).__name__ == "Qwen3_5ForCausalLM"

    card = (repo / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"linearize", "qwen3_5", "hybrid", "linear-attention"} <= set(meta["tags"])
    assert "native `Qwen3_5ForCausalLM`: it loads without `trust_remote_code`" in card and "trust_remote_code=True" not in card
    assert "| linear_attention | 2 | 0, 2 |" in card and "| full_attention | 1 | 1 |" in card and "Training tokens: 12,000." in card
    assert "`vllm serve me/tiny-native`" in card and '`AutoModelForCausalLM.from_pretrained("me/tiny-native")`' in card
    for engine, versions, _ in TARGETS["qwen3_5"].engines:
        assert f"| {engine} | {versions} |" in card

    # A stray modeling file stays behind too: an exported folder ships no code.
    (exported / "modeling_linearized.py").write_text("")
    assert "modeling_linearized.py" not in linearize.push(str(exported), "me/tiny-native", dry_run=True)
    (exported / "export.json").write_text(json.dumps({**json.loads((exported / "export.json").read_text()), "version": 2}))
    with pytest.raises(LinearizeError, match=r"is an export \(version 2, target 'qwen3_5'\) this linearize does not read .*: upgrade linearize"):
        linearize.push(str(exported), "me/tiny-native", dry_run=True)
    (exported / "export.json").write_text(json.dumps({**json.loads((exported / "export.json").read_text()), "version": 1}))
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(LinearizeError, match="config.json is not the Qwen3_5ForCausalLM its export.json describes; export it again"):
        linearize.push(str(exported), "me/tiny-native", dry_run=True)


def test_the_card_of_an_exportable_converted_folder_says_how_to_export(hub, tmp_path):
    path = tmp_path / "tiny-hybrid"
    hybrid_qwen3_5().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    linearize.push(str(path), "me/tiny-hybrid")
    card = hub.folder("me/tiny-hybrid").joinpath("README.md").read_text()
    assert "`linearize export FOLDER --to qwen3_5 --out OUT`" in card and "native `Qwen3_5ForCausalLM`" in card
    assert "modeling_linearized.py" in hub.commits[0]["files"] and "export.json" not in hub.commits[0]["files"]

    from linearize.publish.card import model_card

    assert "linearize export" not in model_card(tiny_student().config, "me/tiny-hedgehog")  # hedgehog layers do not export
