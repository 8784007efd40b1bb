"""What torch.compile costs for the chunked gated delta rule's PyTorch form (the path Gated DeltaNet trains on where
fla's gated backward is refused: Hopper without tilelang), forward and backward, against sequence length.

dynamo unrolls the loop over chunks, so a compile costs more the more chunks it traces. Inductor's caches are off
(`TORCHINDUCTOR_FORCE_DISABLE_CACHES=1` is set here), so every figure is a cold compile, as on a fresh machine;
beside it, the compiled forward and backward's own time (the mean of three more calls).

    python benchmarks/compile_cost.py --lengths 512,2048 --out compile_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import torch  # noqa: E402

from linearize.hf.ops_delta import chunk_gated_delta_rule  # noqa: E402


def first_call_seconds(length: int, heads: int, dim: int, chunk_size: int) -> tuple[float, float]:
    """Seconds of the first compiled forward and backward (the compile), and of each of three more."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim, generator=generator).requires_grad_() for _ in range(3))
    g = (-torch.rand(1, heads, length, generator=generator) * 0.1).requires_grad_()
    beta = torch.rand(1, heads, length, generator=generator).requires_grad_()
    step = torch.compile(lambda *inputs: chunk_gated_delta_rule(*inputs, chunk_size=chunk_size)[0].sum())
    start = time.perf_counter()
    step(q, k, v, g, beta).backward()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(3):
        step(q, k, v, g, beta).backward()
    return first, (time.perf_counter() - start) / 3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        first, after = first_call_seconds(length, args.heads, args.dim, args.chunk_size)
        rows.append({"length": length, "chunk_size": args.chunk_size, "compile_seconds": round(first, 1), "step_seconds": round(after, 4),
                     "torch": torch.__version__, "device": "cpu"})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
