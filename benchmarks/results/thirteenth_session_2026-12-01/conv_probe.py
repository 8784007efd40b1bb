"""CPU probe (thirteenth session): gated_deltanet's short convolution of q, k and v as it was (channel-major, inputs
promoted to float32 first, `short_conv`) against `convolve_heads` as it is now (time-major), side by side in one
process, alternated, at SmolLM2's heads (9 query, 3 kv, head dim 64), batch 1, kernel 4. Run from the repository root:
python benchmarks/results/thirteenth_session_2026-12-01/conv_probe.py"""

import statistics
import time

import torch

from linearize.hf.mixer_gated_deltanet import convolve_heads, short_conv


def before(q, k, v, weight):
    batch, h, length, d = q.shape
    x = torch.cat((q, k, v), dim=1).to(torch.float32).transpose(2, 3).reshape(batch, -1, length)
    out, cache = short_conv(x, weight, None, None)
    out = out.reshape(batch, -1, d, length).transpose(2, 3)
    return (*out.split((h, k.shape[1], k.shape[1]), dim=1), cache)


torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for length in (2048, 8192):
        q = torch.randn(1, length, 9, 64).to(dtype).transpose(1, 2)
        k, v = (torch.randn(1, length, 3, 64).to(dtype).transpose(1, 2) for _ in range(2))
        weight = torch.randn(960, 4)
        got, expected = convolve_heads(q, k, v, weight, None, None), before(q, k, v, weight)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        times = {"before": [], "after": []}
        for _ in range(5):
            for name, fn in (("before", before), ("after", convolve_heads)):
                start = time.perf_counter()
                fn(q, k, v, weight) if name == "before" else fn(q, k, v, weight, None, None)
                times[name].append((time.perf_counter() - start) * 1e3)
        print(f"{str(dtype)[6:]:9} T={length:5}: before {statistics.median(times['before']):7.2f} ms, after {statistics.median(times['after']):7.2f} ms (median of 5, equal outputs)")
