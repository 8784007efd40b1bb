"""Every shipped recipe loads, names known mixers and stages, its header holds a working launch command and a
description `linearize recipes` shows; every data file of the package ships in the wheel."""

import fnmatch
import subprocess
import sys
import tomllib

import pytest

from linearize import cli
from linearize.config import RECIPE_DIR, load_recipe, recipe_summary, register_stage, shipped_recipes, stage_kinds
from linearize.run import validate_recipe
from linearize.hf.errors import LinearizeError
from linearize.hf.mixers import MIXERS
from tests.conftest import REPO_ROOT, wide_console


def test_the_documented_recipes_ship():
    assert {"quickstart", "lolcats", "lolcats_linear", "liger", "mamba_in_llama", "hybrid_gdn"} <= set(shipped_recipes())
    assert (RECIPE_DIR.parent.parent / "recipes").resolve() == RECIPE_DIR


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_loads_and_validates(name):
    lines = (RECIPE_DIR / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == f"# linearize run {name}"
    prefix = f"# Override any key: linearize run {name} "
    assert lines[1].startswith(prefix)
    for recipe in (load_recipe(name), load_recipe(name, lines[1][len(prefix) :].split())):
        mixers = {recipe.convert.mixer, *recipe.convert.hybrid, *recipe.convert.mixer_options}
        assert mixers <= set(MIXERS)
        assert recipe.stages and all(stage.kind in stage_kinds() for stage in recipe.stages)
        validate_recipe(recipe)
    budget = sum(stage.tokens for stage in load_recipe(name).stages)
    if name == "quickstart":
        assert budget <= 65536  # minutes on two CPU cores
    else:
        assert 1_000_000 <= budget <= 20_000_000  # sized for minutes on one GPU, within the 20M tokens a recipe may spend


def test_importing_the_config_alone_loads_a_recipe_of_both_stage_kinds():
    """The stage registry fills itself: a fresh process that imports only linearize.config loads and validates a
    recipe whose stages are of both kinds, each built as its registered config."""
    code = (
        "from linearize.config import load_recipe, stage_kinds\n"
        "kinds = stage_kinds()\n"
        "stages = load_recipe('lolcats').stages\n"
        "assert all(type(s) is kinds[s.kind].config and callable(kinds[s.kind].run) for s in stages)\n"
        "print(' '.join(s.kind for s in stages))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["attention_transfer", "lora_kd"]


def test_a_stage_kind_registers_once_with_a_config_of_its_own_kind():
    kinds = stage_kinds()
    lora = kinds["lora_kd"]
    with pytest.raises(ValueError, match="'lora_kd' is already registered by LoraKDConfig"):
        register_stage("lora_kd", lora.config, lora.run)
    with pytest.raises(ValueError, match="defaults to 'lora_kd2'"):
        register_stage("lora_kd2", lora.config, lora.run)
    assert stage_kinds() == kinds


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages=[{kind: distil}]"], "unknown stage kind 'distil'"),
        (["stages=[{tokens: 5}]"], "needs a 'kind'"),
        (["stages.0.lrr=0.1"], "unknown key 'stages[0].lrr'; did you mean 'lr'?"),
        (["stages.0.optimizer=adam8bit"], "unknown optimizer 'adam8bit'"),
        (["stages.0.tokens=-5"], "tokens must be a positive budget"),
        (["precision=fp8"], "precision must be one of"),
        (["convert.selection.tokens=0"], "must be positive"),
        (["convert.mixer_options={swa:{window:256}}"],
         "override 'convert.mixer_options={swa:{window:256}}': YAML reads 'window:256' as one key with no value; write 'window: 256' with a space, or convert.mixer_options.swa.window=256"),
    ],
)
def test_recipe_mistakes_are_named(overrides, message):
    with pytest.raises(LinearizeError, match=message.replace("(", r"\(").replace("[", r"\[").replace("?", r"\?")):
        load_recipe("quickstart", overrides)


def test_the_recipe_listing_describes_each_recipe(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["linearize", "recipes"])
    wide_console(monkeypatch, 400)
    with pytest.raises(SystemExit) as exit:
        cli.main()
    assert exit.value.code == 0
    listing = capsys.readouterr().out
    for name in shipped_recipes():
        summary = recipe_summary(name)
        assert len(summary.split()) >= 8 and not summary.startswith(("linearize", "Override"))
        assert any(line.split("│")[1:3] and name == line.split("│")[1].strip() and summary.split()[0] in line for line in listing.splitlines())


def test_every_data_file_of_the_package_ships():
    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["linearize"]
    package = REPO_ROOT / "linearize"
    for path in package.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts or (path.suffix == ".py" and (path.parent / "__init__.py").exists()):
            continue
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, g) and relative.count("/") == g.count("/") for g in globs), f"{relative} is not in package-data"


# A tiny quickstart student distilled with kept keys (4 a kv head, blocks of 4) for a few steps: `serve`'s tests add to it.
KEPT_KEYS = [
    "convert.options={window: 8, keep: 4, keep_block: 4, linear_rope: false}",
    "data.seq_len=32",
    "stages=[{kind: attention_transfer, tokens: 128, batch_size: 2, lr: 0.05}]",
]


def distilled_tiny(overrides: list[str], messages: list[str]):
    """The quickstart recipe distilled on a tiny llama with `overrides`, its log into `messages`."""
    import torch

    import linearize
    from tests.tiny import tiny_data, tiny_model

    return linearize.distill(tiny_model("llama", dtype=torch.float32), tiny_data(seq_len=32), "quickstart", overrides=overrides,
                             log=messages.append, progress=False)


def test_a_recipe_serves_its_student_with_runtime_options():
    """`serve` sets options that add no parameter on the distilled student (`linearize.set_options`): distilled with
    4 kept keys, served with 8, recorded in its plan; a bad name is refused before anything loads, a bad value before
    any training, each in one line naming the fix."""
    from linearize.hf.mixers import mixers_in

    messages = []
    student = distilled_tiny([*KEPT_KEYS, "serve={keep: 8}"], messages)
    assert {m.options.keep for m in mixers_in(student)} == {8}
    assert {layer["options"]["keep"] for layer in student.config.layers} == {8}
    assert any("served with keep=8" in m for m in messages)
    with pytest.raises(LinearizeError, match="serve: no mixer of this recipe takes 'window' after distillation .*set conversion options in convert.options"):
        validate_recipe(load_recipe("quickstart", ["serve={window: 8}"]), check_data=False)
    with pytest.raises(LinearizeError, match="keep"):
        distilled_tiny([*KEPT_KEYS, "serve={keep: -1}"], messages)


def test_a_hybrid_recipe_serves_its_converted_layers_and_leaves_its_softmax_layers_alone():
    """As `hybrid_long`: kept keys while it distils and more when saved, in the converted layers only; the layer kept
    as softmax attention takes no option and says so in neither the log nor the saved plan."""
    from linearize.hf.mixers import mixers_in

    messages = []
    student = distilled_tiny([*KEPT_KEYS, "convert.keep_attention=[1]", "serve={keep: 8}"], messages)
    assert {m.layer_idx: m.options.keep for m in mixers_in(student)} == {0: 8, 2: 8}
    assert [(layer["mixer"], layer["options"].get("keep")) for layer in student.config.layers] == [
        ("hedgehog_swa", 8), ("attention", None), ("hedgehog_swa", 8)]
    assert any("served with keep=8 in 2 layers (serve)" in m for m in messages)
