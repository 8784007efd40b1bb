"""`hedgehog_swa`'s forward and backward as a training step runs them, in each form it could take, side by side.

One layer's window-plus-linear attention at a model's attention shape (`--arch`), bf16 autocast as `linearize distill`
trains: q, k, v in bf16, the feature maps in float32 (softmax halves, 2F wide, as `HedgehogFeatureMap` gives them),
the window's share a float32 weight per query head, every one of them requiring grad. Forms:
- `torch:C`: the chunked PyTorch form (`ops_window.chunk_window_linear`) with chunks of C queries, compiled by
  torch.compile (`--compile on`, as a recipe's `compile: true` step runs it) or eager;
- `kernel`: the Triton kernels with their backward (`triton_window.window_linear_prefill`) as shipped, eager (a custom
  op, opaque to the compiler either way); `kernel:BxW` with the backward's blocks of B queries on W warps in place of
  `triton_window.BACKWARD`'s, and `kernel:BxW:low` or `kernel:BxW:f32` with bf16 or float32 feature products in place
  of the shipped choice (`LOW_FEATURES_IN_TRAINING`); the shipped settings are put back at the end.
Each row: the median milliseconds of forward + backward, the peak memory above the inputs, and the largest difference
of the output and of each gradient from the float32 PyTorch form's (relative to its largest entry).

    python benchmarks/window_training.py --arch llama-3.2-1b --batch 8 --length 2048 --window 256 --forms torch:64,torch:128,torch:256,kernel --out /tmp/window_training.json
    python benchmarks/window_training.py --forms torch:64,kernel:32x8,kernel:32x8:low,kernel:16x4,kernel:64x4 --out /tmp/window_training.json
    python benchmarks/window_training.py --device cpu --arch tiny --batch 1 --length 40 --window 8 --forms torch:4,torch:8 --compile off --repeats 1 --warmup 0 --out /tmp/w.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from window_kernels import difference, timed

from linearize.hf import triton_window
from linearize.hf.ops_window import chunk_window_linear
from linearize.hf.triton_window import kernel_problem, window_linear_prefill

# (query heads, kv heads, head dimension): the models whose training this times, and a tiny one to check the script.
SHAPES = {"llama-3.2-1b": (32, 8, 64), "smollm2-135m": (9, 3, 64), "tiny": (4, 2, 8)}


def inputs(arch: str, batch: int, length: int, device: str) -> list[torch.Tensor]:
    """q, k, v (bf16), fq, fk (float32 feature maps, 2 x head dimension wide) and the window's share (float32)."""
    heads, kv_heads, dim = SHAPES[arch]
    g = torch.Generator(device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device)

    q = r(batch, heads, length, dim).bfloat16()
    k, v = (r(batch, kv_heads, length, dim).bfloat16() for _ in range(2))
    fq, fk = torch.softmax(r(batch, heads, length, 2 * dim), -1), torch.softmax(r(batch, kv_heads, length, 2 * dim), -1)
    return [q, k, v, fq, fk, torch.sigmoid(r(heads))]


def form(name: str, window: int, scaling: float, compiled: bool):
    """The function (q, k, v, fq, fk, share) -> heads of form `name` ("torch:C", "kernel", "kernel:BxW[:low|:f32]")."""
    kind, _, chunk = name.partition(":")
    if kind == "kernel":
        blocks, _, features = chunk.partition(":")
        block, _, warps = blocks.partition("x")
        if (blocks and not (block.isdigit() and warps.isdigit())) or features not in ("", "low", "f32"):
            raise SystemExit(f"--forms takes kernel, kernel:BxW, kernel:BxW:low or kernel:BxW:f32 (B queries a block, W warps), got {name!r}")
        backward = (int(block), int(warps)) if blocks else triton_window.BACKWARD[torch.bfloat16]
        settings = (backward, features == "low" if features else triton_window.LOW_FEATURES_IN_TRAINING)

        def through_kernel(q, k, v, fq, fk, sm):  # the settings stay for the backward; main() puts the shipped ones back
            triton_window.BACKWARD[torch.bfloat16], triton_window.LOW_FEATURES_IN_TRAINING = settings
            return window_linear_prefill(q, k, v, fq, fk, window=window, scaling=scaling, sm_weight=sm, ln_weight=1 - sm)[0]

        return through_kernel
    if kind != "torch" or not chunk.isdigit() or int(chunk) < 1:
        raise SystemExit(f"--forms takes torch:C (C a positive chunk length) or kernel, got {name!r}")

    def chunked(q, k, v, fq, fk, sm):
        return chunk_window_linear(q, k, v, fq, fk, window=window, scaling=scaling, sm_weight=sm, ln_weight=1 - sm, chunk_size=int(chunk))[0]

    return torch.compile(chunked, dynamic=False) if compiled else chunked


