"""The chunked KD losses equal the logit form, values and gradients, and the lora_kd stage trains the same with either."""

import pytest
import torch
from torch import nn

import linearize
from linearize.distillation import LoraKDConfig, kd, triton_kl
from linearize.distillation.kd import KDHead, TeacherTopK, chunkable_head, hidden_states_out, kd_losses
from linearize.distillation.stages import lora_kd
from linearize.hf.errors import LinearizeError
from tests.test_triton_step import kernel_calls
from tests.test_triton_window import needs_triton
from tests.tiny import tiny_data, tiny_model


def both_forms(dtype, temperature, chunk, bias, vocab=37, weighted=False, shape=(3, 11, 16)):
    """The logit form's and the chunked form's (KL, CE, gradients of the hidden states, the head's weight and bias) of
    0.7 KL + 0.3 CE, on random hidden states through one head."""
    torch.manual_seed(0)
    batch, length, width = shape
    hidden = torch.randn(batch, length, width, dtype=dtype, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, width, dtype=dtype)
    head = nn.Linear(width, vocab, bias=bias).to(dtype)
    ids = torch.randint(vocab, (batch, length))
    weights = torch.rand(batch, length, dtype=dtype) if weighted else None
    forms = []
    for chunked in (False, True):
        for p in (hidden, *head.parameters()):
            p.grad = None
        if chunked:
            kl, ce = kd_losses(hidden, teacher_hidden, ids, temperature, KDHead(head.weight, head.bias, chunk), weights=weights)
        else:  # the teacher pass has no gradient
            kl, ce = kd_losses(head(hidden), head(teacher_hidden).detach(), ids, temperature, weights=weights)
        (0.7 * kl + 0.3 * ce).backward()
        forms.append([kl.item(), ce.item(), hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else []))
    return forms


def assert_same_forms(forms, rel: float, rtol: float, atol: float) -> None:
    (kl, ce, *expected), (got_kl, got_ce, *got) = forms
    assert got_kl == pytest.approx(kl, rel=rel) and got_ce == pytest.approx(ce, rel=rel)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=rtol, atol=atol), (a - b).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature, chunk, bias", [(1.0, 7, False), (2.0, 64, True), (0.5, 1, True)])
def test_chunked_losses_equal_the_logit_form_with_gradients(dtype, temperature, chunk, bias):
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert_same_forms(both_forms(dtype, temperature, chunk, bias), tolerance, tolerance * 10, tolerance)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_losses_under_bf16_autocast_equal_the_logit_form(temperature):
    """Under mixed precision (as lora_kd runs them) the chunked head gives bf16 logits, as the model's own head does,
    and both forms widen them to float32 for the losses."""
    torch.manual_seed(0)
    batch, length, width, vocab = 2, 9, 16, 41
    hidden = torch.randn(batch, length, width, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, width)
    head = nn.Linear(width, vocab, bias=False)
    ids = torch.randint(vocab, (batch, length))
    results = []
    for chunked in (False, True):
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                kl, ce = kd_losses(hidden, teacher_hidden, ids, temperature, KDHead(head.weight, None, 5, ce_grad=False))
            else:
                kl, ce = kd_losses(head(hidden), head(teacher_hidden).detach(), ids, temperature)
        assert kl.dtype == ce.dtype == torch.float32
        kl.backward()
        results.append((kl.item(), ce.item(), hidden.grad.clone()))
    (kl_a, ce_a, grad_a), (kl_b, ce_b, grad_b) = results
    assert kl_b == pytest.approx(kl_a, rel=1e-4) and ce_b == pytest.approx(ce_a, rel=1e-4)
    assert torch.allclose(grad_b, grad_a, rtol=2e-2, atol=2e-2 * grad_a.abs().max().item())


