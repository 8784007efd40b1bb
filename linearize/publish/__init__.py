"""Publishing converted models to the Hugging Face Hub: `push` and the model card it writes."""

from .push import push

__all__ = ["push"]
