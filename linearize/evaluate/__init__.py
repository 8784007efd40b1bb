"""Scoring teacher and student side by side: lm-eval tasks, perplexity, long-context retrieval, speed and memory.

`linearize.evaluate` (the function) is `scoring.evaluate`; it shadows this package's name on the `linearize`
module, so import submodules with `from linearize.evaluate.X import Y`, which always works.
"""

from .scoring import evaluate

__all__ = ["evaluate"]
