"""Prefill and decode speed and peak memory against context length, teacher vs every mixer, in one run.

Random weights at the real architectures (built locally from their configs), bf16 on CUDA. The teacher is
the unconverted model with SDPA (FlashAttention on Hopper) and the usual dynamic KV cache; students are
converted copies. Decode is an eager loop, one token per step with the model's cache, greedy, after a
cache filled to the context length (see `filled_cache`); prefill keeps only the last position's logits
(a 64K x 128K-vocabulary logits tensor would not fit). Batch-1 latency is also measured with each step
replayed from a CUDA graph (students: `linearize.decode.GraphDecoder`; teacher: transformers' compiled
static cache) and compared with the memory-bandwidth floor.

    python benchmarks/speed.py --arch smollm2-135m --out results/speed_smollm2.json
    python benchmarks/speed.py --arch llama-3.2-1b --prefill 1024,8192,32768,65536 --decode-context 1024,32768

On CPU it runs with tiny defaults (`--arch tiny`) so the script itself can be checked anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import linearize
from linearize.decode import GraphDecoder
from linearize.hf.cache import cache_keyword, returned_cache

ARCHS = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
}


def build(arch: str, mixer: str, device, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(**ARCHS[arch], attn_implementation="sdpa")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    if mixer != "teacher":
        model = linearize.convert(model, mixer)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, context: int, batch: int, device) -> float:
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, context), device=device)
    model(ids, use_cache=True, logits_to_keep=1)  # warm-up (kernels compile and autotune here)
    sync(device)
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    sync(device)
    return batch * context / (time.perf_counter() - start)


def filled_cache(model, context: int, batch: int, device):
    """A cache as it stands after `context` tokens, without paying for a prefill of batch x context tokens.

    The teacher's cache gets `context` random keys and values per layer (what a prefill would leave, in
    size); a student's state is shaped and filled by a real prefill of min(context, 1024) tokens, since its
    size does not depend on the context. Decode cost per step is what is measured, so this is enough.
    """
    config = model.config.get_text_config()
    if not hasattr(model, "new_cache"):
        cache = DynamicCache(config=config)
        shape = (batch, config.num_key_value_heads, context, config.head_dim)
        for layer in range(config.num_hidden_layers):
            cache.update(torch.randn(shape, device=device, dtype=model.dtype), torch.randn(shape, device=device, dtype=model.dtype), layer)
        return cache
    ids = torch.randint(0, config.vocab_size, (batch, min(context, 1024)), device=device)
    cache = model.new_cache()
    model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return cache


@torch.no_grad()
def decode(model, context: int, batch: int, steps: int, device) -> tuple[float, float]:
    """Decode tokens/s at `context` tokens of history, and peak memory (GiB) while decoding."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = filled_cache(model, context, batch, device)
    token = torch.randint(0, model.config.get_text_config().vocab_size, (batch, 1), device=device)
    position = torch.full((batch, 1), context, device=device)
    keyword = cache_keyword(model)
    for warm in range(3):
        out = model(token, **{keyword: cache}, position_ids=position + warm, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        out = model(token, **{keyword: cache}, position_ids=position + 3 + step, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return batch * steps / seconds, peak


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (bytes read plus bytes written)."""
    x = torch.randn(256 * 2**20, device=device)  # 1 GiB of float32
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * x.element_size() * 10 / (time.perf_counter() - start)


@torch.no_grad()
def graph_decode(model, context: int, steps: int, device) -> float:
    """Batch-1 decode tokens/s with each step replayed from a CUDA graph (fully converted models)."""
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, context), device=device)
    decoder = GraphDecoder(model)
    decoder.generate(ids, 8, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    decoder.generate(ids, steps + 8, ignore_eos=True)
    sync(device)
    full = time.perf_counter() - start
    start = time.perf_counter()
    decoder.generate(ids, 8, ignore_eos=True)
    sync(device)
    return steps / (full - (time.perf_counter() - start))


@torch.no_grad()
def static_teacher_decode(model, context: int, steps: int, device) -> float:
    """Batch-1 decode tokens/s of the teacher through transformers' static cache (compiled, CUDA graphs)."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    settings = dict(do_sample=False, cache_implementation="static", min_new_tokens=steps, max_new_tokens=steps)
    model.generate(ids, **settings)
    model.generate(ids, **settings)
    sync(device)
    start = time.perf_counter()
    model.generate(ids, **settings)
    sync(device)
    full = time.perf_counter() - start
    settings.update(min_new_tokens=1, max_new_tokens=1)
    start = time.perf_counter()
    model.generate(ids, **settings)
    sync(device)
    return (steps - 1) / (full - (time.perf_counter() - start))


def largest_batch(model, context: int, device, start: int, limit: int) -> int:
    """The largest power-of-two batch (<= limit) whose prefill + a few decode steps fit in memory."""
    best, batch = 0, start
    while batch <= limit:
        try:
            decode(model, context, batch, 2, device)
            best = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="smollm2-135m" if torch.cuda.is_available() else "tiny", choices=sorted(ARCHS))
    parser.add_argument("--mixers", default="teacher," + ",".join(sorted(set(linearize.MIXERS) - {"attention"})))
    parser.add_argument("--prefill", default="1024,4096,8192,16384,32768,65536")
    parser.add_argument("--decode-context", default="1024,8192,32768")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--max-batch-context", type=int, default=32768, help="context for the largest-batch throughput test (0: skip)")
    parser.add_argument("--batch-limit", type=int, default=1024)
    parser.add_argument("--latency-context", type=int, default=4096, help="context for the batch-1 latency test (0: skip)")
    parser.add_argument("--static-teacher", action="store_true", help="also time the teacher with a compiled static cache")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        args.prefill, args.decode_context, args.max_batch_context, args.steps = "64,128", "64,128", 0, 4
    results = {"arch": args.arch, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype), "rows": []}
    if device.type == "cuda":
        results["copy_bandwidth_gbs"] = copy_bandwidth(device) / 1e9
    else:
        args.latency_context = 0
    for mixer in args.mixers.split(","):
        model = build(args.arch, mixer, device, dtype)
        row = {"model": mixer, "prefill": {}, "decode": {}, "peak_gib": {}}
        for context in map(int, args.prefill.split(",")):
            try:
                row["prefill"][context] = prefill(model, context, 1, device)
            except torch.OutOfMemoryError:
                row["prefill"][context] = None
            gc.collect()
        for context in map(int, args.decode_context.split(",")):
            try:
                row["decode"][context], row["peak_gib"][context] = decode(model, context, 1, args.steps, device)
            except torch.OutOfMemoryError:
                row["decode"][context] = row["peak_gib"][context] = None
            gc.collect()
        if args.latency_context:
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            row["latency"] = {"context": args.latency_context, "weight_bytes": weights}
            try:
                if mixer == "teacher":
                    text = model.config
                    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * args.latency_context * 2
                    row["latency"]["state_bytes"] = kv
                    if args.static_teacher:
                        row["latency"]["graph_tokens_per_s"] = static_teacher_decode(model, args.latency_context, args.steps, device)
                else:
                    cache = returned_cache(model(torch.zeros(1, 64, dtype=torch.long, device=device), use_cache=True))
                    row["latency"]["state_bytes"] = sum(cache.state_bytes())
                    row["latency"]["graph_tokens_per_s"] = graph_decode(model, args.latency_context, args.steps, device)
            except Exception as error:  # a capture failure is a finding to report, not a reason to stop the run
                row["latency"]["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            floor = (row["latency"]["weight_bytes"] + row["latency"].get("state_bytes", 0)) / (results["copy_bandwidth_gbs"] * 1e9)
            row["latency"]["floor_ms"] = floor * 1e3
        if args.max_batch_context:
            start = 1 if mixer == "teacher" else 8
            batch = largest_batch(model, args.max_batch_context, device, start, args.batch_limit)
            if batch:
                tps, peak = decode(model, args.max_batch_context, batch, args.steps, device)
                row["max_batch"] = {"context": args.max_batch_context, "batch": batch, "decode_tokens_per_s": tps, "peak_gib": peak}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every model, so a run stopped at its time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
