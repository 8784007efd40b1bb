"""Where one converted layer's prefill spends its time, part by part, beside the teacher's attention layer: the host's
milliseconds to launch each part (what a batch-1 prefill at 2K-8K waits on) and the device's milliseconds to run it
(what a 32K prefill waits on). With --variants, the gated delta rule is also timed as fla could take it otherwise: q, k
and v in float32 (as the mixers passed them before fla read the model's dtype), and with fla's own q/k L2 norm
(`use_qk_l2norm_in_kernel`), and the short convolution as K shifted products in PyTorch (LINEARIZE_FUSED_STEP=off: its
path before triton_conv.py); `hedgehog_swa`'s RoPE and prefix states in PyTorch (their paths before triton_rope.py and
the prefix kernels; with --model, the whole student too), its prefix sums in ieee float32, its feature maps at other blocks,
warps and precisions, and its prefill kernel at other blocks and warps.

Random weights at SmolLM2-135M's shape (one decoder layer), batch 1, no padding: the parts of the mixer's `mix`
called one by one, then the whole attention module converted and under teacher_mode. `--mixer gated_deltanet`
(projections, short convolution, L2 norm, kv-head repeat, gates, the gated delta rule, the sliding window and its mix;
no cache) or `--mixer hedgehog_swa` (`lolcats`' mixer: projections, RoPE, feature maps, the prefix states, the prefill
kernel, the next state a cache keeps; with a cache, as `generate()`'s prefill runs it); any other mixer (e.g.
`bamba_mamba2`, whose student prefilled at 0.83x its teacher at 32K) is timed whole. `--model` adds the whole
30-layer model's prefill (last position's logits only, a cache as `generate()` makes), student and teacher, and the
student's costliest GPU kernels under torch.profiler at the longest length.
Each figure is the median of --repeats calls after a warm-up call (kernels compile on their first call at a shape).

    python benchmarks/prefill_parts.py --device cuda --lengths 2048,8192,32768 --variants --out prefill_parts.jsonl
    python benchmarks/prefill_parts.py --device cuda --mixer hedgehog_swa --options linear_rope=false \\
        --lengths 4096,32768 --model --out prefill_parts.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from functools import partial
from unittest import mock

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

import linearize
from linearize.hf import attention, kernel_dispatch, triton_features, triton_window
from linearize.hf.attention import apply_rotary, repeat_heads
from linearize.hf.cache import cache_keyword
from linearize.hf.mixers import mixers_in
from linearize.hf.ops_window import _with_context
from linearize.hf.windows import add_window
from serving_speed import emit  # benchmarks/, the script's own folder, is on sys.path

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
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


def parts(mixer, hidden, position_embeddings, variants: bool, new_cache) -> dict:
    """Name -> a call of one part of a `gated_deltanet` mixer's prefill on `hidden` (each fed the previous parts' outputs)."""
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


def hedgehog_swa_parts(mixer, hidden, position_embeddings, variants: bool, new_cache) -> dict:
    """Name -> a call of one part of a `hedgehog_swa` mixer's prefill with a cache on `hidden`, as `mix` makes it."""
    q, k, v = mixer.project(hidden)
    rq, rk = apply_rotary(q, k, position_embeddings)
    features = (lambda: (mixer.feature_q(rq), mixer.feature_k(rk))) if mixer.options.linear_rope else (lambda: (mixer.feature_q(q), mixer.feature_k(k)))
    fq, fk = features()
    share = torch.sigmoid(mixer.window_logit.float())
    heads = q.shape[1]
    k_all, v_all, fk_all, mask, S, z = _with_context(rq, rk, v, fk, None, None)
    sm, ln = triton_window._weights(share, heads, q), triton_window._weights(1.0 - share, heads, q)
    prefix = triton_window.prefix_states(fk_all, v_all, mask, S, z, triton_window.CHUNK, False)
    scaling, softcap, window = mixer.spec.scaling, mixer.spec.softcap, mixer.window
    calls = {
        "projections": lambda: mixer.project(hidden),
        "RoPE": lambda: apply_rotary(q, k, position_embeddings),
        "feature maps": features,
        "the window's context (concatenated)": lambda: _with_context(rq, rk, v, fk, None, None),
        "prefix states": lambda: triton_window.prefix_states(fk_all, v_all, mask, S, z, triton_window.CHUNK, False),
        "prefill kernel": lambda: triton_window._forward(rq, k_all, v_all, fq, fk_all, mask, *prefix, sm, ln, window, scaling, softcap),
        "next state": lambda: triton_window.state_after(k_all, v_all, fk_all, mask, *prefix, window, False),
        "mixer, whole, no cache": lambda: mixer.mix(hidden, q, k, v, position_embeddings, None, None),
        "attention module, converted, with a cache": lambda: mixer(
            hidden, position_embeddings=position_embeddings, attention_mask=None, cache=new_cache()
        ),
    }
    if variants and hidden.is_cuda:
        calls["RoPE, PyTorch (before triton_rope.py)"] = lambda: fused_off(apply_rotary, q, k, position_embeddings)
        calls["prefix states, PyTorch (before the prefix kernels)"] = lambda: triton_window._prefix_sums(fk_all, v_all, mask, S, z, triton_window.CHUNK, False)
        with_sums = partial(triton_window.prefix_states, fk_all, v_all, mask, S, z, triton_window.CHUNK, False)
        calls["prefix states, sums in ieee float32"] = partial(patched, triton_window, {"SUM_PRECISION": "ieee"}, with_sums)
        for block, warps, precision in ((64, 4, "ieee"), (64, 4, "tf32x3"), (128, 8, "ieee"), (32, 4, "ieee")):
            calls[f"feature maps, blocks of {block}, {warps} warps, {precision}"] = partial(
                patched, triton_features, {"BLOCK": block, "WARPS": warps, "PRECISION": precision}, features
            )
        for block, warps in ((32, 4), (64, 8)):
            calls[f"prefill kernel, blocks of {block}, {warps} warps"] = partial(
                kernel_at, block, warps, rq, k_all, v_all, fq, fk_all, mask, *prefix, sm, ln, window, scaling, softcap
            )
    return calls


