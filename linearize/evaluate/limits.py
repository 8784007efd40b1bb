"""Lengths a model can be measured at: its `max_position_embeddings`, unless the user asks to go beyond it."""

from __future__ import annotations

from linearize.hf.errors import LinearizeError


def check_lengths(lengths, limit: int | None, allow_longer: bool, what: str, extra: int = 0) -> list[int]:
    """Sorted, positive lengths that fit the model's context (`extra` tokens are generated after each)."""
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 1:
        raise LinearizeError(f"{what} lengths must be positive integers, got {lengths}")
    if limit and not allow_longer and lengths[-1] + extra > limit:
        too_long = [n for n in lengths if n + extra > limit]
        raise LinearizeError(
            f"{what} length(s) {', '.join(map(str, too_long))} plus {extra} generated tokens exceed the model's context of "
            f"{limit} tokens (max_position_embeddings): use lengths up to {limit - extra}, or pass --allow-longer to measure beyond it"
        )
    return lengths
