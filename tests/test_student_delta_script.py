"""benchmarks/student_delta.py: a student saved as its difference from its teacher, rebuilt to the same logits."""

import json

import torch
from transformers import AutoModelForCausalLM

import linearize
from tests.tiny import benchmark_script, random_ids, run_as_script, run_main, tiny_model, tiny_tokenizer

student_delta = benchmark_script("student_delta")


def trained_like(teacher):
    """A converted student changed as distillation changes one: new mixer parameters, a rank-2 update merged into one
    projection, a full-rank change to a norm."""
    student = linearize.convert(teacher, "hedgehog_swa", window=4, keep_attention=[1])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "feature_q" in name or "window_logit" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        projection = student.model.model.layers[0].self_attn.attn.q_proj.weight
        projection.add_(torch.randn(projection.shape[0], 2, generator=generator) @ torch.randn(2, projection.shape[1], generator=generator))
        student.model.model.layers[2].input_layernorm.weight.mul_(1.5)
    return student


def test_a_student_saved_as_a_delta_rebuilds_to_its_logits(tmp_path):
    teacher = tiny_model("llama", dtype=torch.float32)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    student = trained_like(AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32)).eval()
    student.save_pretrained(tmp_path / "student")

    done = run_main(student_delta, "save", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"), "--out", str(tmp_path / "delta"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert summary["ranks"] == {"2": 1} and summary["low_rank"] == 1  # the merged update, as two thin factors
    assert summary["max_logit_error"] < 1e-4 and summary["shards"] == 1

    done = run_main(student_delta, "load", "--teacher", str(tmp_path / "teacher"), "--delta", str(tmp_path / "delta"), "--out", str(tmp_path / "rebuilt"))
    assert done.returncode == 0, done.stderr
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt", dtype=torch.float32).eval()
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, student(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_delta_refuses_another_teacher(tmp_path):
    tiny_model("llama", dtype=torch.float32).save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    (tmp_path / "delta").mkdir()
    (tmp_path / "delta" / "delta.json").write_text(json.dumps({"teacher_checksum": 1.0}))  # saved against another teacher
    done = run_as_script("student_delta", "load", "--teacher", str(tmp_path / "teacher"), "--delta", str(tmp_path / "delta"), "--out", str(tmp_path / "rebuilt"))
    assert done.returncode != 0
    assert "load the teacher it was saved against" in done.stderr.strip().splitlines()[-1]  # one line, after loading's progress
    assert not (tmp_path / "rebuilt").exists()
