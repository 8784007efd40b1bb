"""Cached teacher logits: the sparse KL over the teacher's top k and one bucket for the rest equals the full KL when
k is the vocabulary and a hand-computed bucket KL when k is small (values and gradients); the lora_kd stage runs
the teacher once per training window, keeps the cache on disk at its expected size, and a resumed stage reads it
back instead of running the teacher; bad settings are refused in one line."""

import math
import struct
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from torch import nn

import linearize
from linearize.config import load_recipe
from linearize.distillation import LoraKDConfig
from linearize.distillation.kd import KDHead, kd_losses
from linearize.distillation.session import Session
from linearize.distillation.stages import lora_kd
from linearize.distillation import teacher_logits
from linearize.distillation.teacher_logits import KeyedWindows, TeacherLogitCache, top_k
from linearize.hf.errors import LinearizeError
from tests.test_triton_step import kernel_calls
from tests.test_triton_window import needs_triton
from tests.tiny import VOCAB, tiny_data, tiny_model


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("through_head", [True, False])
def test_with_k_the_vocabulary_the_sparse_kl_is_the_full_one(temperature, through_head):
    torch.manual_seed(0)
    batch, length, width, vocab = 3, 11, 16, 37
    hidden = torch.randn(batch, length, width, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, width, dtype=torch.float64)
    head = nn.Linear(width, vocab).double()
    ids = torch.randint(vocab, (batch, length))
    kl, ce = kd_losses(head(hidden), head(teacher_hidden).detach(), ids, temperature)
    (0.7 * kl + 0.3 * ce).backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    for p in (hidden, *head.parameters()):
        p.grad = None
    if through_head:
        teacher = top_k(teacher_hidden, vocab, temperature, KDHead(head.weight.detach(), head.bias.detach(), 5))
        got_kl, got_ce = kd_losses(hidden, teacher, ids, temperature, KDHead(head.weight, head.bias, 7))
    else:
        teacher = top_k(head(teacher_hidden).detach(), vocab, temperature)
        got_kl, got_ce = kd_losses(head(hidden), teacher, ids, temperature)
    (0.7 * got_kl + 0.3 * got_ce).backward()
    assert torch.isneginf(teacher.log_rest).all()  # nothing is left outside the whole vocabulary
    assert got_kl.item() == pytest.approx(kl.item(), abs=1e-12) and got_ce.item() == pytest.approx(ce.item(), abs=1e-12)
    for got, want in zip([hidden.grad, head.weight.grad, head.bias.grad], expected):
        assert torch.allclose(got, want, atol=1e-12), (got - want).abs().max()


def test_a_small_k_gives_the_kl_of_the_top_k_and_one_bucket_for_the_rest():
    # One position, five tokens, k = 2 at temperature 2, by hand: the buckets are tokens 0 and 4 (the teacher's two
    # most likely) and {1, 2, 3}.
    teacher_logits, student_logits, temperature = [3.0, 1.0, 0.0, -1.0, 2.0], [0.5, -0.5, 1.0, 0.0, 2.0], 2.0

    def buckets(logits):
        e = [math.exp(x / temperature) for x in logits]
        return [e[0] / sum(e), e[4] / sum(e), (e[1] + e[2] + e[3]) / sum(e)]

    by_hand = temperature**2 * sum(q * math.log(q / s) for q, s in zip(buckets(teacher_logits), buckets(student_logits)))
    teacher = top_k(torch.tensor([[teacher_logits]], dtype=torch.float64), 2, temperature)
    assert teacher.indices.flatten().tolist() == [0, 4]
    assert teacher.log_rest.exp().item() == pytest.approx(buckets(teacher_logits)[2], rel=1e-12)
    kl, _ = kd_losses(torch.tensor([[student_logits]], dtype=torch.float64), teacher, torch.zeros(1, 1, dtype=torch.long), temperature)
    assert kl.item() == pytest.approx(by_hand, rel=1e-12)

    # Many positions, through the head in chunks: the same bucket KL written out plainly, and its autograd gradient.
    torch.manual_seed(1)
    k, vocab, temperature = 3, 9, 1.5
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(8, vocab).double()
    teacher_logits = torch.randn(2, 5, vocab, dtype=torch.float64) * 2
    ids = torch.randint(vocab, (2, 5))
    q, s = (torch.softmax(x / temperature, dim=-1) for x in (teacher_logits, head(hidden)))
    top = q.topk(k, dim=-1).indices
    q_buckets = torch.cat((q.gather(-1, top), 1 - q.gather(-1, top).sum(-1, keepdim=True)), dim=-1)
    s_buckets = torch.cat((s.gather(-1, top), s.scatter(-1, top, 0).sum(-1, keepdim=True)), dim=-1)
    reference = (q_buckets * (q_buckets / s_buckets).log()).sum(-1).mean() * temperature**2
    reference.backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    for p in (hidden, *head.parameters()):
        p.grad = None
    got, _ = kd_losses(hidden, top_k(teacher_logits, k, temperature), ids, temperature, KDHead(head.weight, head.bias, 4, ce_grad=False))
    got.backward()
    assert got.item() == pytest.approx(reference.item(), rel=1e-12)
    for mine, want in zip([hidden.grad, head.weight.grad, head.bias.grad], expected):
        assert torch.allclose(mine, want, atol=1e-12), (mine - want).abs().max()