@pytest.mark.parametrize("sparse", [False, True])
def test_weighted_losses_are_weighted_means_in_every_form(sparse):
    """Per-position weights (retrieval answers counting more): the logit form is the weighted mean of the per-token
    losses, and the chunked form (dense teacher, or sparse with k the whole vocabulary) equals it, gradients too;
    weights of one are the unweighted losses."""
    from linearize.distillation.kd import TeacherTopK

    torch.manual_seed(2)
    batch, length, width, vocab = 2, 13, 8, 23
    hidden = torch.randn(batch, length, width, dtype=torch.float64, requires_grad=True)
    teacher_hidden, head = torch.randn(batch, length, width, dtype=torch.float64), nn.Linear(width, vocab).double()
    ids = torch.randint(vocab, (batch, length))
    weights = torch.ones(batch, length, dtype=torch.float64)
    weights[0, 8:12] = 40.0
    student, teacher = head(hidden), head(teacher_hidden).detach()
    kl, ce = kd_losses(student, teacher, ids, 2.0, weights=weights)
    log_s, log_t = torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1)
    per_kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    per_ce = torch.nn.functional.cross_entropy(student[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    assert kl.item() == pytest.approx(((per_kl * weights).sum() / weights.sum() * 4).item(), rel=1e-12)
    assert ce.item() == pytest.approx(((per_ce * weights[:, :-1].flatten()).sum() / weights[:, :-1].sum()).item(), rel=1e-12)
    assert kl.item() != pytest.approx(kd_losses(student, teacher, ids, 2.0)[0].item(), rel=1e-3)
    plain = kd_losses(student, teacher, ids, 2.0)
    ones = kd_losses(student, teacher, ids, 2.0, weights=torch.ones_like(weights))
    assert [a.item() for a in ones] == pytest.approx([a.item() for a in plain], rel=1e-12)
    (kl + ce).backward()
    expected, hidden.grad = hidden.grad.clone(), None
    if sparse:  # the teacher as a TeacherTopK of every token: the same distribution, through the sparse KL
        log_t = torch.log_softmax(head(teacher_hidden).detach() / 2, -1)
        teacher_in = TeacherTopK(log_t, torch.arange(vocab).expand(batch, length, vocab), torch.full((batch, length), -torch.inf, dtype=torch.float64))
        got = kd_losses(hidden, teacher_in, ids, 2.0, KDHead(head.weight.detach(), head.bias.detach(), 5), weights=weights)
    else:
        got = kd_losses(hidden, teacher_hidden, ids, 2.0, KDHead(head.weight.detach(), head.bias.detach(), 5), weights=weights)
    assert [g.item() for g in got] == pytest.approx([kl.item(), ce.item()], rel=1e-10)
    sum(got).backward()
    assert torch.allclose(hidden.grad, expected, atol=1e-12)


def test_without_the_cross_entropy_gradient_only_the_kl_trains():
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    teacher_hidden, head, ids = torch.randn(2, 9, 8, dtype=torch.float64), nn.Linear(8, 13).double(), torch.randint(13, (2, 9))
    kl, ce = kd_losses(head(hidden), head(teacher_hidden), ids, 1.0)
    kl.backward()
    expected, hidden.grad = hidden.grad.clone(), None
    got_kl, got_ce = kd_losses(hidden, teacher_hidden, ids, 1.0, KDHead(head.weight.detach(), head.bias.detach(), 4, ce_grad=False))
    got_kl.backward()
    assert torch.allclose(hidden.grad, expected, atol=1e-12) and not got_ce.requires_grad
    assert got_ce.item() == pytest.approx(ce.item(), rel=1e-12)


def test_the_hidden_states_and_the_head_give_the_models_logits():
    model = tiny_model()
    ids = torch.randint(model.config.vocab_size, (2, 12))
    head = chunkable_head(model, ids)
    assert head is model.get_output_embeddings()
    with hidden_states_out(model):
        hidden = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(head(hidden), model(input_ids=ids, use_cache=False).logits, atol=1e-5)
    assert model.get_output_embeddings() is head


def test_a_family_with_soft_capped_logits_keeps_the_logit_form():
    model = tiny_model()
    forward = model.forward

    def capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = torch.tanh(out.logits / 3) * 3
        return out

    model.forward = capped
    assert chunkable_head(model, torch.randint(model.config.vocab_size, (1, 8))) is None


def test_lora_kd_trains_the_same_with_chunked_and_full_logits():
    data = tiny_data(seq_len=16)
    trained = []
    for chunk in (0, 5):
        torch.manual_seed(0)
        model = linearize.convert(tiny_model(), "hedgehog")
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = LoraKDConfig(tokens=16 * 2 * 3, batch_size=2, lr=1e-2, kl_chunk=chunk, ce_weight=0.5)
        trained.append({n: p.detach().clone() for n, p in lora_kd.run(model, data, config).named_parameters()})
    full, chunked = trained
    assert full.keys() == chunked.keys() and any(not torch.equal(full[n], start[n]) for n in full)
    assert all(torch.allclose(full[n], chunked[n], atol=1e-9) for n in full)


@pytest.mark.parametrize("teacher_top_k", [0, 8], ids=["full", "cached"])
def test_lora_kd_weighs_retrieval_answers_as_the_data_asks(monkeypatch, teacher_top_k):
    """A stage on data whose retrieval answers weigh 20x hands each batch's weights to the KD losses, and they
    change what is learnt against the same data unweighted; with cached teacher logits too, whose windows are keyed
    as the loop takes them."""
    from linearize.config import DataConfig
    from linearize.distillation.data import load_data
    from tests.tiny import tiny_tokenizer

    seen = []
    original = lora_kd.kd_losses

    def spy(*args):
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(lora_kd, "kd_losses", spy)
    trained = []
    for weight in (1, 20):
        data = load_data(DataConfig(seq_len=256, heldout_tokens=512, retrieval=0.9, retrieval_kinds=["passkey"], retrieval_weight=weight),
                         tiny_tokenizer(), seed=0)
        torch.manual_seed(0)
        model = linearize.convert(tiny_model(), "hedgehog")
        config = LoraKDConfig(tokens=256 * 2 * 2, batch_size=2, lr=1e-2, kl_chunk=64, teacher_top_k=teacher_top_k)
        trained.append({n: p.detach().clone() for n, p in lora_kd.run(model, data, config).named_parameters()})
    assert seen[:2] == [None, None]
    assert [tuple(w.shape) for w in seen[2:]] == [(2, 256), (2, 256)] and all(w.max() == 20 and (w == 20).sum() >= 4 for w in seen[2:])
    assert any(not torch.allclose(trained[0][n], trained[1][n]) for n in trained[0])


def test_a_negative_chunk_is_refused():
    with pytest.raises(LinearizeError, match="kl_chunk"):
        LoraKDConfig(kl_chunk=-1)


@pytest.fixture
def nan_empty(monkeypatch):
    """`torch.empty` and `torch.empty_like` give floating tensors filled with NaN, so that an output entry a kernel
    leaves unwritten shows (uninitialised memory could hold an earlier call's right answer)."""
    empty, empty_like = torch.empty, torch.empty_like

    def filled(make):
        return lambda *args, **kwargs: (lambda t: t.fill_(float("nan")) if t.is_floating_point() else t)(make(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", filled(empty))
    monkeypatch.setattr(torch, "empty_like", filled(empty_like))


@pytest.fixture
def fused_kl(monkeypatch):
    """The fused KL switched on (CPU tensors through Triton's interpreter); returns the list of the logits' shapes it took."""
    return kernel_calls(monkeypatch, kd, "fused_kl", lambda args, out: tuple(args[0].shape))


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("vocab", [37, 4097, 9000])
@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1.0), (torch.bfloat16, 2.0), (torch.float16, 0.5)])
@pytest.mark.parametrize("ce_grad", [True, False])
def test_the_fused_kl_equals_the_pytorch_rows(fused_kl, nan_empty, vocab, dtype, temperature, ce_grad):
    """Each row's losses and scaled gradients, against the PyTorch form, across block edges and with rows that have
    no target (-1)."""
    generator = torch.Generator().manual_seed(vocab)
    rows = 6
    student, teacher = ((torch.randn(rows, vocab, generator=generator) * 4).to(dtype) for _ in range(2))
    targets = torch.tensor([0, vocab - 1, -1, 5 % vocab, 4096 % vocab, -1])
    kl_scale = torch.rand(rows, generator=generator)
    ce_scale = torch.rand(rows, generator=generator) if ce_grad else None
    assert triton_kl.fused_kl_problem(student, teacher) is None
    assert_kernel_rows(triton_kl.kl_rows, student, teacher, targets, temperature, kl_scale, ce_scale, 1e-5)


def assert_kernel_rows(kernel, student, teacher, targets, temperature, kl_scale, ce_scale, rtol: float) -> None:
    """A KL kernel's rows (losses and float32 gradients, the CE's where `ce_scale` is given) equal the PyTorch form's."""
    got = kernel(student, teacher, targets, temperature, kl_scale, ce_scale, torch.float32)
    expected = kd._chunk_losses(student, teacher, targets, temperature, kl_scale, ce_scale, torch.float32)
    assert (got[3] is None) == (expected[3] is None) == (ce_scale is None)
    for a, b in zip(got, expected):
        if b is not None:
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            assert torch.allclose(a, b, rtol=rtol, atol=3e-5 if b.dim() == 1 else 1e-7), (a - b).abs().max()


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("temperature, bias, weighted", [(1.0, False, False), (2.0, True, True)])
def test_chunked_losses_through_the_fused_kl_equal_the_logit_form(fused_kl, temperature, bias, weighted):
    """The chunked losses take the kernel for dense teachers (every chunk, the last one short) and give the logit
    form's values and gradients: the student's hidden states, the head's weight and bias."""
    forms = both_forms(torch.float32, temperature, 8, bias, vocab=4100, weighted=weighted)
    assert fused_kl == [(8, 4100)] * 4 + [(1, 4100)]
    assert_same_forms(forms, 1e-5, 1e-4, 1e-6)


@pytest.fixture
def fused_sparse_kl(monkeypatch):
    """The fused top-k KL switched on (CPU tensors through Triton's interpreter); returns the (rows, vocabulary, k) of
    each call."""
    return kernel_calls(monkeypatch, kd, "fused_sparse_kl", lambda args, out: (*args[0].shape, args[1].log_probs.shape[1]))


def sparse_teacher(rows: int, vocab: int, k: int, generator, stored: torch.dtype) -> TeacherTopK:
    """A teacher's top-k rows as `teacher_logits.top_k` makes them from random logits, log-probabilities kept in
    `stored` and ids in each type they come in (int64 computed, int32 or uint16 read back from the cache); with k =
    vocabulary the rest is empty (-inf)."""
    log_p = (torch.randn(rows, vocab, generator=generator) * 3).log_softmax(-1)
    values, indices = log_p.topk(k, dim=-1)
    rest = log_p.scatter(1, indices, -torch.inf).logsumexp(-1)
    return TeacherTopK(values.to(stored), indices.to({1: torch.int64, vocab: torch.int32}.get(k, torch.uint16)), rest)


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("vocab, k", [(37, 1), (37, 37), (4097, 5), (9000, 300)])
@pytest.mark.parametrize("dtype, temperature, stored", [(torch.float32, 1.0, torch.float32), (torch.bfloat16, 2.0, torch.float16), (torch.float16, 0.5, torch.float16)])
@pytest.mark.parametrize("ce_grad", [True, False])
def test_the_fused_top_k_kl_equals_the_pytorch_rows(fused_sparse_kl, nan_empty, vocab, k, dtype, temperature, stored, ce_grad):
    """Each row's losses and scaled gradients against the PyTorch form (`kd._sparse_kl`), for a sparse teacher of one
    entry, of every token (no rest), of a few and of more than a block's worth, across block edges, with rows that
    have no target."""
    generator = torch.Generator().manual_seed(vocab + k)
    rows = 6
    student = (torch.randn(rows, vocab, generator=generator) * 4).to(dtype)
    top = sparse_teacher(rows, vocab, k, generator, stored)
    targets = torch.tensor([0, vocab - 1, -1, 5 % vocab, 4096 % vocab, -1])
    kl_scale = torch.rand(rows, generator=generator)
    ce_scale = torch.rand(rows, generator=generator) if ce_grad else None
    assert triton_kl.sparse_kl_problem(student, top) is None
    assert_kernel_rows(triton_kl.sparse_kl_rows, student, top, targets, temperature, kl_scale, ce_scale, 1e-4)


@needs_triton
def test_the_fused_top_k_kl_keeps_a_small_student_rest_exact(fused_sparse_kl):
    """A student whose mass lies almost all on the teacher's k (its rest e^-20 of it, with the vocabulary's largest
    logit in a later block than the teacher's ids): the whole less the top in float32 would lose the rest entirely; the
    kernel's rest, and so the KL and the gradient that pulls the student towards the teacher's 1% rest, equal the
    PyTorch form's, which sums the rest itself; every gradient row sums to 0."""
    vocab, k = 9000, 4
    student = torch.zeros(2, vocab)
    student[:, : k - 1] = 20.0 + torch.log(torch.tensor(float(vocab)))
    student[:, 8000] = 21.0 + torch.log(torch.tensor(float(vocab)))
    ids = torch.tensor([[0, 1, 2, 8000], [8000, 2, 1, 0]])
    top = TeacherTopK(torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.09]] * 2)), ids, torch.log(torch.tensor([0.01, 0.01])))
    scale, targets = torch.ones(2), torch.zeros(2, dtype=torch.long)
    got = triton_kl.sparse_kl_rows(student, top, targets, 1.0, scale, None, torch.float32)
    expected = kd._chunk_losses(student, top, targets, 1.0, scale, None, torch.float32)
    assert torch.allclose(got[0], expected[0], rtol=1e-5) and expected[0].min() > 0.15  # the rest's share: 0.01 x ~20 nats
    assert torch.allclose(got[2], expected[2], rtol=1e-4, atol=1e-9)
    assert got[2].sum(-1).abs().max() < 1e-6
    rest = got[2].sum(-1) - got[2].gather(1, ids).sum(-1)
    assert torch.allclose(rest, torch.full((2,), -0.01), rtol=1e-4)  # the rest pulled up towards the teacher's 1%


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("temperature, bias, weighted", [(1.0, False, False), (2.0, True, True)])
def test_chunked_losses_through_the_fused_top_k_kl_equal_the_pytorch_form(fused_sparse_kl, monkeypatch, temperature, bias, weighted):
    """The chunked losses from hidden states take the top-k kernel for a sparse teacher (every chunk, the last one
    short) and give the PyTorch path's values and gradients: the student's hidden states, the head's weight and bias."""
    torch.manual_seed(0)
    vocab, width = 4100, 16
    hidden = torch.randn(3, 11, width, requires_grad=True)
    head = nn.Linear(width, vocab, bias=bias)
    ids = torch.randint(vocab, (3, 11))
    weights = torch.rand(3, 11) if weighted else None
    top = TeacherTopK(*(t.view(3, 11, *t.shape[1:]) for t in vars(sparse_teacher(33, vocab, 64, torch.Generator().manual_seed(1), torch.float16)).values()))
    forms = []
    for switch in ("on", "off"):
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", switch)
        for p in (hidden, *head.parameters()):
            p.grad = None
        kl, ce = kd_losses(hidden, top, ids, temperature, KDHead(head.weight, head.bias, 8), weights=weights)
        (0.7 * kl + 0.3 * ce).backward()
        forms.append([kl.item(), ce.item(), hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else []))
    assert fused_sparse_kl == [(8, vocab, 64)] * 4 + [(1, vocab, 64)]
    assert_same_forms(forms[::-1], 1e-5, 1e-4, 1e-6)


