"""Sliding-window kernels on CUDA: the PyTorch bands against the fused flex_attention path, checked and timed.

At SmolLM2-135M's attention shapes (9 query heads on 3 kv heads, head dimension 64), window 64, bfloat16, for
each batch and length: `window_attention` (the window of `swa`, and of `gla`, `gated_deltanet`, `mamba2` with a
window), forward and forward + backward, on the bands (fused=False) and through flex_attention (fused=True).
Each row gives the median milliseconds of both paths, the speed-up, their peak memory above the inputs, and the
largest difference between their outputs (and gradients) relative to the largest output (gradient) entry. The
first calls, which compile flex_attention, are warm-ups and are not timed.

    python benchmarks/window_kernels.py --out benchmarks/results/window_kernels_h200.json
    python benchmarks/window_kernels.py --batches 1 --lengths 2048 --out /tmp/window_kernels.json  # a quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from linearize.hf.windows import window_attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M


def timed(fn, repeats: int, warmup: int) -> tuple[float, float]:
    """(median milliseconds of `fn` over `repeats` calls after `warmup` calls, peak MiB allocated above the start)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def difference(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def window_rows(batch, length, window, dtype, repeats, warmup):
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(batch, HEADS, length, HEAD_DIM, generator=g, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=g, device="cuda", dtype=dtype) for _ in range(2))
    scaling = HEAD_DIM**-0.5
    grad = torch.randn_like(q)
    rows = []
    outputs, grads, forward, backward = {}, {}, {}, {}
    for name, fused in (("torch", False), ("flex", True)):
        with torch.no_grad():
            outputs[name] = window_attention(q, k, v, window=window, scaling=scaling, fused=fused)
            forward[name] = timed(lambda: window_attention(q, k, v, window=window, scaling=scaling, fused=fused), repeats, warmup)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def train_step():
            for leaf in leaves:
                leaf.grad = None
            window_attention(*leaves, window=window, scaling=scaling, fused=fused).backward(grad)

        backward[name] = timed(train_step, repeats, warmup)
        grads[name] = [leaf.grad for leaf in leaves]
    agreement = {
        "forward": difference(outputs["flex"], outputs["torch"]),
        "forward+backward": max(difference(a, b) for a, b in zip(grads["flex"], grads["torch"])),
    }
    for name, timings in (("forward", forward), ("forward+backward", backward)):
        rows.append(row(name, batch, length, timings, agreement[name]))
    return rows


def row(kind, batch, length, timings, agreement):
    (torch_ms, torch_mib), (flex_ms, flex_mib) = timings["torch"], timings["flex"]
    return {
        "pass": kind, "batch": batch, "length": length, "torch_ms": round(torch_ms, 3), "flex_ms": round(flex_ms, 3),
        "speedup": round(torch_ms / flex_ms, 2), "torch_peak_mib": round(torch_mib, 1), "flex_peak_mib": round(flex_mib, 1),
        "max_difference": agreement,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--lengths", default="2048,8192,32768", help="comma-separated sequence lengths")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before them (the first compiles)")
    parser.add_argument("--tolerance", type=float, default=3e-2, help="largest relative difference allowed between the paths")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("window_kernels.py times CUDA kernels; run it on a machine with a CUDA GPU")
    # Each pass and shape compiles flex_attention until it has seen the shapes vary; past the limit torch would fall
    # back to its uncompiled (dense, T x S) form and time the wrong thing, so that is an error here.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    dtype = getattr(torch, args.dtype)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for length in map(int, args.lengths.split(",")):
            rows += window_rows(batch, length, args.window, dtype, args.repeats, args.warmup)
            for r in rows[-2:]:
                print(
                    f"{r['pass']:<17} B={r['batch']:<2} T={r['length']:<6} torch {r['torch_ms']:9.3f} ms "
                    f"flex {r['flex_ms']:8.3f} ms  x{r['speedup']:<6} peak {r['torch_peak_mib']:8.1f} / "
                    f"{r['flex_peak_mib']:8.1f} MiB  diff {r['max_difference']:.1e}",
                    flush=True,
                )
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "dtype": args.dtype, "window": args.window, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    worst = max(r["max_difference"] for r in rows)
    if worst > args.tolerance:
        raise SystemExit(f"the paths differ by {worst:.2e} > --tolerance {args.tolerance:g}; see {args.out}")
    print(f"wrote {args.out}; largest difference {worst:.1e}")


if __name__ == "__main__":
    main()
