"""Starting values for learned gates: the input that puts a sigmoid or a softplus at a chosen value."""

from __future__ import annotations

import math


def inverse_softplus(y: float) -> float:
    """The x with softplus(x) = y (y > 0), to start a softplus at a chosen value."""
    return y + math.log(-math.expm1(-y))


def logit(p: float) -> float:
    """The x with sigmoid(x) = p (0 < p < 1), to start a sigmoid at a chosen value."""
    return math.log(p / (1.0 - p))
