"""The dense KD losses of a chunk of rows, and their gradients with respect to the student's logits, in one Triton
kernel over the vocabulary.

`kd._ChunkedKD`'s PyTorch path takes about a dozen ATen passes over each chunk's vocabulary-wide rows in float32 (two
log-softmaxes, an exp of each, differences, products, a gather, a cast of the gradient), each reading or writing
chunk x vocabulary x 4 bytes: on an H200 at the Llama-3.2-1B shape (128K vocabulary, 16K tokens a step) they took
about 160 ms of a 608 ms LoRA KD step (BENCHMARKS.md, twenty-sixth session). The kernel reads the two models' logits
(bf16 under autocast) twice and writes the gradient once, in its dtype.

One program per row, `BLOCK` columns at a time. The first pass keeps, online, each model's running maximum and sum of
exponentials at the temperature (the log-sum-exps), the student's at temperature 1 too where the cross-entropy needs it
and the temperature is not 1, and A = sum_v exp(t_v / T - m_t) (t_v - s_v) / T, from which
KL(teacher || student) = A / Z_t - lse_t + lse_s. The cross-entropy is lse_1 - s_target. The second pass writes
kl_scale_row (softmax(s / T) - softmax(t / T)) and, when asked, ce_scale_row (softmax(s) - onehot(target)): the
gradients of the weighted mean losses when the caller's scales hold each row's weight over the weights' sum (times T
for the KL). Arithmetic is float32 whatever the logits' dtype.

A sparse teacher (its top k log-probabilities, their ids and the rest's log-probability, as `teacher_logits` caches
them) has a kernel of its own (`sparse_kl_rows`), computing what `kd._sparse_kl` and `kd._chunk_losses` define: the KL
over the teacher's k + 1 outcomes (renormalised), the student's rest being its probability off the teacher's k. Its
first pass takes the student's log-sum-exp and, apart, its sum of exponentials off the teacher's k: in each block the
terms at the teacher's ids (a gather of the same float32 values) are taken from the block's, both summed in float64, so
the rest keeps its precision where it is a small share (float32 would lose it in the difference of the wholes). The
second pass writes the gradient off the top k (the student's probability less its share of the teacher's rest) and the
CE's; the top k's gradient entries are written last, over it. On an H200, cached top-256 logits in LoRA KD spent 224 ms
a step in the PyTorch passes this replaces, with the teacher's top-k (BENCHMARKS.md, thirty-second session).

On CUDA tensors where Triton imports (the switches as triton_step.py's: `LINEARIZE_FUSED_STEP=off` or
`LINEARIZE_KERNELS=torch` turn it off); on CPU tensors only under Triton's interpreter with `LINEARIZE_FUSED_STEP=on`
(the tests, which check it against the PyTorch path). Elsewhere `kd.py` computes the same in PyTorch.
"""

import torch
from torch import Tensor

from ..hf.triton_step import DTYPES, TRITON_PROBLEM, fused_kernel_problem

if TRITON_PROBLEM is None:
    from ..hf.triton_step import tl, triton

# Columns a program reads at once and its warps.
BLOCK = 4096
WARPS = 8
TOP_K_LIMIT = 4096  # the most teacher entries a row of the sparse kernel holds at once


def fused_kl_problem(student: Tensor, teacher: Tensor) -> str | None:
    """Why `kl_rows` does not take these logits (None when it does): the switches, Triton, the device, dtypes and shapes."""
    problem = fused_kernel_problem(student, "the fused KL")
    if problem is not None:
        return problem
    if student.dtype not in DTYPES or teacher.dtype not in DTYPES:
        return f"the fused KL takes float16/bfloat16/float32 logits, got {student.dtype} and {teacher.dtype}"
    if student.dim() != 2 or student.shape != teacher.shape:
        return f"the fused KL takes two (rows, vocabulary) logits of one shape, got {tuple(student.shape)} and {tuple(teacher.shape)}"
    return None


