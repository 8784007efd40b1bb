"""Operator count and time of one kept-key prefill at SmolLM2's shape (float32, CPU, one layer)."""
import sys, time, torch
from torch.profiler import profile
from linearize.hf.ops_kept import kept_window_linear
torch.manual_seed(0)
b, h, hkv, d, f = 1, 9, 3, 64, 128
for T in (2048, 8192):
    q, fq = torch.randn(b, h, T, d), torch.randn(b, h, T, f).softmax(-1)
    k, v, fk = torch.randn(b, hkv, T, d), torch.randn(b, hkv, T, d), torch.randn(b, hkv, T, f).softmax(-1)
    share = torch.rand(h)
    kw = dict(window=256, keep=128, block=64, scaling=0.125, sm_weight=share, ln_weight=1 - share, output_state=True)
    with torch.no_grad():
        kept_window_linear(q, k, v, fq, fk, **kw)
        t0 = time.perf_counter(); kept_window_linear(q, k, v, fq, fk, **kw); t = time.perf_counter() - t0
        with profile() as prof:
            kept_window_linear(q, k, v, fq, fk, **kw)
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    top = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    print(T, f"{t*1000:.0f} ms", "top-level aten ops", top, "all", ops)
