"""`linearize export`: a student of a target's layers becomes that native architecture with the same function
(qwen3_5: Qwen3_5ForCausalLM; bamba: BambaForCausalLM, from transformers 5.23 on).

The exported folder loads with AutoModelForCausalLM, without remote code and without linearize; its logits are
the student's and its cached greedy generation is the student's, token for token.
"""

import functools
import importlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.config import load_recipe
from linearize.export import BAMBA, INSTALLED_TRANSFORMERS, TARGETS, build_native, export
from linearize.hf.errors import LinearizeError
from linearize.hf.mixers import mixers_in
from tests.test_cli import run as run_cli
from tests.tiny import left_padded, random_ids, relative_error, run_python, tiny_data, tiny_model, tiny_tokenizer


def student(family="llama", mixer="qwen3_5_gdn", keep=(1,), keep_as="qwen3_5_attention", **overrides):
    """A float32 tiny student whose new parameters are random, so every gate, norm and convolution is exported."""
    model = linearize.convert(tiny_model(family, dtype=torch.float32, **overrides), mixer, keep_attention=list(keep), keep_as=keep_as)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mixer_module in mixers_in(model):
            for p in mixer_module.new_parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def greedy(model, ids, mask=None, steps=16):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)


# Before 5.23 transformers' bamba normalises the Mamba-2 output over all heads at once (export refuses there).
NEEDS_BAMBA = pytest.mark.skipif(INSTALLED_TRANSFORMERS < BAMBA.min_transformers, reason="bamba computes the student's function from transformers 5.23 on")
# The mixers of a student of each target: (mixer, keep_as).
STUDENT_OF = {"qwen3_5": ("qwen3_5_gdn", "qwen3_5_attention"), "bamba": ("bamba_mamba2", "attention")}


@pytest.mark.parametrize(
    "to,family,keep_as,overrides",
    [
        ("qwen3_5", "llama", "qwen3_5_attention", {}),
        ("qwen3_5", "qwen3", "qwen3_5_attention", {}),
        ("qwen3_5", "qwen3", "attention", {}),  # Qwen3's own attention is qwen3_5's with the gate at 1
        ("qwen3_5", "mistral", "qwen3_5_attention", {"sliding_window": None}),
        pytest.param("bamba", "llama", "attention", {}, marks=NEEDS_BAMBA),  # a Llama layer is bamba's attention layer
        pytest.param("bamba", "llama", "attention", {"tie_word_embeddings": True}, marks=NEEDS_BAMBA),
        pytest.param("bamba", "mistral", "attention", {"sliding_window": None}, marks=NEEDS_BAMBA),
    ],
)
def test_the_native_model_computes_the_student(to, family, keep_as, overrides):
    model = student(family, mixer=STUDENT_OF[to][0], keep_as=keep_as, **overrides)
    native = build_native(model, to)
    assert type(native).__name__ == TARGETS[to].architecture
    assert native.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    ids, mask = left_padded(random_ids(2, 12), [3, 0])
    with torch.no_grad():
        assert relative_error(native(input_ids=ids, attention_mask=mask).logits[1], model(input_ids=ids, attention_mask=mask).logits[1]) < 1e-5
    assert torch.equal(greedy(native, ids[1:]), greedy(model, ids[1:]))
    assert torch.equal(greedy(native, ids, mask), greedy(model, ids, mask))


