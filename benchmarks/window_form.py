"""`hedgehog_swa`'s chunked PyTorch form (`ops_window.chunk_window_linear`, the CPU's training and prefill path, and
the form a compiled GPU training step fuses) against the same file at another git revision, side by side in one run.

Forward and backward of one layer at the quickstart's attention-transfer shape (batch 2, 512 tokens, SmolLM2-135M's 9
heads of 64, Hedgehog's 128 features, window 256), float32, on the CPU. The two versions alternate in rounds, so a
slow spell of the machine falls on both; each reports the least and the median milliseconds of its calls.

    python benchmarks/window_form.py --against HEAD~1 --threads 1 --out /tmp/window_form.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SOURCE = "linearize/hf/ops_window.py"


def load_at(revision: str, folder: Path):
    """ops_window.py as it was at `revision`, imported as a module of its own (its relative imports made absolute)."""
    try:
        text = subprocess.run(["git", "show", f"{revision}:{SOURCE}"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as error:
        sys.exit(f"git has no {SOURCE} at {revision!r} ({error.stderr.strip()}); pass a commit of this repository")
    path = folder / "ops_window_then.py"
    path.write_text(text.replace("from .", "from linearize.hf."))
    spec = importlib.util.spec_from_file_location("ops_window_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(module, inputs, window: int) -> None:
    q, k, v, fq, fk = inputs
    out, _ = module.chunk_window_linear(q, k, v, fq, fk, window=window, scaling=q.shape[-1] ** -0.5, sm_weight=0.5, ln_weight=0.5)
    out.sum().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the git revision whose ops_window.py is timed beside the working tree's")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each version a round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from linearize.hf import ops_window

    generator = torch.Generator().manual_seed(0)
    shapes = [(args.batch, 9, args.length, n) for n in (64, 64, 64, 128, 128)]
    inputs = [torch.rand(shape, generator=generator).requires_grad_() for shape in shapes]
    with tempfile.TemporaryDirectory() as folder:
        versions = {"then": load_at(args.against, Path(folder)), "now": ops_window}
        times = {name: [] for name in versions}
        for name, module in versions.items():
            step(module, inputs, args.window)  # warm-up
        for _ in range(args.rounds):
            for name, module in versions.items():
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    step(module, inputs, args.window)
                    times[name].append((time.perf_counter() - start) * 1e3)
    result = {
        "against": args.against,
        "shape": {"batch": args.batch, "heads": 9, "length": args.length, "head_dim": 64, "features": 128, "window": args.window},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "ms": {name: {"min": round(min(t), 1), "median": round(statistics.median(t), 1), "calls": len(t)} for name, t in times.items()},
    }
    result["now_over_then"] = {key: round(result["ms"]["now"][key] / result["ms"]["then"][key], 3) for key in ("min", "median")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
