"""What one decode step's SDPA call costs the host on CUDA, by how its keys grow and which backend runs it.

`decode_dispatches.py --trace` on an H200 (nineteenth session) found `aten::_cudnn_attention_forward` taking 2 to 5 ms
of host time per call in eager decode steps, most of a step, while a kept layer's GPU time was some 28 us. cuDNN builds
an execution graph per problem shape; a decode step's key length is new at every step. This times SDPA alone, on a
SmolLM2-135M layer's shapes (9 query heads, 3 kv heads, head size 64, bf16, batch 1), over `--steps` calls whose key
length grows by one per call (as decoding does) or stays at the context (a repeated shape), for the layouts the
project's layers call it with:

    gqa      q (1, 9, 1, 64), keys (1, 3, S, 64), enable_gqa=True, no mask (transformers' SDPA without a mask)
    packed   q (1, 3, 3, 64), keys as they are, no mask (`qwen3_5_attention`'s decode step)
    masked   q (1, 9, 1, 64), keys repeated to 9 heads, a boolean key mask (transformers' SDPA with a mask)

each under torch's own choice of backend and with cuDNN left out (`sdpa_kernel` with flash, efficient and math in
that priority). Keys are views of a buffer with room, as `RoomyLayer` keeps them, contiguous copies, or views of a
(B, S, H, D) buffer ("bshd"). cuDNN keeps the graphs it builds for the process: every growing row meets key lengths
no row before it used, and a fixed row's warm-up builds its one shape first (`row_lengths`; in the twentieth session's
run, before this, rows of one layout shared lengths). Per row: host microseconds per call (the calls queued, not
waited for), microseconds per call with the GPU waited for at the end, and the backend torch ran (from the
profiler's op names).

torch's cuDNN attention (aten/src/ATen/native/cudnn/MHA.cpp) caches one execution graph per key of q, k and v's sizes
and strides, so every new key length builds a graph; with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (experimental, read once
per process) and q, k, v in (B, S, H, D) memory it rounds the lengths up to a power of two instead. A second run with
that variable set measures it on the "bshd" rows:

    python benchmarks/sdpa_decode.py --context 2048 --steps 50 --out sdpa_decode.jsonl
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python benchmarks/sdpa_decode.py --context 2048 --steps 50 --out sdpa_decode.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from linearize.evaluate.speed import sdpa_order

NO_CUDNN = sdpa_order(["flash", "efficient", "math"])  # as `linearize bench --sdpa flash,efficient,math` orders them


def call(layout: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One SDPA call of `layout` on q (1, 9, 1, D) and keys/values (1, 3, S, D)."""
    if layout == "gqa":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if layout == "packed":
        return F.scaled_dot_product_attention(q.reshape(1, 3, 3, q.shape[-1]), k, v)
    mask = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask)


STORAGES = ("room view", "contiguous", "bshd")


WARM_CALLS = 4


def row_lengths(context: int, steps: int, row: int, grow: bool) -> tuple[list[int], list[int]]:
    """Key lengths of row `row`'s untimed warm-up calls and timed calls. cuDNN keeps its graphs for the whole process,
    so each row starts `steps + 2 * WARM_CALLS` positions after the one before: a growing row meets only lengths no
    row has used (the cost a decode step pays), its warm-up others again; a fixed row's warm-up is its timed shape,
    so its calls find a graph built (a repeated shape)."""
    first = context + row * (steps + 2 * WARM_CALLS)
    if not grow:
        return [first] * WARM_CALLS, [first] * steps
    return [first - WARM_CALLS - i for i in range(WARM_CALLS)], [first + i for i in range(steps)]


def keys(lengths: list[int], storage: str, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values (1, 3, S, 64) for each length S: views of one (B, H, S, D) buffer with room for the longest,
    contiguous copies, or views of one (B, S, H, D) buffer."""
    if storage == "bshd":
        full = torch.randn(2, 1, max(lengths), 3, 64, device=device, dtype=torch.bfloat16).transpose(2, 3)
    else:
        full = torch.randn(2, 1, 3, max(lengths), 64, device=device, dtype=torch.bfloat16)
    views = [(full[0, :, :, :n], full[1, :, :, :n]) for n in lengths]
    return [(k.contiguous(), v.contiguous()) for k, v in views] if storage == "contiguous" else views


def backend_ran(layout: str, q, k, v) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call(layout, q, k, v)
    names = [e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product_") or e.name.startswith("aten::_efficient")]
    return ",".join(sorted(set(names))) or "math"


def measure(layout: str, no_cudnn: bool, grow: bool, storage: str, context: int, steps: int, row: int, device) -> dict:
    q = torch.randn(1, 9, 1, 64, device=device, dtype=torch.bfloat16)
    warm_lengths, timed_lengths = row_lengths(context, steps, row, grow)
    warm, timed = keys(warm_lengths, storage, device), keys(timed_lengths, storage, device)
    with sdpa_kernel(NO_CUDNN, set_priority=True) if no_cudnn else nullcontext():
        for k, v in warm:
            call(layout, q, k, v)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for k, v in timed:
            call(layout, q, k, v)
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        ran = backend_ran(layout, q, *timed[-1])
    return {"layout": layout, "backends": "no cudnn" if no_cudnn else "torch's choice", "keys": "growing" if grow else "fixed",
            "storage": storage, "avoid_recompile": os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", ""), "context": context, "host_us_per_call": 1e6 * host / steps,
            "us_per_call": 1e6 * total / steps, "ran": ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048, help="key length of the first timed call")
    parser.add_argument("--steps", type=int, default=50, help="calls timed per row")
    parser.add_argument("--out", default=None, help="append each row to this file as a JSON line")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sdpa_decode.py measures CUDA's SDPA backends; run it on a machine with a GPU")
    device = torch.device("cuda")
    cases = [(layout, no_cudnn, grow, storage) for layout in ("gqa", "packed", "masked") for no_cudnn in (False, True)
             for grow in (True, False) for storage in STORAGES]
    for index, (layout, no_cudnn, grow, storage) in enumerate(cases):
        row = measure(layout, no_cudnn, grow, storage, args.context, args.steps, index, device)
        print(f"{layout:6s} {row['backends']:14s} {row['keys']:7s} {row['storage']:10s}: "
              f"host {row['host_us_per_call']:8.1f} us, total {row['us_per_call']:8.1f} us per call; {row['ran']}", flush=True)
        if args.out:
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
