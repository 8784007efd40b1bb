"""Checkpoints: an interrupted run resumed is bit-identical to an unbroken one; a NaN stops the run and keeps the
last good checkpoint; resuming refuses a different recipe or model; out-of-memory names the fix."""

import json

import pytest
import torch

import linearize
from linearize.config import load_recipe
from linearize.distillation import loop
from linearize.distillation.checkpoints import latest_checkpoint
from linearize.distillation.session import Session
from linearize.distillation.stages import lora_kd
from linearize.hf.errors import LinearizeError
from linearize.run import Run
from tests.tiny import tiny_data, tiny_model

# Two stages on a 6-layer model with the kept layers chosen automatically between them, so a resumed run
# must replay the finished stage, the selection and half of the second stage.
STAGES = (
    "stages=[{kind: attention_transfer, tokens: 768, batch_size: 2, grad_accum: 2, lr: 0.05, checkpoint_every: 2, log_every: 1},"
    " {kind: lora_kd, tokens: 768, batch_size: 2, grad_accum: 2, lr: 0.003, checkpoint_every: 2, log_every: 1, train_new_parameters: true}]"
)
OVERRIDES = ["convert.mixer=hedgehog_swa", "convert.options.window=4", "convert.keep_attention=auto:2", "convert.selection.tokens=256", "data.seq_len=32", STAGES]


@pytest.fixture(scope="module")
def data():
    return tiny_data(seq_len=32)


def teacher(seed=0):
    return tiny_model("llama", seed=seed, dtype=torch.float32, num_hidden_layers=6)


def distill(data, folder, resume=False, overrides=(), seed=0, log=lambda message: None):
    recipe = load_recipe("quickstart", OVERRIDES + list(overrides))
    return linearize.distill(teacher(seed), data, recipe, checkpoints=folder, resume=resume, log=log, progress=False)


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, stage, step):
    """Make the run stop (like a killed process) right after it logs `step` of `stage`."""
    original = Session.record

    def record(self, entry):
        original(self, entry)
        if entry.get("stage") == stage and entry.get("step") == step:
            raise Interrupt

    monkeypatch.setattr(Session, "record", record)