def step(fn, leaves: list[torch.Tensor], grad: torch.Tensor, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward (under bf16 autocast) and backward of `fn`: (the output, the leaves' gradients)."""
    for leaf in leaves:
        leaf.grad = None
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [leaf.grad for leaf in leaves]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--arch", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--forms", default="torch:64,torch:128,torch:256,kernel", help="comma-separated forms: torch:C, kernel")
    parser.add_argument("--compile", default="on", choices=["on", "off"], help="compile the PyTorch forms (a recipe's compile: true)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check the script (the kernel form only under TRITON_INTERPRET=1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per form")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before them (the first compiles)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("window_training.py times CUDA kernels; run it on a machine with a CUDA GPU (or check it with --device cpu)")
    if min(args.batch, args.length, args.window) < 1:
        raise SystemExit(f"--batch, --length and --window take positive numbers, got {args.batch}, {args.length}, {args.window}")
    names = args.forms.split(",")
    scaling = SHAPES[args.arch][2] ** -0.5
    functions = {name: form(name, args.window, scaling, args.compile == "on") for name in names}
    leaves = [t.requires_grad_() for t in inputs(args.arch, args.batch, args.length, args.device)]
    if any(name.startswith("kernel") for name in names) and (problem := kernel_problem(*leaves[:5], args.window)) is not None:
        raise SystemExit(f"the kernel form cannot run here: {problem}; leave it out of --forms")
    grad = torch.randn(leaves[0].shape, generator=torch.Generator(args.device).manual_seed(1), device=args.device).bfloat16()
    # The reference: the PyTorch form in float32, outside autocast, from the same values.
    exact = [t.detach().float().requires_grad_() for t in leaves]
    reference = chunk_window_linear(*exact[:5], window=args.window, scaling=scaling, sm_weight=exact[5], ln_weight=1 - exact[5])[0]
    reference.backward(grad.float())
    rows = []
    shipped = triton_window.BACKWARD[torch.bfloat16], triton_window.LOW_FEATURES_IN_TRAINING
    try:
        for name, fn in functions.items():
            out, grads = step(fn, leaves, grad, args.device)
            ms, mib = timed(lambda: step(fn, leaves, grad, args.device), args.repeats, args.warmup, args.device)
            errors = {"out": difference(out, reference)}
            errors.update({f"d_{x}": difference(g, ref.grad) for x, g, ref in zip(("q", "k", "v", "fq", "fk", "share"), grads, exact)})
            rows.append({"form": name, "ms": round(ms, 3), "peak_mib": round(mib, 1), "max_difference": max(errors.values()), "differences": errors})
            print(f"{name:<10} {ms:9.3f} ms  peak {mib:9.1f} MiB  largest difference {rows[-1]['max_difference']:.1e}", flush=True)
    finally:  # a kernel form's settings (`form`) last through its backward
        triton_window.BACKWARD[torch.bfloat16], triton_window.LOW_FEATURES_IN_TRAINING = shipped
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "arch": args.arch, "shape": SHAPES[args.arch], "batch": args.batch, "length": args.length,
        "window": args.window, "compile": args.compile, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
