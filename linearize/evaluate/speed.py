"""Speed and memory against context length and batch size: prefill tokens/s, decode tokens/s, peak memory and
the exact size of the generation cache, for the teacher and the student in one run.

Prefill is one forward pass over `context` random tokens (only the last position's logits are computed);
decode then feeds one token per step through the model's own cache, as generation does.
The teacher is the converted model under teacher_mode (its softmax attention keeps a key/value cache in every
layer, exactly as the original model does) or an unconverted model passed as its own MODEL.
CUDA times come from CUDA events after a synchronise; CPU times from perf_counter. See `memory` for how peaks
are measured on each device.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from linearize.hf.cache import cache_keyword, returned_cache
from linearize.hf.errors import LinearizeError

from .limits import check_lengths
from .memory import cache_bytes, meter_for
from .progress import progress_bar
from .results import Results, environment
from .scored import Scored, resolve_device, scored_models

WARMUP_CONTEXT = 16


class Timer:
    """Wall time of a block: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self):
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end_event.record()
            self.end_event.synchronize()
            self.seconds = self.start_event.elapsed_time(self.end_event) / 1000
        else:
            self.seconds = time.perf_counter() - self.start


def default_dtype(dtype: Any, device: str) -> Any:
    """The dtype a model named by path is loaded in: `dtype` when given, else bfloat16 on CUDA (how models are run
    there; in float32, SDPA has no fused kernel for grouped kv heads and scores T x T) and float32 elsewhere."""
    if dtype is not None:
        return dtype
    return "bfloat16" if device.startswith("cuda") else None


@torch.no_grad()
def measure(model, context: int, batch: int, decode_tokens: int, seed: int = 0) -> dict[str, Any]:
    """One prefill of `batch` x `context` random tokens, then `decode_tokens` single-token steps from the cache."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
    keyword = cache_keyword(model)
    meter = meter_for(device)
    meter.start()
    with Timer(device) as prefill:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill_peak = meter.peak()
    cache = returned_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    del out
    meter.restart_peak()
    with Timer(device) as decode:
        for _ in range(decode_tokens):
            step = model(input_ids=token, **{keyword: cache}, use_cache=True)
            cache = returned_cache(step)
            token = step.logits[:, -1:].argmax(-1)
    return dict(
        context=context,
        batch=batch,
        decode_tokens=decode_tokens,
        prefill_seconds=prefill.seconds,
        decode_seconds=decode.seconds,
        prefill_tokens_per_s=batch * context / prefill.seconds,
        decode_tokens_per_s=batch * decode_tokens / decode.seconds if decode_tokens else None,
        prefill_peak_bytes=prefill_peak,
        decode_peak_bytes=meter.peak(),
        cache_bytes=cache_bytes(cache),
        memory_method=meter.method,
    )


def _measure_or_oom(item: Scored, context: int, batch: int, decode_tokens: int, repeats: int, seed: int) -> dict[str, Any]:
    """The fastest of `repeats` runs (the least disturbed by other work); an out-of-memory GPU is a result too."""
    runs = []
    try:
        with item.mode():
            for _ in range(repeats):
                runs.append(measure(item.model, context, batch, decode_tokens, seed))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(context=context, batch=batch, decode_tokens=decode_tokens, out_of_memory=True)
    return min(runs, key=lambda r: r["prefill_seconds"] + r["decode_seconds"])


def benchmark(
    model: Any,
    tokenizer: Any = None,
    *,
    lengths: Sequence[int] = (256, 512, 1024),
    batch_sizes: Sequence[int] = (1,),
    decode_tokens: int = 32,
    repeats: int = 1,
    device: str | None = "cpu",
    dtype: Any = None,
    teacher: bool = True,
    name: str | None = None,
    allow_longer: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Results:
    """Prefill and decode speed and memory of a model (and, for a converted model, its teacher via teacher_mode)
    at each context length and batch size. Defaults are small enough for a CPU; pass device="cuda" on a GPU.
    A model named by path is loaded in `dtype`, by default bfloat16 on CUDA and float32 on a CPU; a model object
    is measured in its own dtype. The dtype measured is recorded in the settings.

    Example:
        >>> results = benchmark("out/smollm2-hedgehog", lengths=[512, 2048, 8000], decode_tokens=64)
        >>> results.save("out/bench.json")
    """
    device = resolve_device(device)
    scored = scored_models(
        model, tokenizer, teacher=teacher, name=name, dtype=default_dtype(dtype, device), device=device, need_tokenizer=False
    )
    lengths = check_lengths(lengths, scored[0].max_length, allow_longer, "benchmark", extra=decode_tokens)
    if min(batch_sizes) < 1 or decode_tokens < 0 or repeats < 1:
        raise LinearizeError("batch sizes and repeats must be at least 1, and decode tokens at least 0")
    results = Results(
        settings=dict(
            lengths=lengths,
            batch_sizes=list(batch_sizes),
            decode_tokens=decode_tokens,
            repeats=repeats,
            seed=seed,
            dtype=str(next(scored[0].model.parameters()).dtype).removeprefix("torch."),
        ),
        environment=environment(device),
    )
    with progress_bar(progress) as bar:
        for item in scored:
            results.add_model(item.entry)
            with item.mode():  # warm up kernels and allocator once per model view, outside the measurements
                measure(item.model, WARMUP_CONTEXT, 1, 2, seed)
            task = bar.add_task(f"speed {item.name}", total=len(lengths) * len(batch_sizes))
            for batch in batch_sizes:
                for context in lengths:
                    row = _measure_or_oom(item, context, batch, decode_tokens, repeats, seed)
                    results.add(item.name, "speed", **row)
                    bar.advance(task)
            bar.remove_task(task)
    return results
