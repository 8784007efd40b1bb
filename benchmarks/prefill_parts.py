"""Where one converted layer's prefill spends its time, part by part, beside the teacher's attention layer: the host's
milliseconds to launch each part (what a batch-1 prefill at 2K-8K waits on) and the device's milliseconds to run it
(what a 32K prefill waits on). With --variants, the gated delta rule is also timed as fla could take it otherwise: q, k
and v in float32 (as the mixers passed them before fla read the model's dtype), and with fla's own q/k L2 norm
(`use_qk_l2norm_in_kernel`), and the short convolution as K shifted products in PyTorch (LINEARIZE_FUSED_STEP=off: its
path before triton_conv.py).

Random weights at SmolLM2-135M's shape (one decoder layer), batch 1, no padding, no cache: the parts of
`GatedDeltaNetMixer.mix` called one by one (projections, short convolution, L2 norm, kv-head repeat, gates, the gated
delta rule, the sliding window and its mix), then the whole attention module converted and under teacher_mode.
Each figure is the median of --repeats calls after a warm-up call (kernels compile on their first call at a shape).

    python benchmarks/prefill_parts.py --device cuda --lengths 2048,8192,32768 --variants --out prefill_parts.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import linearize
from linearize.hf import kernel_dispatch
from linearize.hf.attention import repeat_heads
from linearize.hf.mixers import mixers_in
from linearize.hf.windows import add_window
from serving_speed import emit  # benchmarks/, the script's own folder, is on sys.path

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, max_position_embeddings=32768, rope_theta=100000.0)


def timed(function, device: torch.device, repeats: int) -> tuple[float, float]:
    """(host ms until `function` returns, device ms until its work is done): medians of `repeats` calls after one
    warm-up. On CPU both are the wall time."""
    function()
    hosts, devices = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        function()
        hosts.append((time.perf_counter() - began) * 1e3)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            devices.append(start.elapsed_time(end))
        else:
            devices.append(hosts[-1])
    return statistics.median(hosts), statistics.median(devices)


def parts(mixer, hidden, position_embeddings, variants: bool) -> dict:
    """Name -> a call of one part of `mixer`'s prefill on `hidden` (each fed the previous parts' outputs)."""
    q, k, v = mixer.project(hidden)
    cq, ck, cv, _ = mixer.convolve(q, k, v, None, None)
    nq, nk = F.normalize(cq, dim=-1), F.normalize(ck, dim=-1)
    groups = mixer.spec.groups
    rk, rv = repeat_heads(nk, groups), repeat_heads(cv, groups)
    beta, g = mixer.gates(hidden, None)
    dtype = hidden.dtype
    out, _ = kernel_dispatch.gated_delta_rule(nq, rk, rv, g, beta, 1.0, dtype=dtype)
    share = torch.sigmoid(mixer.window_logit.to(out.dtype))
    calls = {
        "projections": lambda: mixer.project(hidden),
        "short convolution": lambda: mixer.convolve(q, k, v, None, None),
        "L2 norm of q and k": lambda: (F.normalize(cq, dim=-1), F.normalize(ck, dim=-1)),
        "kv-head repeat": lambda: (repeat_heads(nk, groups), repeat_heads(cv, groups)),
        "gates": lambda: mixer.gates(hidden, None),
        f"gated delta rule ({dtype} inputs to fla, as called)": lambda: kernel_dispatch.gated_delta_rule(nq, rk, rv, g, beta, 1.0, dtype=dtype),
        "window and mix": lambda: add_window(mixer.spec, mixer.window, out, share, q, k, v, position_embeddings, None, None),
        "mixer, whole": lambda: mixer.mix(hidden, q, k, v, position_embeddings, None, None),
        "attention module, converted": lambda: mixer(hidden, position_embeddings=position_embeddings, attention_mask=None),
    }
    if variants and kernel_dispatch.fla_problem() is None and hidden.is_cuda:
        calls[f"gated delta rule ({nq.dtype} inputs to fla)"] = lambda: kernel_dispatch.gated_delta_rule(nq, rk, rv, g, beta, 1.0)
        raw = kernel_dispatch._bthd(dtype, cq, repeat_heads(ck, groups), rv, beta) + kernel_dispatch._bthd(torch.float32, g)
        calls[f"fla, {dtype} inputs, L2 norm in the kernel"] = lambda: kernel_dispatch.fla_chunk_gated_delta_rule(
            raw[0], raw[1], raw[2], g=raw[4], beta=raw[3], scale=1.0, use_qk_l2norm_in_kernel=True
        )
        calls["short convolution, PyTorch products"] = lambda: fused_off(mixer.convolve, q, k, v, None, None)
    return calls


def fused_off(function, *args):
    """`function(*args)` with linearize's fused kernels off (LINEARIZE_FUSED_STEP=off), the switch restored after."""
    with mock.patch.dict(os.environ, {"LINEARIZE_FUSED_STEP": "off"}):
        return function(*args)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", action="store_true", help="also the gated delta rule as fla could take it")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SMOLLM2)).to(dtype).eval()
    model = linearize.convert(teacher, "gated_deltanet", window=args.window).to(device)
    (mixer,) = mixers_in(model)
    rotary = next(module for name, module in model.named_modules() if name.endswith("rotary_emb"))
    out = open(args.out, "a") if args.out else None
    for length in (int(n) for n in args.lengths.split(",")):
        hidden = torch.randn(1, length, SMOLLM2["hidden_size"], device=device, dtype=dtype)
        position_embeddings = rotary(hidden, torch.arange(length, device=device)[None])
        calls = parts(mixer, hidden, position_embeddings, args.variants)
        calls["attention module, teacher"] = lambda: mixer(hidden, position_embeddings=position_embeddings, attention_mask=None)
        for name, call in calls.items():  # each row as it is measured: a run cut short keeps them
            with linearize.teacher_mode(model) if name.endswith("teacher") else contextlib.nullcontext():
                host, busy = timed(call, device, args.repeats)
            emit({"length": length, "part": name, "host_ms": round(host, 3), "device_ms": round(busy, 3), "dtype": args.dtype}, device, out)


if __name__ == "__main__":
    main()
