"""Tiny random models of several families, built locally (no downloads), and the shared checks run on them."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 120
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# Each family exercises something different in how attention is read: grouped-query heads, bias, q/k norms
# (per head and full width), fused qkv, GPT-NeoX's interleaved qkv with partial RoPE, softcapping and
# per-layer sliding windows.
FAMILIES = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, sliding_window=6),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=6, query_pre_attn_scalar=16, attn_logit_softcapping=20.0, final_logit_softcapping=30.0,
    ),
    "phi3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4),
    "olmo2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
}


def tiny_config(family: str = "llama", **overrides):
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float64, **overrides):
    """A randomly initialised causal LM of `family`, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    if family == "qwen2":  # random biases, so that bias handling is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model.to(dtype).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(batch_ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad row i by pads[i] tokens: (input_ids, attention_mask)."""
    ids, mask = batch_ids.clone(), torch.ones_like(batch_ids)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_script(name: str):
    """benchmarks/NAME.py imported as a module, its sibling scripts importable as when it runs from benchmarks/."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def run_as_script(name: str, *args) -> subprocess.CompletedProcess:
    """`python benchmarks/NAME.py ARGS` in a fresh process from the repository's root: the script's own entry point."""
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *map(str, args)], cwd=BENCHMARKS.parent,
                          capture_output=True, text=True)


def run_main(script, *args) -> subprocess.CompletedProcess:
    """A benchmark script's `main()` run in this process with ARGS as its command line, as `python SCRIPT ARGS` would run
    it (a fresh process spends about 9 s of a 2-core machine importing torch and transformers): its exit status, and its
    stdout and stderr, the message it exits with last."""
    out, err = io.StringIO(), io.StringIO()
    argv = [f"{script.__name__}.py", *map(str, args)]
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            script.main()
            status = 0
        except SystemExit as exit:
            status = 1 if isinstance(exit.code, str) else exit.code or 0
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def run_python(code: str, cwd: Path, hide_linearize: bool = True) -> str:
    """Run `code` in a fresh Python process; with `hide_linearize`, `import linearize` fails there."""
    env = dict(os.environ)
    prelude = ""
    if hide_linearize:
        prelude = textwrap.dedent(
            """
            import sys
            class _Hide:
                def find_spec(self, name, path=None, target=None):
                    if name == "linearize" or name.startswith("linearize."):
                        raise ImportError("linearize is hidden in this process")
            sys.meta_path.insert(0, _Hide())
            """
        )
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    return result.stdout


def compiled_twice(model, step):
    """`step()` run twice through a recipe's compiled decoder layers (`compile_layers`, one graph a layer; the second run
    executes what the first compiled), the layers uncompiled after; returns the second run's result."""
    from linearize.distillation.loop import compile_layers, compile_limits, uncompile

    layers = compile_layers(model)
    with compile_limits():
        for _ in range(2):
            result = step()
    for layer in layers:
        uncompile(layer)
    return result


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# Saved equals reloaded means every weight bit-identical. The logits then agree to rounding, not to the bit: since
# transformers 5.24 a loaded weight sits in storage aligned differently from a fresh allocation, and BLAS sums in a
# different order there (a plain reloaded Llama differs by 1e-16 in float64 too).
RELOAD_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_reloaded(reloaded, original, **inputs) -> None:
    """`reloaded` holds exactly `original`'s weights under the same names and computes the same logits on `inputs`."""
    ours, theirs = original.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])][:4]
    with torch.no_grad():
        error = relative_error(reloaded(**inputs).logits, original(**inputs).logits)
    assert error < RELOAD_TOLERANCE[original.dtype], error


def weights_digest(model) -> str:
    """sha256 of every weight's name, dtype, shape and bytes: equal digests, bit-identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reload_probe(original, path: Path, **inputs) -> str:
    """Save what a fresh process needs to check a reload of `original` (its weights' digest and its logits on
    `inputs`), and return the code that checks `model` there: it prints `reloaded exactly True` when it holds."""
    with torch.no_grad():
        expected = original(**inputs).logits
    torch.save({"inputs": inputs, "expected": expected, "digest": weights_digest(original)}, path)
    body = textwrap.indent(inspect.getsource(weights_digest), " " * 8)
    return f"""
{body}
        probe = torch.load({str(path)!r})
        same = weights_digest(model) == probe["digest"]
        with torch.no_grad():
            logits = model(**probe["inputs"]).logits
        error = ((logits.double() - probe["expected"].double()).norm() / probe["expected"].double().norm()).item()
        print("reloaded exactly", same and error < {RELOAD_TOLERANCE[original.dtype]!r}, error)
        """


# A character-level tokenizer whose ids fit the tiny models' vocabulary: specials 0-3, then printable ASCII and
# newline, one token per character. The chat template renders "role: content" lines.
TINY_CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=TINY_CHAT_TEMPLATE
    )


def tiny_data(seq_len: int = 32, train_chars: int = 20_000, heldout_chars: int = 4_000, seed: int = 0):
    """DistillData from the packaged novels through the tiny tokenizer: a slice of Pride and Prejudice to train
    on, a slice of Persuasion held out."""
    from linearize.distillation.data import DistillData, PackedWindows
    from linearize.textdata import packaged_text

    tokenizer = tiny_tokenizer()

    def ids(name, chars):
        return torch.tensor(tokenizer(packaged_text(name)[:chars], add_special_tokens=False)["input_ids"])

    train = ids("prideprejudice", train_chars)
    count = train.numel() // seq_len
    windows = train[: count * seq_len].view(count, seq_len)
    return DistillData(PackedWindows(windows, seed), ids("persuasion", heldout_chars), seq_len, "tiny")


@torch.no_grad()
def greedy_steps(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy tokens from a plain cached loop that ignores end-of-sequence tokens: (batch, steps)."""
    cache = model.new_cache()
    token = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    tokens, position = [token], torch.full_like(token, ids.shape[1])
    for _ in range(steps - 1):
        token = model(token, cache=cache, position_ids=position, use_cache=True).logits[:, -1:].argmax(-1)
        tokens.append(token)
        position += 1
    return torch.cat(tokens, 1)