def kl_rows(
    student: Tensor, teacher: Tensor, targets: Tensor, temperature: float, kl_scale: Tensor, ce_scale: Tensor | None,
    grad_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(KL(teacher || student) at `temperature` of each row, float32; the cross-entropy -log softmax(student)[target] of
    each row, float32, at target 0 where a row's target is negative; kl_scale_row (softmax(s / T) - softmax(t / T)) in
    `grad_dtype`; ce_scale_row (softmax(s) - onehot(target)) in `grad_dtype`, or None without `ce_scale`) for logits
    (rows, vocabulary), targets (rows,) and float32 scales (rows,). `fused_kl_problem` says whether it runs.

        kl, ce, d_kl, d_ce = kl_rows(student_logits, teacher_logits, targets, 2.0, weights * 2.0 / weights.sum(), None, torch.bfloat16)
    """
    student, teacher = (x if x.stride(-1) == 1 else x.contiguous() for x in (student, teacher))
    rows, vocab = student.shape
    kl = torch.empty(rows, dtype=torch.float32, device=student.device)
    ce = torch.empty_like(kl)
    d_kl = torch.empty(rows, vocab, dtype=grad_dtype, device=student.device)
    d_ce = None if ce_scale is None else torch.empty_like(d_kl)
    _kl_kernel[(rows,)](
        student, teacher, targets.contiguous(), kl_scale.float().contiguous(), kl if ce_scale is None else ce_scale.float().contiguous(),
        kl, ce, d_kl, d_kl if d_ce is None else d_ce, vocab, student.stride(0), teacher.stride(0), 1.0 / temperature,
        SEPARATE_CE=temperature != 1, CE_GRAD=ce_scale is not None, BLOCK=BLOCK, num_warps=WARPS,
    )
    return kl, ce, d_kl, d_ce


def sparse_kl_problem(student: Tensor, top) -> str | None:
    """Why `sparse_kl_rows` does not take these student logits and sparse teacher rows (None when it does)."""
    problem = fused_kernel_problem(student, "the fused top-k KL")
    if problem is not None:
        return problem
    if student.dtype not in DTYPES or top.log_probs.dtype not in DTYPES:
        return f"the fused top-k KL takes float16/bfloat16/float32, got {student.dtype} and {top.log_probs.dtype}"
    rows = student.shape[0]
    if student.dim() != 2 or top.log_probs.shape != top.indices.shape or top.log_probs.shape[0] != rows or tuple(top.log_rest.shape) != (rows,):
        return f"the fused top-k KL takes (rows, vocabulary) logits and (rows, k) teacher rows, got {tuple(student.shape)} and {tuple(top.log_probs.shape)}"
    if top.log_probs.shape[1] > TOP_K_LIMIT:
        return f"the fused top-k KL holds up to {TOP_K_LIMIT} teacher entries a row, got {top.log_probs.shape[1]}"
    return None


def sparse_kl_rows(
    student: Tensor, top, targets: Tensor, temperature: float, kl_scale: Tensor, ce_scale: Tensor | None, grad_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """`kl_rows` for a sparse teacher `top` (a `kd.TeacherTopK` of rows: log_probs and indices (rows, k), log_rest
    (rows,)), as `kd._chunk_losses` computes it; `sparse_kl_problem` says whether it runs.

        kl, ce, d_kl, d_ce = sparse_kl_rows(student_logits, cached.rows(), targets, 1.0, weights / weights.sum(), None, torch.bfloat16)
    """
    student = student if student.stride(-1) == 1 else student.contiguous()
    rows, vocab = student.shape
    k = top.log_probs.shape[1]
    kl = torch.empty(rows, dtype=torch.float32, device=student.device)
    ce = torch.empty_like(kl)
    d_kl = torch.empty(rows, vocab, dtype=grad_dtype, device=student.device)
    d_ce = None if ce_scale is None else torch.empty_like(d_kl)
    _sparse_kl_kernel[(rows,)](
        student, top.log_probs.contiguous(), top.indices.to(torch.int32).contiguous(), top.log_rest.float().contiguous(),
        targets.contiguous(), kl_scale.float().contiguous(), kl if ce_scale is None else ce_scale.float().contiguous(),
        kl, ce, d_kl, d_kl if d_ce is None else d_ce, vocab, k, student.stride(0), 1.0 / temperature,
        SEPARATE_CE=temperature != 1, CE_GRAD=ce_scale is not None, BLOCK=BLOCK, TOP=triton.next_power_of_2(k), num_warps=WARPS,
    )
    return kl, ce, d_kl, d_ce


def top_k_problem(logits: Tensor, k: int) -> str | None:
    """Why `top_k_rows` does not take these (rows, vocabulary) logits at this k (None when it does)."""
    problem = fused_kernel_problem(logits, "the fused teacher top-k")
    if problem is not None:
        return problem
    if logits.dtype not in DTYPES or logits.dim() != 2:
        return f"the fused teacher top-k takes (rows, vocabulary) float16/bfloat16/float32 logits, got {tuple(logits.shape)} {logits.dtype}"
    if k > TOP_K_LIMIT:
        return f"the fused teacher top-k holds up to {TOP_K_LIMIT} entries a row, got {k}"
    return None


def top_k_rows(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """The `k` most likely tokens of each row of `logits` at `temperature`: (their log-probabilities, float32; their
    ids; the log of every other token's probability together, float32), as `teacher_logits.top_k` defines them. torch's
    top-k picks the ids in the logits' own dtype (the order is softmax's); one kernel pass then takes each row's
    log-sum-exp and its rest, exactly (`_sums_off_top`), where the PyTorch form makes float32 log-probabilities of
    the whole row, scatters and sums them again. `top_k_problem` says whether it runs."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    values, indices = logits.topk(k, dim=-1)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    log_rest = torch.empty_like(lse)
    _top_k_sums_kernel[(rows,)](
        logits, indices.to(torch.int32), lse, log_rest, vocab, k, logits.stride(0), 1.0 / temperature,
        BLOCK=BLOCK, TOP=triton.next_power_of_2(k), num_warps=WARPS,
    )
    return values.float() * (1.0 / temperature) - lse[:, None], indices, log_rest


if TRITON_PROBLEM is None:

    @triton.jit
    def _online(m, z, x, inside):
        """The running maximum and sum of exp(x - maximum) of a row, updated with a block x (`inside`: its lanes in the row)."""
        new = tl.maximum(m, tl.max(tl.where(inside, x, float("-inf")), 0))
        return new, z * tl.exp(m - new) + tl.sum(tl.where(inside, tl.exp(x - new), 0.0), 0)

    @triton.jit
    def _kl_kernel(
        student, teacher, targets, kl_scale, ce_scale, kl_out, ce_out, d_kl, d_ce, vocab, stride_s, stride_t, inv_t,
        SEPARATE_CE: tl.constexpr, CE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        s_row, t_row, d_row = student + row * stride_s, teacher + row * stride_t, row * vocab
        m_s = tl.full((), float("-inf"), tl.float32)
        m_t, m_1 = m_s, m_s
        z_s = tl.zeros((), tl.float32)
        z_t, z_1, a = z_s, z_s, z_s
        for start in range(0, vocab, BLOCK):
            inside = start + cols < vocab
            s = tl.load(s_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            t = tl.load(t_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            m_s, z_s = _online(m_s, z_s, s * inv_t, inside)
            new_t = tl.maximum(m_t, tl.max(tl.where(inside, t * inv_t, float("-inf")), 0))
            e_t = tl.where(inside, tl.exp(t * inv_t - new_t), 0.0)
            fade = tl.exp(m_t - new_t)
            z_t = z_t * fade + tl.sum(e_t, 0)
            a = a * fade + tl.sum(e_t * (t - s) * inv_t, 0)
            m_t = new_t
            if SEPARATE_CE:
                m_1, z_1 = _online(m_1, z_1, s, inside)
        lse_s, lse_t = m_s + tl.log(z_s), m_t + tl.log(z_t)
        lse_1 = m_1 + tl.log(z_1) if SEPARATE_CE else lse_s
        target = tl.maximum(tl.load(targets + row), 0)
        tl.store(kl_out + row, a / z_t - lse_t + lse_s)
        tl.store(ce_out + row, lse_1 - tl.load(s_row + target).to(tl.float32))
        scale_kl = tl.load(kl_scale + row)
        scale_ce = tl.load(ce_scale + row) if CE_GRAD else 0.0
        for start in range(0, vocab, BLOCK):
            inside = start + cols < vocab
            s = tl.load(s_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            t = tl.load(t_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            p_s = tl.exp(s * inv_t - lse_s)
            tl.store(d_kl + d_row + start + cols, (scale_kl * (p_s - tl.exp(t * inv_t - lse_t))).to(d_kl.dtype.element_ty), mask=inside)
            if CE_GRAD:
                p_1 = tl.exp(s - lse_1) if SEPARATE_CE else p_s
                hit = tl.where(start + cols == target, 1.0, 0.0)
                tl.store(d_ce + d_row + start + cols, (scale_ce * (p_1 - hit)).to(d_ce.dtype.element_ty), mask=inside)

    @triton.jit
    def _sums_off_top(s_row, ids, held, vocab, inv_t, SEPARATE_CE: tl.constexpr, BLOCK: tl.constexpr):
        """A row's (m, z) of x / T (its maximum and sum of exp(x / T - m)), the same sum off the columns `ids` (`held`
        lanes) in float64, and (m, z) of x itself where SEPARATE_CE asks. In each block the terms at `ids` (a gather of
        the same float32 values) are taken from the block's, both summed in float64: the difference of the wholes in
        float32 would lose the rest where it is a small share."""
        cols = tl.arange(0, BLOCK)
        m_s = tl.full((), float("-inf"), tl.float32)
        m_1 = m_s
        z_s = tl.zeros((), tl.float32)
        z_1 = z_s
        z_rest = tl.zeros((), tl.float64)
        for start in range(0, vocab, BLOCK):
            inside = start + cols < vocab
            s = tl.load(s_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            x = s * inv_t
            new = tl.maximum(m_s, tl.max(tl.where(inside, x, float("-inf")), 0))
            e = tl.where(inside, tl.exp(x - new), 0.0)
            here = held & (ids >= start) & (ids < start + BLOCK)
            x_top = tl.load(s_row + ids, mask=here, other=0.0).to(tl.float32) * inv_t
            e_top = tl.where(here, tl.exp(x_top - new), 0.0)
            fade = tl.exp(m_s - new)
            z_s = z_s * fade + tl.sum(e, 0)
            z_rest = z_rest * fade.to(tl.float64) + (tl.sum(e.to(tl.float64), 0) - tl.sum(e_top.to(tl.float64), 0))
            m_s = new
            if SEPARATE_CE:
                m_1, z_1 = _online(m_1, z_1, s, inside)
        return m_s, z_s, z_rest, m_1, z_1

    @triton.jit
    def _top_k_sums_kernel(logits, indices, lse_out, rest_out, vocab, k, stride, inv_t, BLOCK: tl.constexpr, TOP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        top = tl.arange(0, TOP)
        held = top < k
        ids = tl.load(indices + row * k + top, mask=held, other=0)
        m, z, z_rest, _, _ = _sums_off_top(logits + row * stride, ids, held, vocab, inv_t, False, BLOCK)
        tl.store(lse_out + row, m + tl.log(z))
        tl.store(rest_out + row, tl.log((tl.maximum(z_rest, 0.0) / z.to(tl.float64)).to(tl.float32)))

    @triton.jit
    def _sparse_kl_kernel(
        student, log_probs, indices, log_rest, targets, kl_scale, ce_scale, kl_out, ce_out, d_kl, d_ce, vocab, k, stride_s,
        inv_t, SEPARATE_CE: tl.constexpr, CE_GRAD: tl.constexpr, BLOCK: tl.constexpr, TOP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        s_row, d_row = student + row * stride_s, row * vocab
        top = tl.arange(0, TOP)
        held = top < k
        ids = tl.load(indices + row * k + top, mask=held, other=0)
        m_s, z_s, z_rest, m_1, z_1 = _sums_off_top(s_row, ids, held, vocab, inv_t, SEPARATE_CE, BLOCK)
        lse_s = m_s + tl.log(z_s)
        lse_1 = m_1 + tl.log(z_1) if SEPARATE_CE else lse_s
        log_s_rest = tl.log((tl.maximum(z_rest, 0.0) / z_s.to(tl.float64)).to(tl.float32))
        # The teacher's k + 1 outcomes, renormalised, and the student's log-probabilities of the same.
        log_p = tl.load(log_probs + row * k + top, mask=held, other=float("-inf")).to(tl.float32)
        rest = tl.load(log_rest + row)
        m_q = tl.maximum(tl.max(log_p, 0), rest)
        lse_q = m_q + tl.log(tl.sum(tl.exp(log_p - m_q), 0) + tl.exp(rest - m_q))
        log_q, log_q_rest = log_p - lse_q, rest - lse_q
        q, q_rest = tl.exp(log_q), tl.exp(log_q_rest)
        log_s = tl.load(s_row + ids, mask=held, other=0.0).to(tl.float32) * inv_t - lse_s
        kl = tl.sum(tl.where(q > 0, q * (log_q - log_s), 0.0), 0) + tl.where(q_rest > 0, q_rest * (log_q_rest - log_s_rest), 0.0)
        target = tl.maximum(tl.load(targets + row), 0)
        tl.store(kl_out + row, kl)
        tl.store(ce_out + row, lse_1 - tl.load(s_row + target).to(tl.float32))
        scale_kl = tl.load(kl_scale + row)
        scale_ce = tl.load(ce_scale + row) if CE_GRAD else 0.0
        # Off the teacher's k the target is the student's probability times q_rest / s_rest (its share of the rest).
        keep = 1.0 - tl.where(q_rest > 0, tl.exp(log_q_rest - log_s_rest), 0.0)
        for start in range(0, vocab, BLOCK):
            inside = start + cols < vocab
            s = tl.load(s_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            p_s = tl.exp(s * inv_t - lse_s)
            tl.store(d_kl + d_row + start + cols, (scale_kl * p_s * keep).to(d_kl.dtype.element_ty), mask=inside)
            if CE_GRAD:
                p_1 = tl.exp(s - lse_1) if SEPARATE_CE else p_s
                hit = tl.where(start + cols == target, 1.0, 0.0)
                tl.store(d_ce + d_row + start + cols, (scale_ce * (p_1 - hit)).to(d_ce.dtype.element_ty), mask=inside)
        tl.debug_barrier()  # the top k's entries go over what the pass above wrote there
        tl.store(d_kl + d_row + ids, (scale_kl * (tl.exp(log_s) - q)).to(d_kl.dtype.element_ty), mask=held)