def count_teacher_windows(monkeypatch) -> list[int]:
    """The number of windows of every teacher pass of lora_kd (those it runs under teacher_mode) from now on."""
    passes, original = [], lora_kd.teacher_mode

    @contextmanager
    def counting(model):
        with original(model):
            handle = model.register_forward_pre_hook(lambda module, args, kwargs: passes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()

    monkeypatch.setattr(lora_kd, "teacher_mode", counting)
    return passes


class Interrupt(Exception):
    pass


@needs_triton
@pytest.mark.parametrize("vocab, k", [(37, 1), (37, 37), (4097, 5), (9000, 300)])
@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1.0), (torch.bfloat16, 2.0)])
def test_the_fused_teacher_top_k_equals_the_pytorch_form(monkeypatch, vocab, k, dtype, temperature):
    """On the kernel path (CPU tensors through Triton's interpreter) `top_k` picks the same ids with the same
    log-probabilities and rest as the PyTorch form, through a head and from logits, k of one token to the whole
    vocabulary (no rest: -inf), across block edges."""
    torch.manual_seed(vocab + k)
    hidden = torch.randn(2, 7, 16)
    head = KDHead(torch.randn(vocab, 16).to(dtype) * 0.7, None, 5)
    for teacher, through in ((hidden.to(dtype), head), ((hidden @ head.weight.float().t() * 2).to(dtype), None)):
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
        expected = top_k(teacher, k, temperature, through)
        calls = kernel_calls(monkeypatch, teacher_logits, "top_k_rows", lambda args, out: tuple(args[0].shape))
        got = top_k(teacher, k, temperature, through)
        assert calls == ([(5, vocab)] * 2 + [(4, vocab)] if through else [(14, vocab)])
        assert torch.equal(got.indices, expected.indices)
        assert torch.allclose(got.log_probs, expected.log_probs, rtol=1e-5, atol=1e-5)
        if k == vocab:
            assert torch.isneginf(got.log_rest).all() and torch.isneginf(expected.log_rest).all()
        else:
            assert torch.allclose(got.log_rest, expected.log_rest, rtol=1e-5, atol=1e-5)


@needs_triton
def test_the_fused_teacher_top_k_keeps_a_small_rest_exact(monkeypatch):
    """A teacher with almost all its mass on its top 3 (the rest 4e-10 of it, the row's largest logit past the first
    block): the kernel's rest equals the PyTorch form's, where float32 sums less the top's would lose it."""
    vocab = 9000
    logits = torch.zeros(2, vocab)
    logits[:, :2] = 20.0 + math.log(vocab)
    logits[:, 8000] = 21.0 + math.log(vocab)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    expected = top_k(logits[None], 3, 1.0)
    kernel_calls(monkeypatch, teacher_logits, "top_k_rows", lambda args, out: None)
    got = top_k(logits[None], 3, 1.0)
    assert -23 < expected.log_rest.max() < -20
    assert torch.allclose(got.log_rest, expected.log_rest, rtol=1e-5) and torch.allclose(got.log_probs, expected.log_probs, atol=1e-6)