def records(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    timings = ("tokens_per_s", "seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in lines]


def test_resume_is_bit_identical_to_an_unbroken_run(data, tmp_path, monkeypatch):
    unbroken = distill(data, tmp_path / "a")
    assert unbroken.config.selection["kept_attention"] and len(unbroken.config.selection["kept_attention"]) == 2

    with monkeypatch.context() as patch:
        interrupt_at(patch, stage=1, step=5)  # checkpoints at 2 and 4: step 5 is lost and must be redone
        with pytest.raises(Interrupt):
            distill(data, tmp_path / "b")
    assert latest_checkpoint(tmp_path / "b" / "stage1-lora_kd").name == "step-0000004"
    resumed = distill(data, tmp_path / "b", resume=True)

    expected, got = unbroken.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), [k for k in expected if not torch.equal(expected[k], got[k])]
    assert resumed.config.layers == unbroken.config.layers and resumed.config.selection == unbroken.config.selection
    assert records(tmp_path / "b") == records(tmp_path / "a")


def test_resume_refuses_another_recipe_or_model_and_needs_checkpoints(data, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, stage=0, step=2)
        with pytest.raises(Interrupt):
            distill(data, tmp_path / "run")
    with pytest.raises(LinearizeError, match=r"different recipe \(convert\.options\.window: 4 then, 8 now\); a resumed run may change only"):
        distill(data, tmp_path / "run", resume=True, overrides=["convert.options.window=8"])
    with pytest.raises(LinearizeError, match="written for a different model"):
        distill(data, tmp_path / "run", resume=True, seed=1)
    with pytest.raises(LinearizeError, match="holds checkpoints of an unfinished run; continue it with --resume"):
        distill(data, tmp_path / "run")
    with pytest.raises(LinearizeError, match="nothing to resume"):
        distill(data, tmp_path / "empty", resume=True)
    # Changing only how often to log or checkpoint is allowed.
    distill(data, tmp_path / "run", resume=True, overrides=["stages.1.log_every=3"])


def poison_kd_from_step(monkeypatch, step: int) -> None:
    """Make the KD loss NaN from optimizer step `step` of the lora_kd stage on (two micro-batches a step)."""
    calls = {"n": 0}
    original = lora_kd.kd_losses

    def poisoned(*args):
        calls["n"] += 1
        kl, ce = original(*args)
        return (kl * float("nan"), ce) if calls["n"] > 2 * (step - 1) else (kl, ce)

    monkeypatch.setattr(lora_kd, "kd_losses", poisoned)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    poison_kd_from_step(monkeypatch, 6)
    folder = tmp_path / "run"
    with pytest.raises(LinearizeError) as error:
        distill(data, folder)
    message = str(error.value)
    assert "stages[1] (lora_kd) step 6: the loss is nan" in message and "\n" not in message
    assert "this stage's last good checkpoint (step 4)" in message and "the 1 finished stage(s) before it are kept" in message
    assert "continue with --resume stages.1.lr=LOWER: this stage starts again after the finished ones" in message
    checkpoint = latest_checkpoint(folder / "stage1-lora_kd")
    assert checkpoint.name == "step-0000004" and json.loads((checkpoint / "state.json").read_text())["step"] == 4
    assert not [p for p in (folder / "stage1-lora_kd").iterdir() if p.name.startswith(".")]
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "trainable.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_a_lower_rate_resumes_a_failed_stage_after_the_finished_ones(data, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        poison_kd_from_step(patch, 6)
        with pytest.raises(LinearizeError, match="step 6: the loss is nan"):
            distill(data, folder)
    with pytest.raises(LinearizeError, match=r"stages\.0\.lr: 0\.05 then, 0\.1 now, in stage 0, which has finished"):
        distill(data, folder, resume=True, overrides=["stages.1.lr=0.001", "stages.0.lr=0.1"])
    said = []
    resumed = distill(data, folder, resume=True, overrides=["stages.1.lr=0.001"], log=said.append)
    assert "stages[1] changed since its checkpoints were written (stages.1.lr: 0.003 then, 0.001 now): it starts again" in said
    unbroken = distill(data, tmp_path / "unbroken", overrides=["stages.1.lr=0.001"])
    expected, got = unbroken.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert records(folder) == records(tmp_path / "unbroken")


def test_a_resumed_stage_records_its_whole_training_time(data, tmp_path, monkeypatch):
    """On a clock that advances one second per reading, a stage resumed after an interruption reports about the
    seconds of an unbroken one (both parts), not only the part after the resumption."""
    clock = {"now": 0.0}

    def tick():
        clock["now"] += 1.0
        return clock["now"]

    sessions, train = [], Run.train

    def keep_session(run):
        sessions.append(run.session)
        return train(run)

    monkeypatch.setattr(loop.time, "time", tick)
    monkeypatch.setattr(Run, "train", keep_session)
    distill(data, tmp_path / "a")
    with monkeypatch.context() as patch:
        interrupt_at(patch, stage=1, step=5)
        with pytest.raises(Interrupt):
            distill(data, tmp_path / "b")
    before = json.loads((latest_checkpoint(tmp_path / "b" / "stage1-lora_kd") / "state.json").read_text())["seconds"]
    distill(data, tmp_path / "b", resume=True)
    unbroken, resumed = (next(r for r in sessions[i].reports if r["stage"] == 1)["seconds"] for i in (0, 2))
    assert before > 0.4 * unbroken and abs(resumed - unbroken) < 0.2 * unbroken, (before, resumed, unbroken)


def test_out_of_memory_names_the_fix(data, monkeypatch):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lora_kd, "kd_losses", oom)
    with pytest.raises(LinearizeError) as error:
        distill(data, None)
    message = str(error.value)
    assert "ran out of memory" in message and "batch_size" in message and "seq_len" in message and "gradient_checkpointing=true" in message
    assert "\n" not in message


