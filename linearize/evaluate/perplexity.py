"""Perplexity of a causal LM: on fixed token windows, or on a whole text in strided windows at a given context.

Strided windows (the usual sliding evaluation): windows of `context` tokens start every `stride` tokens and each
scores only the tokens the previous window did not, so every scored token after the first window sees at least
`context - stride` tokens of context. Each window opens with the tokenizer's special prefix (its BOS token, where it
adds one), as the model's tokenizer presents text. Only the logits that are scored are computed (`logits_to_keep`), so long
contexts do not materialise a (context x vocabulary) matrix per window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from linearize.textdata import cut_windows

# Windows per forward pass are sized so one batch holds about this many tokens.
TOKENS_PER_BATCH = 4096


@torch.no_grad()
def perplexity(model, windows: torch.LongTensor, batch_size: int = 4, on_batch=None) -> float:
    """exp(mean next-token negative log-likelihood) over `windows` (n, seq_len), each scored independently.
    `on_batch(n)` is called after each batch with the number of windows done (for progress bars).

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
        if on_batch:
            on_batch(batch.shape[0])
    return math.exp(total / count)


def _nll(model, batch: torch.Tensor, scored: int) -> float:
    """Summed NLL of the last `scored` tokens of each row of `batch`."""
    logits = model(input_ids=batch, use_cache=False, logits_to_keep=scored + 1).logits[:, :-1].float()
    targets = batch[:, -scored:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


@torch.no_grad()
def strided_perplexity(
    model, ids: torch.LongTensor, context: int, stride: int | None = None, prefix: list[int] = (), on_window=None
) -> tuple[float, int]:
    """(perplexity, text tokens scored) of the 1-D token sequence `ids` (text, no special tokens) in windows of
    `context` tokens every `stride` text tokens, each opening with `prefix` (`textdata.special_prefix(tokenizer)`).

    `stride` defaults to context // 2. Tokens after the last full window are not scored.
    `on_window(n)` is called after each batch with the number of windows done (for progress bars).

    Example:
        >>> ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        >>> strided_perplexity(model, ids, context=1024, prefix=special_prefix(tokenizer))
    """
    stride = stride or max(1, context // 2)
    windows = cut_windows(ids, context, stride, prefix)
    device = next(model.parameters()).device
    # The first window scores every text token that has something before it (all of them after a prefix, all but
    # the first without one); later windows only their last `stride` tokens, which the previous one did not score.
    first = context - max(len(prefix), 1)
    total = _nll(model, windows[:1].to(device), first)
    count = first
    if on_window:
        on_window(1)
    scored = min(stride, first)
    per_batch = max(1, TOKENS_PER_BATCH // context)
    for start in range(1, windows.shape[0], per_batch):
        batch = windows[start : start + per_batch]
        total += _nll(model, batch.to(device), scored)
        count += batch.shape[0] * scored
        if on_window:
            on_window(batch.shape[0])
    return math.exp(total / count), count


def window_count(tokens: int, context: int, stride: int | None = None, prefix: list[int] = ()) -> int:
    """How many windows `strided_perplexity` scores on `tokens` text tokens."""
    stride = stride or max(1, context // 2)
    body = context - len(prefix)
    return 0 if tokens < body else (tokens - body) // stride + 1


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
