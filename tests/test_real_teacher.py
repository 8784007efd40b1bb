"""On the real SmolLM2-135M-Instruct: exact self-teacher, and every mixer converts, generates, prefills in
chunks, saves and reloads (in this process, and pushed to the loopback Hub, as remote code in a fresh one)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.hf.cache import returned_cache
from tests.test_push import TOKEN, hub  # noqa: F401  (the loopback Hub fixture)
from tests.tiny import assert_reloaded, reload_probe, run_python

pytestmark = pytest.mark.slow

PROMPTS = ["Elizabeth walked to Netherfield through the mud,", "The best way to learn a language is"]


@pytest.fixture
def teacher(smollm2):
    model, _ = smollm2
    return copy.deepcopy(model)


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tokenizer = smollm2
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def test_teacher_mode_matches_the_original_model(teacher, batch):
    expected = teacher(**batch).logits
    student = linearize.convert(teacher, "hedgehog_swa")
    with linearize.teacher_mode(student):
        got = student(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_converting_every_layer_to_attention_changes_nothing(teacher, batch):
    expected = teacher(**batch).logits
    student = linearize.convert(teacher, "attention")
    assert torch.equal(student(**batch).logits, expected)


@pytest.fixture
def every_mixer(teacher):
    """One conversion of the real teacher holding every mixer: layer i gets the i-th mixer, counting round."""
    names = sorted(linearize.MIXERS)
    layers = {name: [i for i in range(teacher.config.num_hidden_layers) if names[i % len(names)] == name] for name in names}
    student = linearize.convert(teacher, "hedgehog", keep_attention=layers["attention"], hybrid={n: l for n, l in layers.items() if n not in ("attention", "hedgehog")},
                                source="smollm2-135m")
    assert {entry["mixer"] for entry in student.config.layers} == set(names)
    return student


def test_every_mixer_on_the_real_teacher_generates_as_uncached_and_prefills_in_chunks(every_mixer, batch):
    """Every mixer on real weights at once (the tiny-model tests take them one by one): cached greedy generation equals
    uncached, and a prefill in two chunks equals one."""
    student = every_mixer
    ids, mask = batch["input_ids"], batch["attention_mask"]

    # 16 greedy tokens after the 9-token prompts: past a 16-token sub-chunk of the chunked forms and short of every
    # default window and chunk (64, 128), as 24 were; the uncached reference re-reads the whole prefix at every step
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(student.generate(**settings), student.generate(**settings, use_cache=False))

    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # chunked prefill against one-shot prefill in float64: the chunk boundaries differ, so float32 rounding
    # through 30 layers reaches a few 1e-5 of the logits' norm; float64 leaves only real differences. Without
    # gradients, as a prefill runs: autograd would keep every float64 activation of three passes (several times
    # slower here; on the CPU the mixers take the same path either way). In place: the student is not used again
    wide = student.double()
    split = ids.shape[1] // 2
    with torch.no_grad():
        first = wide(ids[:, :split], attention_mask=mask[:, :split], position_ids=positions[:, :split], use_cache=True)
        rest = wide(ids[:, split:], attention_mask=mask, position_ids=positions[:, split:], cache=returned_cache(first), use_cache=True)
        oneshot = wide(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    chunked = torch.cat((first.logits, rest.logits), 1)
    assert ((chunked - oneshot).norm() / oneshot.norm()).item() < 1e-10


def test_a_real_student_of_every_mixer_saves_pushes_and_reloads_with_and_without_linearize(every_mixer, smollm2, batch, hub, tmp_path):  # noqa: F811
    """One conversion holding every mixer, so one 0.5 GB save covers them all: it reloads here, and pushed to the
    loopback Hub, the repo loads as remote code in a fresh process (the push carries every file a load needs, and the
    token never shows)."""
    _, tokenizer = smollm2
    student = every_mixer
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cached = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False)

    folder = tmp_path / "smollm2-every-mixer"
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    assert_reloaded(reloaded, student, **inputs)

    linearize.push(str(folder), "me/smollm2-every-mixer")
    repo = hub.folder("me/smollm2-every-mixer")
    output = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(repo)!r}, trust_remote_code=True)
        """
        + reload_probe(student, tmp_path / "probe.pt", **inputs)
        + f"""
        generated = model.generate(input_ids=probe["inputs"]["input_ids"], attention_mask=probe["inputs"]["attention_mask"],
                                   max_new_tokens=24, min_new_tokens=24, do_sample=False)
        print("same generation", generated.tolist() == {cached.tolist()!r})
        """,
        cwd=tmp_path,
    )
    assert "reloaded exactly True" in output
    assert "same generation True" in output
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (repo / "README.md").read_text() and TOKEN not in output


def test_a_real_student_exports_to_qwen3_5_and_loads_without_linearize(teacher, smollm2, batch, tmp_path):
    """convert -> distill a few steps -> export -> reload in a fresh process without linearize: equal logits (to
    float32 rounding over 30 layers, export.FLOAT32_TOLERANCE) and equal cached greedy generation (left-padded batch)."""
    from linearize.config import load_recipe
    from linearize.export import FLOAT32_TOLERANCE, export

    _, tokenizer = smollm2
    recipe = load_recipe(
        "quickstart",
        [
            "convert.mixer=qwen3_5_gdn",
            "convert.options={}",
            "convert.keep_attention=every:10",
            "convert.keep_as=qwen3_5_attention",
            "data.seq_len=64",
            "stages=[{kind: attention_transfer, tokens: 256, batch_size: 2, lr: 0.001}, {kind: lora_kd, tokens: 128, batch_size: 2, lr: 0.0001, rank: 4, alpha: 8, train_new_parameters: true}]",
        ],
    )
    student = linearize.distill(linearize.convert(teacher, "qwen3_5_gdn", keep_attention="every:10", keep_as="qwen3_5_attention"),
                                "prideprejudice", recipe, tokenizer=tokenizer, log=lambda m: None, progress=False)
    assert [e.mixer for e in student.config.plan].count("qwen3_5_attention") == 3
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    out = export(tmp_path / "student", tmp_path / "native", log=lambda m: None)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = student(input_ids=ids, attention_mask=mask).logits
    generated = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    torch.save({"ids": ids, "mask": mask, "logits": expected, "tokens": generated}, tmp_path / "probe.pt")
    output = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        probe = torch.load({str(tmp_path / "probe.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=probe["ids"], attention_mask=probe["mask"]).logits
        real = probe["mask"].bool()
        error = ((logits - probe["logits"])[real].norm() / probe["logits"][real].norm()).item()
        tokens = model.generate(input_ids=probe["ids"], attention_mask=probe["mask"], max_new_tokens=24, min_new_tokens=24, do_sample=False)
        print(type(model).__name__, error, torch.equal(tokens, probe["tokens"]))
        """,
        cwd=tmp_path,
    )
    name, error, same = output.split()
    assert name == "Qwen3_5ForCausalLM" and float(error) < FLOAT32_TOLERANCE and same == "True"