def patched(module, values: dict, function, *args):
    """`function(*args)` with `module`'s globals set to `values`, restored after."""
    with mock.patch.multiple(module, **values):
        return function(*args)


def kernel_at(block, warps, *args):
    """`triton_window`'s forward (`_forward`'s arguments) with `block` queries a program and keys a tile, on `warps` warps."""
    with mock.patch.dict(triton_window.FORWARD, {args[0].dtype: (block, warps)}):
        return triton_window._forward(*args)


def module_parts(mixer, hidden, position_embeddings, variants: bool, new_cache) -> dict:
    """Name -> the whole of any other mixer's prefill: its `mix` without a cache, and its attention module with one."""
    q, k, v = mixer.project(hidden)
    return {
        "mixer, whole, no cache": lambda: mixer.mix(hidden, q, k, v, position_embeddings, None, None),
        "attention module, converted, with a cache": lambda: mixer(
            hidden, position_embeddings=position_embeddings, attention_mask=None, cache=new_cache()
        ),
    }


# Mixers timed part by part; any other is timed whole (`module_parts`).
PARTS = {"gated_deltanet": parts, "hedgehog_swa": hedgehog_swa_parts}


def mixer_options(name: str, window: int, options: dict) -> dict:
    """`options` with the window, for a mixer that takes one."""
    takes = {field.name for field in dataclasses.fields(linearize.MIXERS[name].Options)}
    return {"window": window, **options} if "window" in takes else options


def fused_off(function, *args):
    """`function(*args)` with linearize's fused kernels off (LINEARIZE_FUSED_STEP=off), the switch restored after."""
    with mock.patch.dict(os.environ, {"LINEARIZE_FUSED_STEP": "off"}):
        return function(*args)


def prefill(model, ids, keyword: str):
    """`generate()`'s prefill: a fresh cache, the last position's logits."""
    return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{keyword: model.new_cache()})


