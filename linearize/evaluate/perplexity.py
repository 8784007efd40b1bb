"""Perplexity of a causal LM: on fixed token windows, or on a whole text in strided windows at a given context.

Strided windows (the usual sliding evaluation): windows of `context` tokens start every `stride` tokens and each
scores only the tokens the previous window did not, so every scored token after the first window sees at least
`context - stride` tokens of context. Only the logits that are scored are computed (`logits_to_keep`), so long
contexts do not materialise a (context x vocabulary) matrix per window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from linearize.hf.errors import LinearizeError

# Windows per forward pass are sized so one batch holds about this many tokens.
TOKENS_PER_BATCH = 4096


@torch.no_grad()
def perplexity(model, windows: torch.LongTensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over `windows` (n, seq_len), each scored independently.

    Example:
        >>> windows = token_windows(tokenizer, packaged_text("persuasion"), 512, max_tokens=8192)
        >>> perplexity(model, windows)
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def _nll(model, batch: torch.Tensor, scored: int) -> float:
    """Summed NLL of the last `scored` tokens of each row of `batch`."""
    logits = model(input_ids=batch, use_cache=False, logits_to_keep=scored + 1).logits[:, :-1].float()
    targets = batch[:, -scored:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


@torch.no_grad()
def strided_perplexity(model, ids: torch.LongTensor, context: int, stride: int | None = None, on_window=None) -> tuple[float, int]:
    """(perplexity, tokens scored) of the 1-D token sequence `ids` with windows of `context` every `stride` tokens.

    `stride` defaults to context // 2. Tokens after the last full window are not scored.
    `on_window(n)` is called after each batch with the number of windows done (for progress bars).

    Example:
        >>> ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        >>> strided_perplexity(model, ids, context=1024)
    """
    stride = stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise LinearizeError(f"stride must be between 1 and the context ({context}), got {stride}")
    if ids.numel() < context:
        raise LinearizeError(
            f"the text has {ids.numel()} tokens, fewer than one window of context {context}: use a longer text or a shorter context"
        )
    device = next(model.parameters()).device
    windows = ids.unfold(0, context, stride)
    # The first window scores all of its tokens; later ones only the last `stride` (the rest was scored before),
    # and at most context - 1, since a window's first token has nothing before it in that window.
    total = _nll(model, windows[:1].to(device), context - 1)
    count = context - 1
    if on_window:
        on_window(1)
    scored = min(stride, context - 1)
    per_batch = max(1, TOKENS_PER_BATCH // context)
    for batch in windows[1:].split(per_batch):
        total += _nll(model, batch.to(device), scored)
        count += batch.shape[0] * scored
        if on_window:
            on_window(batch.shape[0])
    return math.exp(total / count), count


def window_count(tokens: int, context: int, stride: int | None = None) -> int:
    stride = stride or max(1, context // 2)
    return 0 if tokens < context else (tokens - context) // stride + 1


@torch.no_grad()
def agreement(teacher_logits, student_logits, windows: torch.LongTensor, on_batch=None) -> tuple[float, float, int]:
    """(KL(teacher || student) in nats per token, top-1 next-token agreement, tokens compared) over `windows`
    (n, context), every position of every window; `teacher_logits` and `student_logits` map a batch of token ids
    (on the caller's device) to logits. Windows per batch keep one batch near TOKENS_PER_BATCH tokens.
    `on_batch(n)` is called after each batch with the number of windows done (for progress bars).

    Example:
        >>> windows = token_windows(tokenizer, packaged_text("persuasion"), 512, max_tokens=8192)
        >>> kl, top1, tokens = agreement(lambda b: teacher(b).logits, lambda b: student(b).logits, windows.to(device))
    """
    kl, agree, count = 0.0, 0, 0
    for batch in windows.split(max(1, TOKENS_PER_BATCH // windows.shape[1])):
        teacher = teacher_logits(batch).float().log_softmax(-1)
        student = student_logits(batch).float().log_softmax(-1)
        kl += F.kl_div(student, teacher, log_target=True, reduction="sum").item()
        agree += (teacher.argmax(-1) == student.argmax(-1)).sum().item()
        count += batch.numel()
        if on_batch:
            on_batch(batch.shape[0])
    return kl / count, agree / count, count
