"""Perplexity of a causal LM on token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
