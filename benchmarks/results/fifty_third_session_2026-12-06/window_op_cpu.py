"""chunk_window_linear at lolcats' shape (B 1, 9 heads, 2,048 tokens, D 64, F 128, window 256), float32, no grad: the
form before 10e2908 beside the working tree's, in turns. python benchmarks/results/fifty_third_session_2026-12-06/window_op_cpu.py"""
import time, statistics, torch
import subprocess, tempfile, importlib.util
# The form before 10e2908 (its parent's ops_window.py; it imports torch alone), loaded beside the working tree's.
_old = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
_old.write(subprocess.run(["git", "show", "10e2908~1:linearize/hf/ops_window.py"], capture_output=True, text=True, check=True).stdout)
_old.close()
_spec = importlib.util.spec_from_file_location("old_ops_window", _old.name)
old_ops_window = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(old_ops_window)
from linearize.hf import ops_window
g = torch.Generator().manual_seed(0)
b, h, t, d, f = 1, 9, 2048, 64, 128
q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
fq, fk = (torch.randn(b, h, t, f, generator=g).softmax(-1) for _ in range(2))
sm = torch.sigmoid(torch.randn(h, generator=g))
kw = dict(window=256, scaling=d**-0.5, sm_weight=sm, ln_weight=1 - sm, output_state=True)
times = {"before": [], "after": []}
with torch.no_grad():
    a, _ = old_ops_window.chunk_window_linear(q, k, v, fq, fk, **kw)
    bb, _ = ops_window.chunk_window_linear(q, k, v, fq, fk, **kw)
    print("max |after - before|", (a - bb).abs().max().item())
    for _ in range(6):
        for name, mod in (("before", old_ops_window), ("after", ops_window)):
            s = time.perf_counter(); mod.chunk_window_linear(q, k, v, fq, fk, **kw); times[name].append(time.perf_counter() - s)
for n, x in times.items(): print(n, f"median {statistics.median(x)*1e3:.1f} ms a layer", [round(y*1e3) for y in x])