@needs_triton
def test_the_fused_kl_is_left_to_pytorch_where_it_cannot_run(fused_kl, monkeypatch):
    """float64 logits take the PyTorch form and a sparse teacher never the dense kernel; the switches turn both
    kernels off, with a reason, and the top-k kernel names the shapes and sizes it does not take."""
    logits = torch.randn(4, 9, dtype=torch.float64)
    assert "float64" in triton_kl.fused_kl_problem(logits, logits)
    assert "shape" in triton_kl.fused_kl_problem(logits[:, :8].float(), logits.float())
    hidden = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(4, 9).double()
    kd_losses(hidden, torch.randn(1, 5, 4, dtype=torch.float64), torch.randint(9, (1, 5)), 1.0, KDHead(head.weight, head.bias))
    top = TeacherTopK(torch.randn(1, 5, 3).log_softmax(-1), torch.randint(9, (1, 5, 3)), torch.full((1, 5), -3.0))
    kd_losses(hidden.float(), top, torch.randint(9, (1, 5)), 1.0, KDHead(head.weight.float(), head.bias.float()))
    assert fused_kl == []
    assert "float64" in triton_kl.sparse_kl_problem(logits, top.rows())
    assert "(rows, k) teacher rows" in triton_kl.sparse_kl_problem(logits.float(), top.rows())
    wide = TeacherTopK(torch.zeros(2, 4097), torch.zeros(2, 4097, dtype=torch.long), torch.zeros(2))
    assert "up to 4096" in triton_kl.sparse_kl_problem(torch.zeros(2, 5000), wide)
    for value, reason in (("off", "turned off"), ("auto", "CUDA")):
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", value)
        assert reason in triton_kl.fused_kl_problem(logits.float(), logits.float())
        assert reason in triton_kl.sparse_kl_problem(logits.float()[:5], top.rows())
