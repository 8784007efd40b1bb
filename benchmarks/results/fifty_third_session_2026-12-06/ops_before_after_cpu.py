"""One layer's chunked form at a student's shape, 2,048 tokens, float32, no grad, the form of 10e2908's parent beside
the working tree's, in turns: `chunk_window_linear` at `lolcats`' (B 1, 9 heads, D 64, F 128, window 256) and
`chunk_gla` at `liger`'s (9 heads, K 64, V 65). `old_module` also serves prefill_before_after_cpu.py.
python benchmarks/results/fifty_third_session_2026-12-06/ops_before_after_cpu.py"""
import importlib.util, statistics, subprocess, tempfile, time
from pathlib import Path
import torch
import torch.nn.functional as F


def old_module(module: str, rev: str = "10e2908~1"):
    """linearize/hf/MODULE.py as it was at `rev` (one that imports torch alone), loaded beside today's."""
    source = subprocess.run(["git", "show", f"{rev}:linearize/hf/{module}.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"old_{module}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def in_turns(label: str, before, after, rounds: int = 6) -> None:
    with torch.no_grad():
        print(label, "max |after - before|", (before()[0] - after()[0]).abs().max().item())
        times = {"before": [], "after": []}
        for _ in range(rounds):
            for name, run in (("before", before), ("after", after)):
                begin = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - begin)
    for name, x in times.items():
        print(f"  {name} median {statistics.median(x) * 1e3:.1f} ms a layer", [round(y * 1e3) for y in x])


if __name__ == "__main__":
    from linearize.hf import ops_gated, ops_window

    g = torch.Generator().manual_seed(0)
    b, h, t, d = 1, 9, 2048, 64
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    fq, fk = (torch.randn(b, h, t, 2 * d, generator=g).softmax(-1) for _ in range(2))
    share = torch.sigmoid(torch.randn(h, generator=g))
    window = dict(window=256, scaling=d**-0.5, sm_weight=share, ln_weight=1 - share, output_state=True)
    old_window = old_module("ops_window")
    in_turns("chunk_window_linear", lambda: old_window.chunk_window_linear(q, k, v, fq, fk, **window),
             lambda: ops_window.chunk_window_linear(q, k, v, fq, fk, **window))
    gq, gk = (torch.randn(b, h, t, d, generator=g).softmax(-1) for _ in range(2))
    gv = torch.randn(b, h, t, d + 1, generator=g)
    gate = F.logsigmoid(torch.randn(b, h, t, d, generator=g)) / 16
    old_gated = old_module("ops_gated")
    in_turns("chunk_gla", lambda: old_gated.chunk_gla(gq, gk, gv, gate, scale=1.0), lambda: ops_gated.chunk_gla(gq, gk, gv, gate, scale=1.0))
