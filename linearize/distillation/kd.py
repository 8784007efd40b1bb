"""The knowledge-distillation losses: KL(teacher || student) of the next-token distributions and the next-token
cross-entropy, from logits or, chunked over the tokens, from the hidden states before the output head.

The chunked form never holds batch x sequence x vocabulary: it computes each chunk's logits of both models, the
chunk's losses and the chunk's gradient with respect to the student's hidden states (and the head's weights when
they train) in the forward pass, and keeps only those gradients, of the hidden states' size, for the backward
pass. It equals the logit form (tests/test_kd.py checks values and gradients).

The teacher may also come sparse (`TeacherTopK`, what linearize.distillation.teacher_logits caches): its k most
likely tokens and one bucket for all the others. The KL is then over those k + 1 outcomes, the student's bucket
being its probability of every token outside the teacher's k, so it is exact for the teacher's distribution as
kept, and equals the full KL when k is the vocabulary (tests/test_teacher_logits.py). It goes through the same
chunked pass, from hidden states with a head, else from the student's logits `LOGIT_CHUNK` tokens at a time.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .triton_kl import fused_kl_problem, sparse_kl_problem
from .triton_kl import kl_rows as fused_kl
from .triton_kl import sparse_kl_rows as fused_sparse_kl


@dataclass
class KDHead:
    """The output head the chunked losses apply: `weight` (vocabulary x hidden) and `bias`, `chunk` tokens at a time;
    `ce_grad` false treats the cross-entropy as a metric only (no gradient, one matrix product less per chunk)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    chunk: int = 1024
    ce_grad: bool = True


LOGIT_CHUNK = 1024  # tokens at a time of the sparse KL from logits (without a head)


@dataclass
class TeacherTopK:
    """The teacher's next-token distributions at the losses' temperature, sparse: the log-probabilities of each
    position's k most likely tokens (`log_probs`, their ids `indices`: (..., k)) and the log of the probability of
    all the other tokens together (`log_rest`: (...)). Any floating and integer dtypes; the losses renormalise the
    k + 1 outcomes, so rounding in storage leaves a distribution."""

    log_probs: torch.Tensor
    indices: torch.Tensor
    log_rest: torch.Tensor

    def rows(self) -> TeacherTopK:
        """The same, one row per position: (positions, k) and (positions,)."""
        k = self.log_probs.shape[-1]
        return TeacherTopK(self.log_probs.reshape(-1, k), self.indices.reshape(-1, k), self.log_rest.reshape(-1))

    def __getitem__(self, key) -> TeacherTopK:
        return TeacherTopK(self.log_probs[key], self.indices[key], self.log_rest[key])


def kd_losses(
    student: torch.Tensor, teacher: torch.Tensor | TeacherTopK, ids: torch.Tensor, temperature: float, head: KDHead | None = None,
    weights: torch.Tensor | None = None,
):
    """(KL(teacher || student) per token at `temperature`, times temperature squared; next-token cross-entropy).

    `student` and `teacher` are logits (batch, sequence, vocabulary), or, with `head`, the hidden states the head
    turns into logits (batch, sequence, hidden); `teacher` may instead be a `TeacherTopK` of the teacher's
    distributions, for the sparse KL. `weights` (batch, sequence), if given, weighs each position's losses: both
    are then weighted means (the cross-entropy's over the positions that have a next token).
    """
    if head is not None:
        return _ChunkedKD.apply(student, teacher, head.weight, head.bias, ids, temperature, head.chunk, head.ce_grad, weights)
    if isinstance(teacher, TeacherTopK):
        return _ChunkedKD.apply(student, teacher, None, None, ids, temperature, LOGIT_CHUNK, True, weights)
    logits = student.to(_accumulate(student.dtype))
    log_student = F.log_softmax(logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.to(logits.dtype) / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    if weights is None:
        return kl.mean() * temperature**2, ce.mean()
    w = weights.to(kl.dtype)
    return (kl * w).sum() / w.sum() * temperature**2, (ce * w[:, :-1].flatten()).sum() / w[:, :-1].sum()


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    """Losses are computed in float32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _targets(ids: torch.Tensor) -> torch.Tensor:
    """Each position's next token, -1 at the last position of every row (no target)."""
    return torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -1)), dim=1).flatten()


