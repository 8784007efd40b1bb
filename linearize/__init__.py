"""linearize: turn a pretrained Hugging Face transformer into a linear-time model and make it good again.

Example:
    >>> import linearize
    >>> teacher, tokenizer = linearize.load_teacher("smollm2-135m")
    >>> student = linearize.convert(teacher, "hedgehog_swa")
    >>> student = linearize.distill(student, "prideprejudice", "quickstart", tokenizer=tokenizer)
    >>> student.save_pretrained("out/smollm2-hedgehog-swa")
"""

from .evaluate import evaluate
from .export import export
from .hf.errors import LinearizeError
from .hf.mixers import MIXERS, register_mixer, teacher_mode
from .hf.modeling_linearized import LinearizedConfig, LinearizedForCausalLM, register_auto_classes
from .loaders import load_teacher
from .publish import push
from .run import distill
from .surgery import convert, set_options

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "MIXERS",
    "LinearizeError",
    "LinearizedConfig",
    "LinearizedForCausalLM",
    "convert",
    "distill",
    "evaluate",
    "export",
    "load_teacher",
    "push",
    "register_mixer",
    "set_options",
    "teacher_mode",
]
