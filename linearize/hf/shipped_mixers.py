"""Imports every mixer file beside this one (`mixer_*.py`) so each registers its mixers: a new mixer is one new file.

transformers copies a saved model's remote code by following literal `from .x import` lines, and discovery writes
none; so `save_pretrained` replaces this file in the saved folder by those lines (`write_mixer_files` in
modeling_linearized.py), and a model loaded with trust_remote_code, where linearize is not installed, finds every
mixer that was here.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .mixers import MIXERS

MIXER_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("mixer_")))

for _module in MIXER_MODULES:
    importlib.import_module(f"{__package__}.{_module}")
    if not any(cls.__module__ == f"{__package__}.{_module}" for cls in MIXERS.values()):
        raise ValueError(f"{_module}.py registers no mixer; decorate its Mixer subclass with @register_mixer, or rename the file")