def before_fused_rope_and_prefix_states() -> contextlib.ExitStack:
    """RoPE and `hedgehog_swa`'s prefix states in PyTorch, as before triton_rope.py and the prefix kernels."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(attention, "rotary_problem", lambda *args: "off"))
    stack.enter_context(mock.patch.object(triton_window, "_prefix_kernels", triton_window._prefix_sums))
    return stack


def whole_model(model, lengths: list[int], device, repeats: int, dtype: str, out, trace_rows: int, variants: bool) -> None:
    """The whole model's prefill as `generate()` runs it (a fresh cache, the last position's logits), student and
    teacher (with `variants`, the student also with RoPE and the prefix states in PyTorch), and the student's costliest
    kernels under torch.profiler at the longest length."""
    vocab, keyword = model.get_input_embeddings().num_embeddings, cache_keyword(model)
    contexts = {"student": contextlib.nullcontext, "teacher": partial(linearize.teacher_mode, model)}
    if variants:
        contexts["student, RoPE and prefix states in PyTorch"] = before_fused_rope_and_prefix_states
    for length in lengths:
        ids = torch.randint(0, vocab, (1, length), device=device)
        call = partial(prefill, model, ids, keyword)
        for name, context in contexts.items():
            with context():
                host, busy = timed(call, device, repeats)
            emit({"length": length, "part": f"whole model, {name}", "host_ms": round(host, 3), "device_ms": round(busy, 3),
                  "tokens_per_s": round(length / busy * 1e3), "dtype": dtype}, device, out)
    if device.type == "cuda" and trace_rows:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            prefill(model, ids, keyword)
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
        kernels.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in kernels)
        emit({"length": lengths[-1], "part": "whole model, student, kernels", "device_ms": round(total / 1e3, 3),
              "kernels": [{"name": e.key[:120], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 3)} for e in kernels[:trace_rows]]},
             device, out)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mixer", default="gated_deltanet", choices=sorted(linearize.MIXERS),
                        help="gated_deltanet and hedgehog_swa are timed part by part, any other mixer whole")
    parser.add_argument("--options", default="", help="the mixer's options besides the window, key=value,...")
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", action="store_true", help="also the gated delta rule as fla could take it, or "
                        "hedgehog_swa's parts in PyTorch and its kernels at other blocks, warps and precisions")
    parser.add_argument("--model", action="store_true", help="also the whole 30-layer model's prefill, student and teacher")
    parser.add_argument("--trace-rows", type=int, default=25, help="with --model: the student's costliest kernels kept")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    options = dict(pair.split("=", 1) for pair in args.options.split(",") if pair)
    lengths = [int(n) for n in args.lengths.split(",")]
    out = open(args.out, "a") if args.out else None
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **(SMOLLM2 | {"num_hidden_layers": 1}))).to(dtype).eval()
    model = linearize.convert(teacher, args.mixer, **mixer_options(args.mixer, args.window, options)).to(device)
    mixer = mixers_in(model)[0]
    rotary = next(module for name, module in model.named_modules() if name.endswith("rotary_emb"))
    for length in lengths:
        hidden = torch.randn(1, length, SMOLLM2["hidden_size"], device=device, dtype=dtype)
        position_embeddings = rotary(hidden, torch.arange(length, device=device)[None])
        calls = PARTS.get(args.mixer, module_parts)(mixer, hidden, position_embeddings, args.variants, model.new_cache)
        calls["attention module, teacher"] = lambda: mixer(hidden, position_embeddings=position_embeddings, attention_mask=None)
        for name, call in calls.items():  # each row as it is measured: a run cut short keeps them
            with linearize.teacher_mode(model) if name.endswith("teacher") else contextlib.nullcontext():
                host, busy = timed(call, device, args.repeats)
            emit({"length": length, "part": name, "host_ms": round(host, 3), "device_ms": round(busy, 3), "dtype": args.dtype}, device, out)
    if args.model:
        del model, teacher
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SMOLLM2)).to(dtype).eval()
        model = linearize.convert(teacher, args.mixer, **mixer_options(args.mixer, args.window, options)).to(device)
        whole_model(model, lengths, device, args.repeats, args.dtype, out, args.trace_rows, args.variants)


if __name__ == "__main__":
    main()
