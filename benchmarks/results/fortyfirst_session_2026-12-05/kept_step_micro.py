"""Per-step time of decode_kept_window_linear vs decode_window_linear at SmolLM2's shape (CPU, float32, batch 1)."""
import time, sys, torch
from linearize.hf.ops_kept import kept_window_linear, decode_kept_window_linear
from linearize.hf.ops_window import chunk_window_linear, decode_window_linear
torch.manual_seed(0)
b, h, hkv, d, f, w, n, blk = 1, 9, 3, 64, 128, 256, 128, 64
T = 2048
def rnd(*s): return torch.randn(*s)
q, fq = rnd(b, h, T, d), rnd(b, h, T, f).softmax(-1)
k, v, fk = rnd(b, hkv, T, d), rnd(b, hkv, T, d), rnd(b, hkv, T, f).softmax(-1)
share = torch.rand(h)
kw = dict(window=w, scaling=0.125, sm_weight=share, ln_weight=1 - share)
with torch.no_grad():
    _, kept_state = kept_window_linear(q, k, v, fq, fk, keep=n, block=blk, state=None, position=0, output_state=True, **kw)
    from linearize.hf.ops_window import _empty_state, window_tail
    steps = 256
    qs, ks, vs, fqs, fks = rnd(b, h, steps, d), rnd(b, hkv, steps, d), rnd(b, hkv, steps, d), rnd(b, h, steps, f).softmax(-1), rnd(b, hkv, steps, f).softmax(-1)
    # plain window state: run decode from a prefill via chunk form of repeated heads is awkward; build by decoding T tokens quickly? use tail of size w-1
    plain_state = {"S": torch.zeros(b, hkv, f, d), "z": torch.zeros(b, hkv, f), **window_tail(w - 1, torch.ones(b, T, dtype=torch.bool), k=k, v=v, fk=fk)}
    def run_kept(state):
        for t in range(steps):
            _, state = decode_kept_window_linear(qs[:, :, t:t+1], ks[:, :, t:t+1], vs[:, :, t:t+1], fqs[:, :, t:t+1], fks[:, :, t:t+1], keep=n, block=blk, state=state, position=T + t, **kw)
    def run_plain(state):
        for t in range(steps):
            _, state = decode_window_linear(qs[:, :, t:t+1], ks[:, :, t:t+1], vs[:, :, t:t+1], fqs[:, :, t:t+1], fks[:, :, t:t+1], state=state, **kw)
    res = {"kept": [], "plain": []}
    for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        for name, fn, st in (("kept", run_kept, kept_state), ("plain", run_plain, plain_state)):
            t0 = time.perf_counter(); fn(st); res[name].append((time.perf_counter() - t0) / steps * 1e6)
    for name, xs in res.items():
        xs.sort(); print(name, "us/step median", round(xs[len(xs)//2], 1), "min", round(xs[0], 1))
if len(sys.argv) > 2:
    from torch.profiler import profile
    with torch.no_grad(), profile() as prof:
        run_kept(kept_state)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
