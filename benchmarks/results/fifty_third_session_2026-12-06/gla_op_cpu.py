"""chunk_gla at liger's shape (B 1, 9 heads, 2,048 tokens, K 64, V 65), float32, no grad: the form before 10e2908 beside the
working tree's, in turns. python benchmarks/results/fifty_third_session_2026-12-06/gla_op_cpu.py"""
import time, statistics, torch
import torch.nn.functional as F
import subprocess, tempfile, importlib.util
# The form before 10e2908 (its parent's ops_gated.py; it imports torch alone), loaded beside the working tree's.
_old = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
_old.write(subprocess.run(["git", "show", "10e2908~1:linearize/hf/ops_gated.py"], capture_output=True, text=True, check=True).stdout)
_old.close()
_spec = importlib.util.spec_from_file_location("old_ops_gated", _old.name)
old_ops_gated = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(old_ops_gated)
from linearize.hf import ops_gated
g = torch.Generator().manual_seed(0)
b, h, t, d = 1, 9, 2048, 64
q, k = (torch.randn(b, h, t, d, generator=g).softmax(-1) for _ in range(2))
v = torch.randn(b, h, t, d + 1, generator=g)
gk = F.logsigmoid(torch.randn(b, h, t, d, generator=g)) / 16
times = {"before": [], "after": []}
with torch.no_grad():
    a, _ = old_ops_gated.chunk_gla(q, k, v, gk, scale=1.0)
    bb, _ = ops_gated.chunk_gla(q, k, v, gk, scale=1.0)
    print("max |after - before|", (a - bb).abs().max().item())
    for _ in range(6):
        for name, mod in (("before", old_ops_gated), ("after", ops_gated)):
            s = time.perf_counter(); mod.chunk_gla(q, k, v, gk, scale=1.0); times[name].append(time.perf_counter() - s)
for n, x in times.items(): print(n, f"median {statistics.median(x)*1e3:.1f} ms a layer", [round(y*1e3) for y in x])
