"""linearize: turn a pretrained Hugging Face transformer into a linear-time model."""

__version__ = "0.1.0"
