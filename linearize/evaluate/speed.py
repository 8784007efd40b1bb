"""Speed and memory against context length and batch size: prefill tokens/s, decode tokens/s, peak memory and
the exact size of the generation cache, for the teacher and the student in one run.

Prefill is one forward pass over `context` random tokens (only the last position's logits are computed);
decode then feeds one token per step through the model's own cache, as generation does.
The teacher is the converted model under teacher_mode (its softmax attention keeps a key/value cache in every
layer, exactly as the original model does) or an unconverted model passed as its own MODEL.
CUDA times come from CUDA events after a synchronise; CPU times from perf_counter. See `memory` for how peaks
are measured on each device: the prefill's and the decode's peaks are taken separately, both above the memory held
before the prefill (the weights), so the decode's includes the cache.

Decode runs through one of three paths, recorded in every row as `decode_path`:
    eager          the model's forward, one step at a time, after one untimed step (the default)
    torch.compile  the same loop through `torch.compile(model)` (with `compile=True`, where GraphDecoder cannot run)
    cuda_graph     `linearize.decode.GraphDecoder`'s captured step, replayed (with `compile=True`, for a converted
                   model's own view on CUDA when every layer keeps a fixed-size state)
Prefill always runs eagerly, so prefill figures compare across paths. torch.compile compiles the whole forward in
its default mode:
- not "reduce-overhead": the loop's caches change shape every step (a softmax layer's keys and values grow by one
  position), and reduce-overhead records a new CUDA graph for every shape it meets, one per step; the default mode
  compiles the growing length once as a dynamic size. The fixed-shape step, where CUDA graphs pay, is GraphDecoder's.
- not per decoder layer (as distillation compiles): with a cache, each layer's graph is specialised on its own
  index into the cache, so a 30-layer model needs a graph per layer, past dynamo's recompile limit of 8, and most
  layers fall back to eager (seen on an H200).
The cost, for softmax layers: one graph holds every layer's old and new keys and values until it returns, so the
decode peak is about twice the cache and the largest batch that fits is smaller than eager's (seen on an H200 at a
fixed memory limit: 131 against 203 sequences of 1024 tokens). Compare `decode_path` before comparing rows.

With `max_batch`, each model and context also gets the largest batch that fits (see `largest_batch`): the row of
decode throughput at that batch, marked `largest_batch`.

`sdpa_backends` runs every model's prefill and decode under one order of SDPA backends (`torch.nn.attention.sdpa_kernel`
with priority), teacher and student alike; the settings record it. On an H200 torch's own choice sent a decode step's
SDPA calls to cuDNN, which builds an execution graph for every new key length (BENCHMARKS.md, nineteenth and twentieth
sessions): eager decode steps, a teacher's as transformers runs it included, prefer flash and efficient attention to
cuDNN among the enabled backends (`linearize.hf.attention.decode_attention`, what converted models do in `generate()`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from linearize.decode import GraphDecoder
from linearize.hf.attention import DECODE_SDPA_ORDER, decode_attention
from linearize.hf.cache import cache_keyword, returned_cache
from linearize.hf.errors import LinearizeError
from linearize.hf.mixers import mixers_in

from .limits import check_lengths
from .memory import cache_bytes, free_memory, meter_for
from .progress import progress_bar
from .results import Results, environment
from .scored import Scored, resolve_device, scored_models

WARMUP_CONTEXT = 16
# Untimed decode steps before the timed ones on the fast paths: a compiled step recompiles at a new batch or length
# (then as a dynamic size); GraphDecoder runs its warm-up steps eagerly so lazily made state exists before capture.
WARM_STEPS = 2
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "math": SDPBackend.MATH}


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


class StepLoop:
    """Decode steps through `forward` (the model, or its torch.compile), the cache handed back each step; the first
    `warm_steps` run untimed at construction."""

    def __init__(self, forward, keyword: str, cache, token: torch.LongTensor, warm_steps: int):
        self.forward, self.keyword, self.cache, self.token = forward, keyword, cache, token
        self.run(warm_steps)

    def run(self, steps: int) -> None:
        # A teacher as transformers runs it decodes under the converted models' SDPA order too: the rows then compare
        # models, not cuDNN's graph builds (one per new key length).
        with decode_attention(self.token.device, 1):
            for _ in range(steps):
                out = self.forward(input_ids=self.token, **{self.keyword: self.cache}, use_cache=True)
                self.cache = returned_cache(out)
                self.token = out.logits[:, -1:].argmax(-1)


class GraphLoop:
    """Decode as `GraphDecoder.generate` does after its prefill: its eager warm-up steps and the capture of each kind
    of step at construction (untimed), then one replay per token."""

    def __init__(self, decoder: GraphDecoder, cache, token: torch.LongTensor, context: int):
        position = torch.full_like(token, context)
        for _ in range(decoder.warmup_steps):
            token = decoder.model(token, cache=cache, position_ids=position, use_cache=True).logits[:, -1:].argmax(-1)
            position += 1
        # generate() would prefill again inside the timed call; capturing here times and meters the decode alone.
        self.steps = decoder.steps(cache, token, position, context + decoder.warmup_steps)
        self.cache, self.token, self.position = cache, token, position

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.token = self.steps.replay(self.token, self.position)
            self.position += 1


class DecodePath:
    """How one model view decodes: "eager", "torch.compile" or "cuda_graph" (see the module docstring). Made once
    per view, so a compiled forward and its compiled code serve every measurement of that view."""

    def __init__(self, model, name: str = "eager"):
        self.name = name
        self.keyword = cache_keyword(model)
        self.forward = torch.compile(model, mode="default") if name == "torch.compile" else model
        # GraphDecoder refuses (LinearizeError) a model it cannot capture.
        self.decoder = GraphDecoder(model, warmup_steps=WARM_STEPS) if name == "cuda_graph" else None

    def loop(self, cache, token: torch.LongTensor, context: int) -> StepLoop | GraphLoop:
        if self.decoder is not None:
            return GraphLoop(self.decoder, cache, token, context)
        # Eager too takes one untimed step: Triton compiles its kernels for a new batch size on the first (a trained
        # hybrid_qwen3_5's first 16 tokens at batch 128 took 2.1 s, the same batch measured again 1.0 s).
        return StepLoop(self.forward, self.keyword, cache, token, 1 if self.name == "eager" else WARM_STEPS)


def fastest_path(item: Scored) -> DecodePath:
    """The fastest decode `item` supports: GraphDecoder for a converted model's own view on CUDA whose layers all keep
    a fixed-size state (a teacher view's keys and values grow, so it cannot be captured), torch.compile otherwise."""
    if not item.as_teacher and mixers_in(item.model):
        try:
            return DecodePath(item.model, "cuda_graph")
        except LinearizeError:  # not on CUDA, or kept softmax layers
            pass
    return DecodePath(item.model, "torch.compile")


@torch.no_grad()
def measure(
    model, context: int, batch: int, decode_tokens: int, seed: int = 0, path: DecodePath | None = None, prefill_chunk: int | None = None
) -> dict[str, Any]:
    """One prefill of `batch` x `context` random tokens, then `decode_tokens` single-token steps from the cache
    through `path` (default: eager). The decode peak covers the path's untimed warm-up steps and capture too.
    With `prefill_chunk`, the prompt goes through the cache `prefill_chunk` tokens at a time, as
    `generate(prefill_chunk_size=...)` and chunked-prefill servers take it: the prefill's working set is then one
    chunk's, and the cache what grows."""
    path = path or DecodePath(model)
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
    meter = meter_for(device)
    meter.start()
    with Timer(device) as prefill:
        cache = None
        for chunk in ids.split(prefill_chunk or context, dim=1):
            out = model(input_ids=chunk, **{path.keyword: cache}, use_cache=True, logits_to_keep=1)
            cache = returned_cache(out)
    prefill_peak = meter.peak()
    token = out.logits[:, -1:].argmax(-1)
    del out
    meter.restart_peak()
    loop = path.loop(cache, token, context)
    del cache
    with Timer(device) as decode:
        loop.run(decode_tokens)
    return dict(
        context=context,
        batch=batch,
        decode_tokens=decode_tokens,
        decode_path=path.name,
        prefill_seconds=prefill.seconds,
        decode_seconds=decode.seconds,
        prefill_tokens_per_s=batch * context / prefill.seconds,
        decode_tokens_per_s=batch * decode_tokens / decode.seconds if decode_tokens else None,
        prefill_chunk=prefill_chunk,
        prefill_peak_bytes=prefill_peak,
        decode_peak_bytes=meter.peak(),
        cache_bytes=cache_bytes(loop.cache),
        memory_method=meter.method,
    )


def _measure_or_oom(
    item: Scored, path: DecodePath, context: int, batch: int, decode_tokens: int, repeats: int, seed: int, prefill_chunk: int | None
) -> dict[str, Any]:
    """The fastest of `repeats` runs (the least disturbed by other work); an out-of-memory GPU is a result too."""
    try:
        with item.mode():
            runs = [measure(item.model, context, batch, decode_tokens, seed, path, prefill_chunk) for _ in range(repeats)]
    except torch.OutOfMemoryError:
        runs = None
    if runs is None:
        # Outside the except block: until it ends, the traceback's frames keep the failed attempt's tensors alive.
        free_memory(next(item.model.parameters()).device)
        return dict(context=context, batch=batch, decode_tokens=decode_tokens, decode_path=path.name, prefill_chunk=prefill_chunk, out_of_memory=True)
    return min(runs, key=lambda r: r["prefill_seconds"] + r["decode_seconds"])


def _attempt(item: Scored, path: DecodePath, context: int, batch: int, measured: dict, **settings: Any) -> dict[str, Any]:
    """One attempt of the largest-batch search: the row `measured` holds for (context, batch) where the grid measured
    it (at 32K and batch 1,024 one measurement prefills 33M tokens), else a measurement; memory is handed back after
    it, so the next (larger) one starts from an empty allocator cache."""
    row = measured[context, batch] if (context, batch) in measured else _measure_or_oom(item, path, context, batch, **settings)
    free_memory(next(item.model.parameters()).device)
    return row


def largest_batch(attempt: Callable[[int], dict[str, Any]], start: int, cap: int, bisect: bool = True) -> dict[str, Any]:
    """The row of the largest batch up to `cap` whose `attempt(batch)` does not come back `out_of_memory`.

    Doubles from `start` (capped) until a batch does not fit or the cap does, halving instead when `start` itself
    does not fit; then, with `bisect`, halves the gap between the largest batch that fitted and the smallest that
    did not. The row is marked `largest_batch` and says what stopped the search: `limited_by` "memory", or "cap"
    when the cap fitted (more may fit). Where not even batch 1 fits, it is batch 1's out-of-memory row.

    Example:
        >>> largest_batch(lambda b: {"batch": b, "out_of_memory": b > 5}, start=1, cap=64)["batch"]
        5
    """
    fits: dict[int, dict[str, Any]] = {}
    fails: dict[int, dict[str, Any]] = {}

    def fitted(batch: int) -> bool:
        row = attempt(batch)
        (fails if row.get("out_of_memory") else fits)[batch] = row
        return batch in fits

    batch = min(start, cap)
    if fitted(batch):
        while batch < cap and fitted(batch := min(2 * batch, cap)):
            pass
    else:
        while batch > 1 and not fitted(batch := batch // 2):
            pass
    if bisect and fits and fails:
        low, high = max(fits), min(fails)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fitted(middle) else (low, middle)
    if not fits:
        return fails[min(fails)] | {"largest_batch": True}
    return fits[max(fits)] | {"largest_batch": True, "limited_by": "memory" if fails else "cap"}


def sdpa_order(names: Sequence[str] | None) -> list[SDPBackend] | None:
    """SDPA backends named in priority order ("flash", "efficient", "cudnn", "math"), checked."""
    if names is None:
        return None
    unknown = [name for name in names if name not in SDPA_BACKENDS]
    if unknown or not names:
        raise LinearizeError(
            f"unknown SDPA backend(s) {unknown or names}: name some of {', '.join(SDPA_BACKENDS)} by priority, e.g. --sdpa flash,efficient,math"
        )
    return [SDPA_BACKENDS[name] for name in names]


def decode_sdpa_names(backends: Sequence[SDPBackend] | None) -> list[str]:
    """The SDPA backends an eager decode step orders (`decode_attention`), by name, of `backends` (None: all).

    Example:
        >>> decode_sdpa_names(sdpa_order(["math", "cudnn"]))
        ['cudnn', 'math']
    """
    names = {backend: name for name, backend in SDPA_BACKENDS.items()}
    return [names[backend] for backend in DECODE_SDPA_ORDER if backends is None or backend in backends]


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
    max_batch: int | None = None,
    bisect: bool = True,
    compile: bool = False,
    prefill_chunk: int | None = None,
    sdpa_backends: Sequence[str] | None = None,
    progress: bool = True,
) -> Results:
    """Prefill and decode speed and memory of a model (and, for a converted model, its teacher via teacher_mode)
    at each context length and batch size. Defaults are small enough for a CPU; pass device="cuda" on a GPU.
    A model named by path is loaded in `dtype`, by default bfloat16 on CUDA and float32 on a CPU; a model object
    is measured in its own dtype. The dtype measured is recorded in the settings.

    `max_batch`: also find, per model and context, the largest batch up to this cap that fits (doubling from the
    largest of `batch_sizes`, then bisecting unless `bisect` is False) and record its row, marked `largest_batch`.
    On CUDA "fits" means no out-of-memory error; on a CPU, where the system's memory is overcommitted and the
    kernel ends the process rather than failing an allocation, only the cap bounds it.
    `compile`: decode through the fastest path each view supports (GraphDecoder or torch.compile; the module
    docstring says which, and every row records it as `decode_path`).
    `prefill_chunk`: prefill through the cache this many tokens at a time (see `measure`), so that the largest batch
    is bounded by what decoding holds (the cache and one chunk's working set) rather than by a whole prompt's
    activations; every row records it.
    `sdpa_backends`: SDPA backends by priority for every model ("flash", "efficient", "cudnn", "math"); None leaves
    torch's own choice.

    Example:
        >>> results = benchmark("out/smollm2-hedgehog", lengths=[512, 2048, 8000], decode_tokens=64)
        >>> results = benchmark("out/smollm2-hedgehog", device="cuda", lengths=[1024, 8192], max_batch=512, compile=True)
        >>> results = benchmark("out/smollm2-hedgehog", device="cuda", lengths=[32768], max_batch=1024, prefill_chunk=4096)
        >>> results.save("out/bench.json")
    """
    if min(batch_sizes) < 1 or decode_tokens < 0 or repeats < 1:
        raise LinearizeError("batch sizes and repeats must be at least 1, and decode tokens at least 0")
    if max_batch is not None and max_batch < 1:
        raise LinearizeError(f"the largest batch to try must be at least 1, got {max_batch}; pass e.g. --max-batch 512")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise LinearizeError(f"a prefill chunk must be at least 1 token, got {prefill_chunk}; pass e.g. --prefill-chunk 4096")
    backends = sdpa_order(sdpa_backends)
    device = resolve_device(device)
    scored = scored_models(
        model, tokenizer, teacher=teacher, name=name, dtype=default_dtype(dtype, device), device=device, need_tokenizer=False
    )
    extra = decode_tokens + (WARM_STEPS if compile else 0)  # the fast paths' warm-up steps extend the same cache
    lengths = check_lengths(lengths, scored[0].max_length, allow_longer, "benchmark", extra=extra)
    results = Results(
        settings=dict(
            lengths=lengths,
            batch_sizes=list(batch_sizes),
            decode_tokens=decode_tokens,
            repeats=repeats,
            seed=seed,
            dtype=str(next(scored[0].model.parameters()).dtype).removeprefix("torch."),
            max_batch=max_batch,
            bisect=bisect,
            compile=compile,
            prefill_chunk=prefill_chunk,
            sdpa_backends=None if sdpa_backends is None else list(sdpa_backends),
            decode_sdpa=decode_sdpa_names(backends) if device.startswith("cuda") else None,
        ),
        environment=environment(device),
    )
    searches = len(lengths) if max_batch else 0
    with progress_bar(progress) as bar, sdpa_kernel(backends, set_priority=True) if backends else nullcontext():
        for item in scored:
            results.add_model(item.entry)
            path = fastest_path(item) if compile else DecodePath(item.model)
            with item.mode():  # warm up kernels, allocator and compiler once per model view, outside the measurements
                measure(item.model, WARMUP_CONTEXT, 1, 2, seed, path)
            task = bar.add_task(f"speed {item.name} ({path.name})", total=len(lengths) * len(batch_sizes) + searches)
            measured = {}  # (context, batch): its row, which the largest-batch search takes rather than measure again
            for batch in batch_sizes:
                for context in lengths:
                    measured[context, batch] = _measure_or_oom(item, path, context, batch, decode_tokens, repeats, seed, prefill_chunk)
                    results.add(item.name, "speed", **measured[context, batch])
                    bar.advance(task)
            if max_batch:
                for context in lengths:
                    attempt = partial(
                        _attempt, item, path, context, measured=measured, decode_tokens=decode_tokens, repeats=repeats, seed=seed,
                        prefill_chunk=prefill_chunk,
                    )
                    results.add(item.name, "speed", **largest_batch(attempt, max(batch_sizes), max_batch, bisect))
                    bar.advance(task)
            bar.remove_task(task)
    return results
