"""What one converted layer's batch-1 decode step costs on a GPU, with the fused Triton step and without it.

A random model of a given shape (default SmolLM2-135M's, `serving_speed.SHAPES`) is converted to `--mixer`, one of the
mixers with a fused step (`gated_deltanet` by default, `gla`, `mamba2`, `hedgehog_swa`; window 64 by default, as the
shipped recipes use them, but `lolcats`'s `hedgehog_swa` has 256: `--window 256`) and prefilled with `--context`
random tokens; then layer 0's attention module is called again and again with the inputs of one decode step (the state
moves on at each call, its shapes do not), and the whole model's decode step is timed too. Per path, one JSON line:
microseconds per layer call (wall, `--calls` calls between two synchronisations: host and GPU together, as eager
decoding pays them), GPU kernels per layer call (torch.profiler), and the same two for a whole decode step. The paths:
- `fused`: the fused step (`linearize/hf/triton_step.py`; LINEARIZE_FUSED_STEP=auto);
- `unfused`: today's PyTorch path with fla's recurrent kernel (LINEARIZE_FUSED_STEP=off);
- `torch`: the PyTorch path alone (LINEARIZE_KERNELS=torch);
- `teacher`: the teacher's softmax attention with the same weights (`teacher_mode`), for comparison.

    python benchmarks/fused_step.py --context 2048 --out fused_step.jsonl
    python benchmarks/fused_step.py --mixer gla --context 2048 --out fused_step.jsonl
    python benchmarks/fused_step.py --mixer hedgehog_swa --window 256 --context 2048 --out fused_step.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

import linearize
from linearize.hf import triton_step
from linearize.hf.mixers import mixers_in
from serving_speed import SHAPES  # benchmarks/, first on the path when run as a script

PATHS = {
    "fused": {"LINEARIZE_FUSED_STEP": "auto", "LINEARIZE_KERNELS": "auto"},
    "unfused": {"LINEARIZE_FUSED_STEP": "off", "LINEARIZE_KERNELS": "auto"},
    "torch": {"LINEARIZE_FUSED_STEP": "auto", "LINEARIZE_KERNELS": "torch"},
    "teacher": {"LINEARIZE_FUSED_STEP": "auto", "LINEARIZE_KERNELS": "auto"},
}


def layer_inputs(model, layer, context: int, device) -> tuple[tuple, dict, object, torch.Tensor]:
    """(args, kwargs) of `layer`'s call in one decode step after a `context`-token prompt, the cache, and the token."""
    seen = {}

    def keep(module, args, kwargs):
        seen["call"] = (args, dict(kwargs))

    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    cache = model.new_cache()
    token = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
    model(token, cache=cache, use_cache=True)
    handle.remove()
    return *seen["call"], cache, token


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call, calls: int, device) -> tuple[float, float]:
    """Microseconds per call (wall, between two synchronisations) and GPU kernels per call (profiled)."""
    for _ in range(10):
        call()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    sync(device)
    micros = (time.perf_counter() - start) / calls * 1e6
    profiled = 10
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            call()
        sync(device)
    kernels = sum(e.device_type == DeviceType.CUDA for e in prof.events()) / profiled
    return micros, kernels


@torch.no_grad()
def measure(model, path: str, context: int, calls: int, device) -> dict:
    os.environ.update(PATHS[path])
    with linearize.teacher_mode(model) if path == "teacher" else nullcontext():
        layer = mixers_in(model)[0]
        args, kwargs, cache, token = layer_inputs(model, layer, context, device)
        if path == "teacher":  # the same step at every call: each call's key and value leave the KV cache again
            kv = cache.layers[layer.layer_idx]
            layer_us, layer_kernels = timed(lambda: (layer(*args, **kwargs), kv.crop(-1)), calls, device)
        else:
            layer_us, layer_kernels = timed(lambda: layer(*args, **kwargs), calls, device)
        step_us, step_kernels = timed(lambda: model(token, cache=cache, use_cache=True), max(calls // 10, 10), device)
    return {"path": path, "layer_us": round(layer_us, 1), "layer_kernels": layer_kernels, "step_us": round(step_us, 1), "step_kernels": step_kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="the random model's shape")
    parser.add_argument("--mixer", default="gated_deltanet", choices=sorted(triton_step.OPS), help="the mixer every layer is converted to")
    parser.add_argument("--window", type=int, default=64, help="the converted layers' window (0: none)")
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens before the measured decode steps")
    parser.add_argument("--calls", type=int, default=200, help="layer calls timed per path")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (no kernels, no fused step)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SHAPES[args.shape]))
    model = linearize.convert(teacher.to(device, getattr(torch, args.dtype)).eval(), args.mixer, window=args.window)
    for path in args.paths.split(","):
        row = {"mixer": args.mixer, "shape": args.shape, "window": args.window, "context": args.context, "dtype": args.dtype, **measure(model, path, args.context, args.calls, device)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
