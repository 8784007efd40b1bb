"""`linearize export`: a student of qwen3_5's layers becomes a native Qwen3_5ForCausalLM with the same function.

The exported folder loads with AutoModelForCausalLM, without remote code and without linearize; its logits are
the student's and its cached greedy generation is the student's, token for token.
"""

import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.config import load_recipe
from linearize.export import build_native, export
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


@pytest.mark.parametrize(
    "family,keep_as,overrides",
    [
        ("llama", "qwen3_5_attention", {}),
        ("qwen3", "qwen3_5_attention", {}),
        ("qwen3", "attention", {}),  # Qwen3's own attention is qwen3_5's with the gate at 1
        ("mistral", "qwen3_5_attention", {"sliding_window": None}),
    ],
)
def test_the_native_model_computes_the_student(family, keep_as, overrides):
    model = student(family, keep_as=keep_as, **overrides)
    native = build_native(model)
    assert type(native).__name__ == "Qwen3_5ForCausalLM"
    assert native.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    ids, mask = left_padded(random_ids(2, 12), [3, 0])
    with torch.no_grad():
        assert relative_error(native(input_ids=ids, attention_mask=mask).logits[1], model(input_ids=ids, attention_mask=mask).logits[1]) < 1e-5
    assert torch.equal(greedy(native, ids[1:]), greedy(model, ids[1:]))
    assert torch.equal(greedy(native, ids, mask), greedy(model, ids, mask))


@pytest.mark.core
def test_the_exported_folder_loads_without_linearize_or_remote_code(tmp_path):
    model = student()
    out = export(model, tmp_path / "native", tokenizer=tiny_tokenizer(), log=lambda m: None)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForCausalLM"] and "auto_map" not in config
    assert {"model.safetensors", "tokenizer.json", "generation_config.json", "export.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "export.json").read_text())
    assert record["target"] == "qwen3_5" and record["logit_difference"] < 1e-5
    ids = random_ids(1, 10)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    tokens = greedy(model, ids)
    torch.save({"ids": ids, "logits": expected, "tokens": tokens}, tmp_path / "probe.pt")
    printed = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        AutoTokenizer.from_pretrained({str(out)!r})
        probe = torch.load({str(tmp_path / "probe.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=probe["ids"]).logits
        error = ((logits - probe["logits"]).norm() / probe["logits"].norm()).item()
        tokens = model.generate(input_ids=probe["ids"], max_new_tokens=16, min_new_tokens=16, do_sample=False)
        print(type(model).__name__, error < 1e-5, torch.equal(tokens, probe["tokens"]))
        """,
        tmp_path,
    )
    assert printed.split() == ["Qwen3_5ForCausalLM", "True", "True"]


def test_the_export_ready_recipe_trains_and_exports(tmp_path):
    """hybrid_qwen3_5 at a tiny size: its kept layers become qwen3_5_attention after the first transfer, the whole
    recipe runs, and the distilled student exports to a model with its logits."""
    recipe = load_recipe(
        "hybrid_qwen3_5",
        [
            "data.seq_len=32",
            "convert.selection.tokens=512",
            "stages=[{kind: attention_transfer, tokens: 256, batch_size: 2, lr: 0.01}, {kind: attention_transfer, tokens: 128, batch_size: 2, lr: 0.01}, {kind: lora_kd, tokens: 128, batch_size: 2, lr: 0.001, rank: 4, alpha: 8, train_new_parameters: true}]",
        ],
    )
    teacher = tiny_model("llama", dtype=torch.float32, num_hidden_layers=4)
    model = linearize.distill(teacher, tiny_data(seq_len=32), recipe, log=lambda m: None, progress=False)
    kept = model.config.selection["kept_attention"]
    assert [e.mixer for e in model.config.plan] == ["qwen3_5_attention" if i in kept else "qwen3_5_gdn" for i in range(4)]
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = export(folder, tmp_path / "native", log=lambda m: None)
    native = AutoModelForCausalLM.from_pretrained(out)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert relative_error(native(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: student(mixer="gated_deltanet", keep=(1,), keep_as="attention"),
         "qwen3_5 cannot express layers 0, 2 (gated_deltanet); layers 1 (attention); convert with mixers qwen3_5_gdn and qwen3_5_attention"),
        (lambda: student(keep=()), "cannot generate when every layer is Gated DeltaNet"),
        (lambda: student("llama", attention_bias=True), "needs projections without bias"),
        (lambda: student("qwen2"), "this student's teacher is 'qwen2'"),
        (lambda: student("gpt_neox", keep=(1,), keep_as="attention", mixer="gla"), "needs a teacher of family llama, mistral, qwen3"),
        (lambda: student("mistral", keep_as="attention"), "this mistral teacher slides over 6 tokens"),
    ],
)
def test_students_the_target_cannot_express_are_refused_in_one_line(make, message):
    model = make()
    with pytest.raises(LinearizeError) as info:
        build_native(model)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_target_and_teacher_folder_are_one_line_errors(tmp_path):
    with pytest.raises(LinearizeError, match="unknown export target 'llama'; available: qwen3_5"):
        export(student(), tmp_path / "x", to="llama")
    teacher = tmp_path / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    with pytest.raises(LinearizeError, match="export takes a converted model"):
        export(teacher, tmp_path / "y")


def test_cli_converts_for_export_and_exports(tmp_path, monkeypatch, capsys):
    teacher = tmp_path / "teacher"
    tiny_model("llama", dtype=torch.float32).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    run = functools.partial(run_cli, monkeypatch, capsys)

    converted, native = tmp_path / "student", tmp_path / "native"
    code, _, stderr = run("convert", teacher, "--out", converted, "--mixer", "qwen3_5_gdn", "--keep-attention", "1", "--keep-as", "qwen3_5_attention")
    assert code == 0, stderr
    code, stdout, stderr = run("export", converted, "--out", native)
    assert code == 0, stderr
    assert "Qwen3_5ForCausalLM" in stdout and f"vllm serve {native}" in stdout
    student_model = AutoModelForCausalLM.from_pretrained(converted)
    ids = random_ids(1, 9)
    with torch.no_grad():
        assert relative_error(AutoModelForCausalLM.from_pretrained(native)(input_ids=ids).logits, student_model(input_ids=ids).logits) < 1e-5
    code, _, stderr = run("export", converted, "--out", native)
    assert code == 2 and "already exists; pass --overwrite" in stderr
    code, _, stderr = run("export", converted, "--out", tmp_path / "z", "--to", "olmo")
    assert code == 2 and "unknown export target 'olmo'" in stderr
