"""What a batch-1 decode step costs on the host, per layer kind: ATen dispatches and milliseconds.

A 135M model's decode step on 2 CPU cores is bound by two things: reading the weights (the same for teacher and
student) and the number of small operations, each of which costs microseconds of dispatch whatever its size.
This counts, for one decode step after a prompt of `--context` random tokens, the operations that reach ATen's
dispatcher inside each attention layer (by the layer's class: the teacher's attention, or a converted mixer), and
times each kind of layer over `--steps` steps, for the teacher and the students of shipped recipes (converted as
`benchmarks/cpu_decode.py` converts them, untrained: speed does not depend on the weights).

On CUDA (`--device cuda`) a layer's milliseconds are the host's alone: its kernels are queued, not waited for, so
they measure what an eager decode step costs in Python, dispatch and kernel launches (the fused steps' Triton
launches included), the part of a batch-1 step that the GPU cannot shorten; the step's own milliseconds wait for the
GPU. `--jsonl` appends one JSON line per model.

    python benchmarks/decode_dispatches.py --recipes lolcats,hybrid_gdn --context 2048
    python benchmarks/decode_dispatches.py --device cuda --dtype bfloat16 --teacher /tmp/smollm2.gguf \
        --recipes lolcats,hybrid_gdn,hybrid_qwen3_5 --steps 50 --trace /tmp/host
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode

from cpu_decode import recipe_student  # benchmarks/, first on the path when run as a script
from linearize import load_teacher
from linearize.hf.cache import cache_keyword, returned_cache
from serving_speed import profiled_activities, sync, write_costliest


class Dispatches(TorchDispatchMode):
    """Counts the operations dispatched while each named layer runs (`where` is a stack of layer kinds)."""

    def __init__(self):
        super().__init__()
        self.where = ["other"]
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[self.where[-1]] += 1
        return func(*args, **(kwargs or {}))


def measure(model, context: int, steps: int, trace: Path | None = None, as_generate: bool = False) -> dict:
    """Dispatches per layer of each kind in one decode step, and ms per decode step, whole and per kind (on CUDA the
    host's ms per kind, the whole step's waiting for the GPU). With `trace`, one more step runs under torch.profiler
    and `trace` gets its costliest ops by self CPU time (and GPU time), each grouped by the 5 Python frames that called
    it: an op that waits for the GPU shows as self CPU time, and the frames name the line that calls it.

    A step passes the new token and the cache, as `linearize bench`'s loop does; `as_generate` also passes what
    `generate()` passes: the attention mask of every token so far (all real) and the new token's position."""
    device = next(model.parameters()).device
    counter, spent, started, layers = Dispatches(), defaultdict(float), {}, Counter()

    def enter(kind):
        def hook(module, args):
            counter.where.append(kind)
            started[kind] = time.perf_counter()

        return hook

    def leave(kind):
        def hook(module, args, output):
            spent[kind] += time.perf_counter() - started[kind]
            counter.where.pop()

        return hook

    for name, module in model.named_modules():
        if re.search(r"layers\.\d+\.(self_attn|mlp)$", name):
            kind = type(module).__name__
            layers[kind] += 1
            module.register_forward_pre_hook(enter(kind))
            module.register_forward_hook(leave(kind))
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    keyword = cache_keyword(model)  # `cache` from transformers 5.24, where `past_key_values` warns
    seen = context

    def step(cache):
        nonlocal seen
        inputs = {}
        if as_generate:
            position = torch.tensor([seen], device=device)
            inputs = dict(attention_mask=torch.ones(1, seen + 1, dtype=torch.long, device=device), position_ids=position[None], cache_position=position)
        seen += 1
        return returned_cache(model(token, **{keyword: cache}, use_cache=True, **inputs))

    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(3):  # warm-up steps
            cache = step(cache)
        sync(device)
        spent.clear()
        begin = time.perf_counter()
        for _ in range(steps):
            cache = step(cache)
        sync(device)
        step_ms = (time.perf_counter() - begin) / steps * 1000
        with counter:
            cache = step(cache)
        if trace is not None:
            with profile(activities=profiled_activities(device), with_stack=True) as prof:
                step(cache)
                sync(device)
            write_costliest(prof.key_averages(group_by_stack_n=5), device, trace, rows=40)
    return {
        "step_ms": step_ms,
        "dispatches_outside_layers": counter.calls["other"],
        "layers": {kind: {"count": n, "dispatches": counter.calls[kind] / n, "ms": spent[kind] / steps * 1000 / n} for kind, n in layers.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="lolcats,hybrid_gdn", help="shipped recipes whose students are measured, comma-separated")
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens before the measured decode steps")
    parser.add_argument("--steps", type=int, default=10, help="decode steps timed")
    parser.add_argument("--teacher", default="smollm2-135m", help="the teacher: id, folder or .gguf")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--jsonl", default=None, help="append each model's result to this file as a JSON line")
    parser.add_argument("--trace", default=None, help="folder: one more decode step per model under torch.profiler, its "
                        "costliest ops (by self CPU and GPU time, grouped by calling line) into FOLDER/MODEL.txt")
    parser.add_argument("--as-generate", action="store_true", help="pass each step the attention mask and position "
                        "generate() passes (default: the token and the cache alone, as `linearize bench` decodes)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    for name in ["teacher", *args.recipes.split(",")]:
        teacher, _ = load_teacher(args.teacher)
        model = (teacher if name == "teacher" else recipe_student(teacher, name)).to(device, dtype).eval()
        trace = None
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            trace = Path(args.trace) / f"{name}.txt"
        result = measure(model, args.context, args.steps, trace, args.as_generate)
        kinds = ", ".join(f"{kind} x {r['count']}: {r['dispatches']:.0f} dispatches, {r['ms']:.2f} ms" for kind, r in result["layers"].items())
        print(f"{name}: {result['step_ms']:.1f} ms per step; per layer: {kinds}; outside the layers: {result['dispatches_outside_layers']}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as out:
                out.write(json.dumps({"model": name, "device": args.device, "dtype": args.dtype, "context": args.context,
                                      "as_generate": args.as_generate, **result}) + "\n")


if __name__ == "__main__":
    main()