def _logits(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Hidden states through the head; without a head `x` already holds logits."""
    return x if weight is None else F.linear(x, weight, bias)


def _log_softmax(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """log_softmax(logits / temperature) in `dtype`: bf16/fp16 logits are read as they are (the kernel widens them), and
    a temperature of 1 divides nothing, each a pass over a chunk of vocabulary-wide rows saved."""
    return F.log_softmax(logits if temperature == 1 else logits.to(dtype) / temperature, dim=-1, dtype=dtype)


def _dense_kl(log_teacher: torch.Tensor, log_student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(teacher || student) of each row, the teacher's probabilities)."""
    teacher_p = log_teacher.exp()
    return (teacher_p * (log_teacher - log_student)).sum(-1), teacher_p


def _sparse_kl(top: TeacherTopK, log_student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL over the teacher's top k and its rest bucket, of each row; the probabilities the gradient pulls
    the student towards): d KL / d(logits / T) = softmax(student) - target, where target is the teacher's
    probability at each of its top-k tokens and, at every other token, the rest's probability shared in
    proportion to the student's own there (the student's rest is one outcome of the KL)."""
    log_q = F.log_softmax(torch.cat((top.log_probs, top.log_rest[:, None]), dim=-1).to(log_student.dtype), dim=-1)
    q, indices = log_q.exp(), top.indices.long()
    log_s_rest = log_student.scatter(1, indices, -math.inf).logsumexp(-1)
    log_s = torch.cat((log_student.gather(1, indices), log_s_rest[:, None]), dim=-1)
    kl = torch.where(q > 0, q * (log_q - log_s), 0).sum(-1)
    # A rest of probability 0 (k the whole vocabulary) shares nothing; its -inf - -inf must not become NaN.
    share = torch.where(q[:, -1] > 0, log_q[:, -1] - log_s_rest, -math.inf)
    target = (log_student + share[:, None]).exp().scatter(1, indices, q[:, :-1])
    return kl, target


def _chunk_losses(
    logits: torch.Tensor, teacher: torch.Tensor | TeacherTopK, targets: torch.Tensor, temperature: float, kl_scale: torch.Tensor,
    ce_scale: torch.Tensor | None, grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A chunk's losses in PyTorch, as `triton_kl.kl_rows` computes them for dense teacher logits: (the KL of each row,
    the cross-entropy of each row at target 0 where there is none, kl_scale_row times d KL / d(logits / T), and with
    `ce_scale` ce_scale_row times d CE / d logits, both in `grad_dtype`). `teacher` is logits or a `TeacherTopK`."""
    acc = _accumulate(logits.dtype)
    log_student = _log_softmax(logits, temperature, acc)
    if isinstance(teacher, TeacherTopK):
        kl_rows, teacher_p = _sparse_kl(teacher, log_student)
    else:
        kl_rows, teacher_p = _dense_kl(_log_softmax(teacher, temperature, acc), log_student)
    d_kl = ((log_student.exp() - teacher_p) * kl_scale[:, None]).to(grad_dtype)
    log_p = log_student if temperature == 1 else _log_softmax(logits, 1, acc)
    next_token = targets.clamp_min(0)[:, None]
    ce_rows = -log_p.gather(1, next_token)[:, 0]
    if ce_scale is None:
        return kl_rows, ce_rows, d_kl, None
    d_ce = log_p.exp().scatter_add_(1, next_token, torch.full_like(ce_scale[:, None], -1.0))
    return kl_rows, ce_rows, d_kl, (d_ce * ce_scale[:, None]).to(grad_dtype)


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, teacher, weight, bias, ids, temperature, chunk, ce_grad, weights):
        rows, width = hidden.shape[0] * hidden.shape[1], hidden.shape[-1]
        h, targets = hidden.reshape(rows, width), _targets(ids)
        sparse = isinstance(teacher, TeacherTopK)
        teacher = teacher.rows() if sparse else teacher.reshape(rows, width)
        acc = _accumulate(h.dtype)
        # Each position's weight, and the two losses' normalisers: the weights' sums (the row counts without weights).
        w = torch.ones(rows, dtype=acc, device=h.device) if weights is None else weights.reshape(rows).to(acc)
        # Masks multiply instead of selecting rows: a boolean index waits for the GPU (nonzero), once per chunk.
        has_target = (targets >= 0).to(acc)
        kl_norm, ce_norm = w.sum(), (w * has_target).sum().clamp_min(torch.finfo(acc).tiny)
        train_head = weight is not None and weight.requires_grad
        grads = {"kl": torch.zeros_like(h), "ce": torch.zeros_like(h) if ce_grad else None}
        head_grads = {name: torch.zeros_like(weight) if train_head and g is not None else None for name, g in grads.items()}
        bias_grads = {name: torch.zeros_like(bias) if bias is not None and bias.requires_grad and g is not None else None for name, g in grads.items()}
        if weight is not None and torch.is_autocast_enabled(h.device.type):
            # Autocast casts a frozen weight anew at every product (its cache keeps only leaves that train): the head,
            # vocabulary-wide, goes to autocast's dtype once here, not three times a chunk.
            low = torch.get_autocast_dtype(h.device.type)
            weight, bias = weight.to(low), None if bias is None else bias.to(low)
        grad_dtype = h.dtype if weight is None else weight.dtype
        fused, problem = (fused_sparse_kl, sparse_kl_problem) if sparse else (fused_kl, fused_kl_problem)
        kl_sum = torch.zeros((), dtype=acc, device=h.device)
        ce_sum = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            logits = _logits(h[part], weight, bias)
            teacher_part = teacher[part] if sparse else _logits(teacher[part], weight, bias)
            w_part = w[part]
            w_ce = w_part * has_target[part]
            # d(weighted mean KL x T^2)/d logits = T w (softmax(s/T) - teacher_p) / sum(w)
            scales = (w_part * (temperature / kl_norm), w_ce / ce_norm if ce_grad else None)
            losses = fused if problem(logits, teacher_part) is None else _chunk_losses
            kl_rows, ce_rows, d_kl, d_ce = losses(logits, teacher_part, targets[part], temperature, *scales, grad_dtype)
            kl_sum += (kl_rows * w_part).sum()
            ce_sum += (ce_rows * w_ce).sum()
            for name, d in (("kl", d_kl), ("ce", d_ce)):
                if d is None:
                    continue
                grads[name][part] = d if weight is None else d @ weight
                if head_grads[name] is not None:
                    head_grads[name] += d.t() @ h[part]
                if bias_grads[name] is not None:
                    bias_grads[name] += d.sum(0)
        ctx.shape = hidden.shape
        ctx.save_for_backward(*(t for group in (grads, head_grads, bias_grads) for t in group.values() if t is not None))
        ctx.present = [[t is not None for t in group.values()] for group in (grads, head_grads, bias_grads)]
        kl, ce = kl_sum / kl_norm * temperature**2, ce_sum / ce_norm
        if not ce_grad:
            ctx.mark_non_differentiable(ce)
        return kl, ce

    @staticmethod
    def backward(ctx, grad_kl, grad_ce):
        saved = iter(ctx.saved_tensors)
        groups = [[next(saved) if present else None for present in group] for group in ctx.present]

        def combine(pair):
            kl_part, ce_part = pair
            if kl_part is None:
                return None
            total = kl_part * grad_kl
            return total + ce_part * grad_ce if ce_part is not None and grad_ce is not None else total

        grad_hidden, grad_weight, grad_bias = (combine(group) for group in groups)
        return grad_hidden.reshape(ctx.shape), None, grad_weight, grad_bias, None, None, None, None, None


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def hidden_states_out(model: nn.Module):
    """Inside: the model's forward returns, as its `logits`, the hidden states its output head would read (the
    head is replaced by an identity); the head is put back on leaving, however the block ends."""
    base = _base(model)
    head = base.get_output_embeddings()
    base.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        base.set_output_embeddings(head)


@torch.no_grad()
def chunkable_head(model: nn.Module, probe: torch.Tensor) -> nn.Linear | None:
    """The model's output head when its logits are exactly `head(hidden states)` (no soft-capping, scaling or other
    family-specific step after the head, checked on `probe` tokens), else None: then only the logit form applies."""
    head = _base(model).get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None
    logits = model(input_ids=probe, use_cache=False).logits.float()
    with hidden_states_out(model):
        hidden = model(input_ids=probe, use_cache=False).logits
    if hidden.shape[-1] != head.in_features:
        return None
    again = F.linear(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())
    return head if torch.allclose(again, logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max())) else None