def test_the_stage_runs_the_teacher_once_per_window_and_a_resumed_stage_reads_the_cache(tmp_path, monkeypatch):
    data = tiny_data(seq_len=16, train_chars=96)  # 6 windows: 3 steps of 2 an epoch, 8 steps in all
    windows, k = len(data.train), 8
    config = LoraKDConfig(tokens=16 * 2 * 8, batch_size=2, lr=1e-2, ce_weight=0.5, teacher_top_k=k, checkpoint_every=2, log_every=1)

    def run(folder):
        torch.manual_seed(0)
        session = Session(checkpoints=folder, progress=False, log=lambda message: None)
        return lora_kd.run(linearize.convert(tiny_model(), "hedgehog"), data, config, session), session

    passes = count_teacher_windows(monkeypatch)
    unbroken, session = run(tmp_path / "a")
    assert windows == 6 and sum(passes) == windows
    assert [r["cached"] for r in session.records] == [0.0] * 3 + [1.0] * 5  # epochs 2 and 3 never run the teacher
    shards = list((tmp_path / "a" / "stage0-lora_kd" / "teacher_logits").glob("*.safetensors"))
    assert [p.name for p in shards] == ["000-00000.safetensors"]
    with safe_open(str(shards[0]), "pt") as shard:
        dtypes = {name: shard.get_slice(name).get_dtype() for name in shard.keys()}
    assert dtypes == {"keys": "I64", "log_probs": "F16", "indices": "U16", "log_rest": "F32"}
    payload = windows * (8 + 16 * k * 2 + 16 * k * 2 + 16 * 4)
    header = struct.unpack("<Q", shards[0].read_bytes()[:8])[0]
    assert shards[0].stat().st_size == 8 + header + payload
    assert session.reports[-1]["teacher_logits"] == {"top_k": k, "windows": windows, "bytes": shards[0].stat().st_size}

    original_record = Session.record

    def record(self, entry):
        original_record(self, entry)
        if entry.get("step") == 5:  # in the second epoch, after the checkpoint at step 4
            raise Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(Session, "record", record)
        with pytest.raises(Interrupt):
            run(tmp_path / "b")
    assert (tmp_path / "b" / "stage0-lora_kd" / "teacher_logits" / "000-00000.safetensors").is_file()  # written on the way out
    passes.clear()
    resumed, session = run(tmp_path / "b")
    assert passes == [] and [r["cached"] for r in session.records if r["step"] > 4] == [1.0] * 4  # all from the cache
    expected = dict(unbroken.named_parameters())
    assert all(torch.equal(p, expected[name]) for name, p in resumed.named_parameters())