@pytest.mark.core
def test_the_exported_folders_load_without_linearize_or_remote_code(tmp_path):
    """Each target the installed transformers computes: the export loads as its native class in a process without
    linearize, with the student's logits and greedy tokens; the student itself loads there too, as remote code."""
    targets = [target for target in TARGETS.values() if INSTALLED_TRANSFORMERS >= target.min_transformers]
    ids = random_ids(1, 10)
    for target in targets:
        mixer, keep_as = STUDENT_OF[target.name]
        model = student(mixer=mixer, keep_as=keep_as)
        out = export(model, tmp_path / target.name, target.name, tokenizer=tiny_tokenizer(), log=lambda m: None)
        model.save_pretrained(tmp_path / f"{target.name}-student")
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == [target.architecture] and "auto_map" not in config
        assert {"model.safetensors", "tokenizer.json", "generation_config.json", "export.json"} <= {p.name for p in out.iterdir()}
        record = json.loads((out / "export.json").read_text())
        assert record["target"] == target.name and record["logit_difference"] < 1e-5
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        torch.save({"ids": ids, "logits": expected, "tokens": greedy(model, ids)}, tmp_path / f"{target.name}.pt")
    printed = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        for name in {[target.name for target in targets]!r}:
            folder = {str(tmp_path)!r} + "/" + name
            model = AutoModelForCausalLM.from_pretrained(folder)
            AutoTokenizer.from_pretrained(folder)
            probe = torch.load(folder + ".pt")
            student = AutoModelForCausalLM.from_pretrained(folder + "-student", trust_remote_code=True, dtype=torch.float32)
            with torch.no_grad():
                logits, again = model(input_ids=probe["ids"]).logits, student(input_ids=probe["ids"]).logits
            error = ((logits - probe["logits"]).norm() / probe["logits"].norm()).item()
            error_again = ((again - probe["logits"]).norm() / probe["logits"].norm()).item()
            tokens = model.generate(input_ids=probe["ids"], max_new_tokens=16, min_new_tokens=16, do_sample=False)
            print(type(model).__name__, error < 1e-5, error_again < 1e-5, torch.equal(tokens, probe["tokens"]))
        """,
        tmp_path,
    )
    assert printed.splitlines() == [f"{target.architecture} True True True" for target in targets]


@pytest.mark.parametrize(
    "recipe_name,kept_as,stages",
    [
        ("hybrid_qwen3_5", "qwen3_5_attention", "{kind: attention_transfer, tokens: 256, batch_size: 2, lr: 0.01}, {kind: attention_transfer, tokens: 128, batch_size: 2, lr: 0.01}"),
        pytest.param("hybrid_bamba", "attention", "{kind: attention_transfer, tokens: 256, batch_size: 2, lr: 0.01}", marks=NEEDS_BAMBA),
    ],
    ids=["hybrid_qwen3_5", "hybrid_bamba"],
)
def test_the_export_ready_recipes_train_and_export(tmp_path, recipe_name, kept_as, stages):
    """Each export-ready recipe at a tiny size: its layers are the target's after the selection (hybrid_qwen3_5's kept
    layers become qwen3_5_attention, hybrid_bamba's stay the teacher's), the whole recipe runs, and the distilled
    student exports to a model with its logits."""
    recipe = load_recipe(
        recipe_name,
        [
            "data.seq_len=32",
            "convert.selection.tokens=512",
            f"stages=[{stages}, {{kind: lora_kd, tokens: 128, batch_size: 2, lr: 0.001, rank: 4, alpha: 8, train_new_parameters: true}}]",
        ],
    )
    teacher = tiny_model("llama", dtype=torch.float32, num_hidden_layers=4)
    model = linearize.distill(teacher, tiny_data(seq_len=32), recipe, log=lambda m: None, progress=False)
    kept = model.config.selection["kept_attention"]
    assert [e.mixer for e in model.config.plan] == [kept_as if i in kept else recipe.convert.mixer for i in range(4)]
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = export(folder, tmp_path / "native", recipe_name.removeprefix("hybrid_"), log=lambda m: None)
    native = AutoModelForCausalLM.from_pretrained(out)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert relative_error(native(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize(
    "to,make,message",
    [
        ("qwen3_5", lambda: student(mixer="gated_deltanet", keep=(1,), keep_as="attention"),
         "qwen3_5 cannot express layers 0, 2 (gated_deltanet); layers 1 (attention); convert with mixers qwen3_5_gdn and qwen3_5_attention"),
        ("qwen3_5", lambda: student(keep=()), "cannot generate when every layer is Gated DeltaNet"),
        ("qwen3_5", lambda: student("llama", attention_bias=True), "needs projections without bias"),
        ("qwen3_5", lambda: student("qwen2"), "this student's teacher is 'qwen2'"),
        ("qwen3_5", lambda: student("gpt_neox", keep=(1,), keep_as="attention", mixer="gla"), "needs a teacher of family llama, mistral, qwen3"),
        ("qwen3_5", lambda: student("mistral", keep_as="attention"), "this mistral teacher slides over 6 tokens"),
        ("bamba", lambda: student(mixer="bamba_mamba2", keep_as="qwen3_5_attention"),
         "bamba cannot express layers 1 (qwen3_5_attention); convert with mixers bamba_mamba2 and attention (the recipe hybrid_bamba)"),
        ("bamba", lambda: student(mixer="bamba_mamba2", keep=()),
         "bamba in transformers cannot generate when every layer is Mamba-2 (its cache needs an attention layer to count tokens); keep at least one layer as the teacher's attention"),
        ("bamba", lambda: student("qwen3", mixer="bamba_mamba2", keep_as="attention"), "bamba export needs a teacher of family llama, mistral; this student's teacher is 'qwen3'"),
        ("bamba", lambda: student("mistral", mixer="bamba_mamba2", keep_as="attention"), "bamba has no sliding-window attention"),
        ("bamba", lambda: student(mixer="bamba_mamba2", keep_as="attention", head_dim=8),
         "this llama teacher has 4 heads of 8 for a hidden size of 64, which bamba cannot express"),
    ],
)
def test_students_the_target_cannot_express_are_refused_in_one_line(to, make, message):
    model = make()
    with pytest.raises(LinearizeError) as info:
        build_native(model, to)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bamba_export_needs_the_transformers_that_computes_it(monkeypatch):
    """Before 5.23 transformers' bamba normalises the Mamba-2 output over all heads at once, not per group: export
    refuses there rather than write a folder that computes another function."""
    monkeypatch.setattr(importlib.import_module("linearize.export"), "INSTALLED_TRANSFORMERS", (5, 22))
    with pytest.raises(LinearizeError) as info:
        build_native(student(mixer="bamba_mamba2", keep_as="attention"), "bamba")
    assert str(info.value).startswith("bamba export needs transformers >= 5.23, whose BambaForCausalLM computes what the student does")
    assert "pip install -U transformers" in str(info.value) and "\n" not in str(info.value)


def test_bad_target_and_teacher_folder_are_one_line_errors(tmp_path):
    with pytest.raises(LinearizeError, match="unknown export target 'llama'; available: bamba, qwen3_5"):
        export(student(), tmp_path / "x", to="llama")
    teacher = tmp_path / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    with pytest.raises(LinearizeError, match="export takes a converted model"):
        export(teacher, tmp_path / "y")


@pytest.mark.parametrize(
    "to,convert_options,engine_line",
    [
        ("qwen3_5", ["--mixer", "qwen3_5_gdn", "--keep-as", "qwen3_5_attention"], "vllm serve {native}"),
        pytest.param("bamba", ["--mixer", "bamba_mamba2"], "AutoModelForCausalLM.from_pretrained({native})", marks=NEEDS_BAMBA),
    ],
    ids=["qwen3_5", "bamba"],
)
def test_cli_converts_for_export_and_exports(tmp_path, monkeypatch, capsys, to, convert_options, engine_line):
    teacher = tmp_path / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    run = functools.partial(run_cli, monkeypatch, capsys)

    converted, native = tmp_path / "student", tmp_path / "native"
    code, _, stderr = run("convert", teacher, "--out", converted, "--keep-attention", "1", *convert_options)
    assert code == 0, stderr
    code, stdout, stderr = run("export", converted, "--out", native, "--to", to)
    assert code == 0, stderr
    assert TARGETS[to].architecture in stdout and engine_line.format(native=native) in stdout
    student_model = AutoModelForCausalLM.from_pretrained(converted)
    ids = random_ids(1, 9)
    with torch.no_grad():
        assert relative_error(AutoModelForCausalLM.from_pretrained(native)(input_ids=ids).logits, student_model(input_ids=ids).logits) < 1e-5
    code, _, stderr = run("export", converted, "--out", native, "--to", to)
    assert code == 2 and "already exists; pass --overwrite" in stderr
    code, _, stderr = run("export", converted, "--out", tmp_path / "z", "--to", "olmo")
    assert code == 2 and "unknown export target 'olmo'" in stderr


def test_export_check_script_passes_an_export_and_fails_a_different_model(tmp_path, monkeypatch):
    """benchmarks/export_check.py (run on the GPU machine's trained students): an export passes in an isolated
    process without linearize; a native model with other weights fails with exit 1. The script itself runs in this
    process as __main__ (its check still starts the isolated `python -I` one): a process of its own would import
    torch, transformers and linearize again, twice."""
    import runpy
    import sys

    from tests.conftest import REPO_ROOT

    model = student()
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = export(folder, tmp_path / "native", log=lambda m: None)
    text = tmp_path / "heldout.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20)

    def check(native):
        script = REPO_ROOT / "benchmarks/export_check.py"
        arguments = [str(folder), str(native), "--text", str(text), "--steps", "6", "--python", sys.executable, "--out", str(tmp_path / "check.json")]
        monkeypatch.setattr(sys, "argv", [str(script), *arguments])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
        return done.value.code, json.loads((tmp_path / "check.json").read_text())

    code, result = check(out)
    assert code == 0 and result["passed"] and result["class"] == "Qwen3_5ForCausalLM"
    assert result["logits_relative_error"] < 1e-4 and result["same_generation"]
    other = build_native(student(keep=(0,)), "qwen3_5")
    other.save_pretrained(tmp_path / "other")
    code, result = check(tmp_path / "other")
    assert code == 1 and not result["passed"] and result["logits_relative_error"] > 1e-2


def test_the_check_runs_where_the_targets_kernels_can(monkeypatch):
    """transformers' qwen3_5 calls fla's Triton kernels whenever fla is installed, CPU tensors too: with fla there,
    a CPU student is checked on CUDA, and without a GPU export says what to do; bamba checks its device itself."""
    from linearize.export import QWEN3_5, check_device

    model = student()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fla" else real_find_spec(name, *a))
    assert check_device(model, QWEN3_5) == torch.device("cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "fla" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device(model, QWEN3_5) == torch.device("cuda")
    assert check_device(model, BAMBA) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LinearizeError, match=r"^transformers' Qwen3_5ForCausalLM calls fla's GPU kernels .*\(pip uninstall flash-linear-attention fla-core\)$"):
        check_device(model, QWEN3_5)
