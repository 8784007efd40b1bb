"""Sliding-window kernels on CUDA: the PyTorch paths against the fused kernels, checked and timed.

At SmolLM2-135M's attention shapes (9 query heads on 3 kv heads, head dimension 64), bfloat16, for each batch and
length:
- `window`: `window_attention` (the window of `swa`, and of `gla`, `gated_deltanet`, `mamba2` with a window), window
  64 (--window), forward and forward + backward, on the bands (fused=False) and through flex_attention (fused=True);
- `hedgehog_swa`: the prefill of `hedgehog_swa` (feature dim 64), windows 64 and 256 (--hedgehog-windows), forward
  under no_grad with the next state (as generate() prefills), and forward + backward without a state (as training
  runs it: gradients of q, k, v, fq, fk and the weights' share), the PyTorch path of the mixer (grouped heads as they are,
  `chunk_window_linear`) against the fused Triton kernels (`triton_window.window_linear_prefill`).
Each row gives the median milliseconds of both paths, the speed-up, their peak memory above the inputs, and the
largest difference between their outputs (and gradients) relative to the largest output (gradient) entry. The
first calls, which compile flex_attention or the Triton kernel, are warm-ups and are not timed.

    python benchmarks/window_kernels.py --out benchmarks/results/window_kernels_h200.json
    python benchmarks/window_kernels.py --batches 1 --lengths 2048 --out /tmp/window_kernels.json  # a quick check
    TRITON_INTERPRET=1 python benchmarks/window_kernels.py --device cpu --ops hedgehog_swa --batches 1 --lengths 100 \
        --hedgehog-windows 8 --repeats 1 --warmup 0 --out /tmp/window_kernels_cpu.json  # the script checked on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from linearize.hf.ops_window import chunk_window_linear
from linearize.hf.triton_window import kernel_problem, window_linear_prefill
from linearize.hf.windows import window_attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
FEATURE_DIM = 64  # hedgehog_swa's default: the head dimension
OPS = ("window", "hedgehog_swa")


def timed(fn, repeats: int, warmup: int, device: str = "cuda") -> tuple[float, float]:
    """(median milliseconds of `fn` over `repeats` calls after `warmup` calls, peak MiB allocated above the start; on
    the CPU wall-clock milliseconds and no memory)."""
    for _ in range(warmup):
        fn()
    if device == "cpu":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times), 0.0
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


def hedgehog_rows(batch, length, window, dtype, repeats, warmup, device):
    """Two rows: hedgehog_swa's prefill with its next state, and its forward + backward, the mixer's PyTorch path against
    the fused kernels."""
    g = torch.Generator(device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device)

    q = r(batch, HEADS, length, HEAD_DIM).to(dtype)
    k, v = (r(batch, KV_HEADS, length, HEAD_DIM).to(dtype) for _ in range(2))
    # The feature maps in float32, as HedgehogFeatureMap gives them: softmax halves, 2F wide.
    fq, fk = torch.softmax(r(batch, HEADS, length, 2 * FEATURE_DIM), -1), torch.softmax(r(batch, KV_HEADS, length, 2 * FEATURE_DIM), -1)
    share = torch.sigmoid(r(HEADS))
    options = dict(window=window, scaling=HEAD_DIM**-0.5, sm_weight=share, ln_weight=1 - share, output_state=True)
    paths = {
        "torch": lambda: chunk_window_linear(q, k, v, fq, fk, **options)[0],
        "fused": lambda: window_linear_prefill(q, k, v, fq, fk, **options)[0],
    }
    with torch.no_grad():
        problem = kernel_problem(q, k, v, fq, fk, window)
        if problem is not None:
            raise SystemExit(f"the fused prefill cannot run here: {problem}")
        outputs = {name: fn() for name, fn in paths.items()}
        timings = {name: timed(fn, repeats, warmup, device) for name, fn in paths.items()}
    grad = torch.randn(q.shape, generator=g, device=device).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, fq, fk, share)]
    training = dict(window=window, scaling=HEAD_DIM**-0.5)

    def train_step(path):
        for leaf in leaves:
            leaf.grad = None
        q_, k_, v_, fq_, fk_, sm = leaves
        path(q_, k_, v_, fq_, fk_, sm_weight=sm, ln_weight=1 - sm, **training)[0].backward(grad)
        return [leaf.grad for leaf in leaves]

    steps = {"torch": lambda: train_step(chunk_window_linear), "fused": lambda: train_step(window_linear_prefill)}
    grads = {name: fn() for name, fn in steps.items()}
    backward = {name: timed(fn, repeats, warmup, device) for name, fn in steps.items()}
    agreement = max(difference(a, b) for a, b in zip(grads["fused"], grads["torch"]))
    return [
        {"window": window, **row("hedgehog_swa prefill", batch, length, timings, difference(outputs["fused"], outputs["torch"]), "fused")},
        {"window": window, **row("hedgehog_swa fwd+bwd", batch, length, backward, agreement, "fused")},
    ]


def row(kind, batch, length, timings, agreement, fused="flex"):
    """A row of the PyTorch path against the fused one, named `fused` in its keys."""
    (torch_ms, torch_mib), (fused_ms, fused_mib) = timings["torch"], timings[fused]
    return {
        "pass": kind, "batch": batch, "length": length, "torch_ms": round(torch_ms, 3), f"{fused}_ms": round(fused_ms, 3),
        "speedup": round(torch_ms / fused_ms, 2), "torch_peak_mib": round(torch_mib, 1), f"{fused}_peak_mib": round(fused_mib, 1),
        "max_difference": agreement,
    }


def describe(r) -> str:
    fused = "flex" if "flex_ms" in r else "fused"
    name = r["pass"] + (f" w={r['window']}" if "window" in r else "")
    return (
        f"{name:<26} B={r['batch']:<2} T={r['length']:<6} torch {r['torch_ms']:9.3f} ms {fused} {r[f'{fused}_ms']:8.3f} ms  "
        f"x{r['speedup']:<6} peak {r['torch_peak_mib']:8.1f} / {r[f'{fused}_peak_mib']:8.1f} MiB  diff {r['max_difference']:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--lengths", default="2048,8192,32768", help="comma-separated sequence lengths")
    parser.add_argument("--window", type=int, default=64, help="window of the `window` rows")
    parser.add_argument("--hedgehog-windows", default="64,256", help="comma-separated windows of the `hedgehog_swa` rows")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated rows to time, among {', '.join(OPS)}")
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"],
        help="cpu: check the script, hedgehog_swa rows only, its kernel through Triton's interpreter (TRITON_INTERPRET=1)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before them (the first compiles)")
    parser.add_argument("--tolerance", type=float, default=3e-2, help="largest relative difference allowed between the paths")
    args = parser.parse_args()
    ops = args.ops.split(",")
    if set(ops) - set(OPS):
        raise SystemExit(f"--ops takes {', '.join(OPS)}, got {args.ops}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("window_kernels.py times CUDA kernels; run it on a machine with a CUDA GPU (or check it with --device cpu)")
    if args.device == "cpu" and ops != ["hedgehog_swa"]:
        raise SystemExit("--device cpu checks the hedgehog_swa rows only: add --ops hedgehog_swa")
    # Each pass and shape compiles flex_attention until it has seen the shapes vary; past the limit torch would fall
    # back to its uncompiled (dense, T x S) form and time the wrong thing, so that is an error here.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    dtype = getattr(torch, args.dtype)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for length in map(int, args.lengths.split(",")):
            new = []
            if "window" in ops:
                new += window_rows(batch, length, args.window, dtype, args.repeats, args.warmup)
            if "hedgehog_swa" in ops:
                for window in map(int, args.hedgehog_windows.split(",")):
                    new += hedgehog_rows(batch, length, window, dtype, args.repeats, args.warmup, args.device)
            for r in new:
                print(describe(r), flush=True)
            rows += new
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "dtype": args.dtype, "window": args.window,
        "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "feature_dim": FEATURE_DIM, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    worst = max(r["max_difference"] for r in rows)
    if worst > args.tolerance:
        raise SystemExit(f"the paths differ by {worst:.2e} > --tolerance {args.tolerance:g}; see {args.out}")
    print(f"wrote {args.out}; largest difference {worst:.1e}")


if __name__ == "__main__":
    main()