def test_out_of_memory_on_a_shared_gpu_says_who_holds_it(data, monkeypatch):
    """Where other processes hold a quarter of the GPU or more, the error says so first (a smaller batch would not
    help); below that it names the settings alone. A stage with its own length names that length's key."""
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lora_kd, "kd_losses", oom)
    for held, shared in ((60 * 2**30, True), (2**30, False), (None, False)):
        monkeypatch.setattr(loop, "held_elsewhere", lambda device, held=held: None if held is None else (held, 80 * 2**30))
        with pytest.raises(LinearizeError) as error:
            distill(data, None, overrides=["stages.1.seq_len=16", "stages.1.split_on_oom=false"])
        message = str(error.value)
        assert ("while other processes held 60.0 of its 80.0 GiB" in message and "CUDA_VISIBLE_DEVICES" in message) is shared, message
        assert ("other processes" in message) is shared
        assert "batch_size=2 and stages[1].seq_len=16" in message and "lower stages[1].seq_len" in message and "data.seq_len" not in message
        assert "gradient_checkpointing=true" in message and "\n" not in message


def test_held_elsewhere_is_the_driver_s_use_less_this_process_s_reserve(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 12 * gib)
    assert loop.held_elsewhere(torch.device("cuda", 0)) == (58 * gib, 80 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 75 * gib)  # the driver's figure lags: never below 0
    assert loop.held_elsewhere(torch.device("cuda", 0)) == (0, 80 * gib)
    assert loop.held_elsewhere(torch.device("cpu")) is None

    def broken(device):
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    assert loop.held_elsewhere(torch.device("cuda", 0)) is None


def test_out_of_memory_splits_the_micro_batch_and_takes_the_same_steps(data, tmp_path, monkeypatch):
    """A KD micro-batch of two windows does not fit: the stage goes on at one window a micro-batch and twice the
    accumulation, and trains exactly as a run configured that way."""
    said = []
    kd_losses = lora_kd.kd_losses

    def fits_one_window(student, teacher, ids, *args):
        if ids.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return kd_losses(student, teacher, ids, *args)

    planned = distill(data, tmp_path / "planned", overrides=["stages.1.batch_size=1", "stages.1.grad_accum=4"])
    with monkeypatch.context() as patch:
        patch.setattr(lora_kd, "kd_losses", fits_one_window)
        split = distill(data, tmp_path / "split", log=said.append)
    assert records(tmp_path / "split") == records(tmp_path / "planned")
    for (name, weight), other in zip(split.state_dict().items(), planned.state_dict().values(), strict=True):
        assert torch.equal(weight, other), name
    notes = [m for m in said if "out of GPU memory" in m]
    assert len(notes) == 1 and "batch_size=2" in notes[0] and "grad_accum=4" in notes[0] and "\n" not in notes[0]
    with monkeypatch.context() as patch, pytest.raises(LinearizeError, match="ran out of memory with batch_size=2"):
        patch.setattr(lora_kd, "kd_losses", fits_one_window)
        distill(data, None, overrides=["stages.1.split_on_oom=false"])


def test_checkpoint_holds_only_trainable_weights(data, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, stage=0, step=3)
        with pytest.raises(Interrupt):
            distill(data, tmp_path / "run")
    checkpoint = latest_checkpoint(tmp_path / "run" / "stage0-attention_transfer")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["optimizer.pt", "rng-0.pt", "scheduler.pt", "state.json", "trainable.safetensors"]
    from safetensors.torch import load_file

    names = set(load_file(checkpoint / "trainable.safetensors"))
    assert names and all(".feature_" in n or "window_logit" in n for n in names)