def test_a_batch_of_cached_and_new_windows_comes_back_in_its_order_in_the_kept_form(tmp_path, monkeypatch):
    """Windows read back and windows computed in one batch give each row what a batch of only computed windows gives
    (float16 log-probabilities, exact ids), in the batch's order; only the new windows are computed; keys handed in
    are used as given (the windows are not keyed again); and with shards of a few windows, each shard is written at
    the call after it fills, and every window is read back from it as it was computed."""
    monkeypatch.setattr(teacher_logits, "SHARD_BYTES", 3 * 8 * (4 * 2 + 4 * 2 + 4))  # three windows of 8 positions, K = 4
    torch.manual_seed(0)
    windows = torch.randint(VOCAB, (7, 8))
    logits = {tuple(w.tolist()): torch.randn(8, VOCAB) for w in windows}
    computed = []

    def compute(batch):
        computed.append([tuple(w.tolist()) for w in batch])
        return top_k(torch.stack([logits[tuple(w.tolist())] for w in batch]), 4, 1.0)

    cache = TeacherLogitCache(tmp_path, top_k=4, temperature=1.0, vocab=VOCAB)
    alone = compute(windows)
    computed.clear()
    first_keys = [teacher_logits.window_key(w) for w in windows]
    first, cached = cache.get(windows[[0, 1, 2, 3]], compute)
    assert cached == 0 and not list(tmp_path.glob("*.safetensors"))  # four windows held, none written
    order = [4, 1, 5, 3, 0]  # new, held, new, held, held
    keys = [teacher_logits.window_key(w) for w in windows[order]]
    monkeypatch.setattr(teacher_logits, "window_key", lambda window: pytest.fail("keyed again"))
    mixed, cached = cache.get(windows[order], compute, keys)
    assert cached == 3 and computed[-1] == [tuple(windows[i].tolist()) for i in (4, 5)]
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["000-00000.safetensors"]  # the first call's
    third = [5, 6, 2]  # held from the last call, new, written
    last, cached = cache.get(windows[third], compute, [first_keys[i] for i in third])
    assert cached == 2 and computed[-1] == [tuple(windows[6].tolist())]
    for got, rows in ((first, [0, 1, 2, 3]), (mixed, order), (last, third)):
        assert got.log_probs.dtype == torch.float16
        assert torch.equal(got.log_probs, alone.log_probs[rows].half())
        assert torch.equal(got.indices.long(), alone.indices[rows]) and torch.equal(got.log_rest, alone.log_rest[rows])
    cache.flush()
    again = TeacherLogitCache(tmp_path, top_k=4, temperature=1.0, vocab=VOCAB)
    read, cached = again.get(windows, lambda batch: pytest.fail("computed again"), first_keys)
    assert cached == 7 and len(again) == 7
    assert torch.equal(read.log_probs, alone.log_probs.half()) and torch.equal(read.indices.long(), alone.indices)
    with pytest.raises(ValueError, match="2 keys for 7 windows"):
        again.get(windows, compute, keys[:2])


def test_keyed_windows_key_each_batch_as_it_is_taken():
    data = tiny_data(seq_len=16, train_chars=400)
    keyed = KeyedWindows(data.train)
    assert len(keyed) == len(data.train) and keyed.streaming == data.train.streaming and keyed.keys is None
    batch, weights = keyed.take_weighted(2, 3)
    assert torch.equal(batch, data.train.take(2, 3)) and weights is None
    assert keyed.keys == [teacher_logits.window_key(w) for w in batch]
    assert torch.equal(keyed.take(0, 2), data.train.take(0, 2)) and len(keyed.keys) == 2


def test_bad_settings_are_refused_in_one_line(tmp_path, monkeypatch):
    assert load_recipe("quickstart", ["stages.1.teacher_top_k=64"]).stages[1].teacher_top_k == 64
    errors = []
    for bad in (lambda: LoraKDConfig(teacher_top_k=-1), lambda: load_recipe("quickstart", ["stages.1.teacher_top_k=lots"])):
        with pytest.raises(LinearizeError, match="teacher_top_k") as error:
            bad()
        errors.append(error.value)

    data, session = tiny_data(seq_len=16, train_chars=96), Session(progress=False, log=lambda message: None)
    with pytest.raises(LinearizeError, match=f"use at most {VOCAB}") as error:
        lora_kd.run(linearize.convert(tiny_model(), "hedgehog"), data, LoraKDConfig(tokens=32, batch_size=2, teacher_top_k=VOCAB + 1), session)
    errors.append(error.value)
    with monkeypatch.context() as patch:
        patch.setattr(lora_kd, "is_fsdp", lambda accelerator: True)
        with pytest.raises(LinearizeError, match="not supported under FSDP") as error:
            lora_kd.run(linearize.convert(tiny_model(), "hedgehog"), data, LoraKDConfig(tokens=32, batch_size=2, teacher_top_k=8), session)
    errors.append(error.value)

    cache = TeacherLogitCache(tmp_path, top_k=4, temperature=1.0, vocab=VOCAB)
    cache.get(torch.arange(16).view(2, 8), lambda windows: top_k(torch.randn(*windows.shape, VOCAB), 4, 1.0))
    cache.flush()
    with pytest.raises(LinearizeError, match="top_k 4 there, 8 here.*delete") as error:
        TeacherLogitCache(tmp_path, top_k=8, temperature=1.0, vocab=VOCAB)
    errors.append(error.value)
    assert all("\n" not in str(e) for e in errors), errors
