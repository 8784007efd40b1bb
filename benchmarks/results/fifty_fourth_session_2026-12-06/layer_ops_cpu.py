"""One layer's chunked op at a student's shape, 2,048 tokens, float32, no grad, two cores: `chunk_gla` at `liger`'s
(9 query heads on 3 kv heads, K 64, V 65) grouped and with the kv heads repeated, and `chunk_window_linear` at
`lolcats`' (9 heads, D 64, F 128, window 256) in chunks of 64, 128 and 256 queries, each timed in turns (median of 7).
python benchmarks/results/fifty_fourth_session_2026-12-06/layer_ops_cpu.py"""
import statistics, time
import torch
import torch.nn.functional as F
from linearize.hf.ops_gated import chunk_gla
from linearize.hf.ops_window import chunk_window_linear


def in_turns(runs: dict, rounds: int = 7) -> None:
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            begin = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - begin)
    for name, x in times.items():
        print(f"{name}: median {statistics.median(x) * 1e3:.1f} ms")


g = torch.Generator().manual_seed(0)
q = torch.softmax(torch.randn(1, 9, 2048, 64, generator=g), -1)
k = torch.softmax(torch.randn(1, 3, 2048, 64, generator=g), -1)
v = torch.randn(1, 3, 2048, 65, generator=g)
gate = F.logsigmoid(torch.randn(1, 3, 2048, 64, generator=g)) / 16
with torch.inference_mode():
    grouped, repeated = chunk_gla(q, k, v, gate, scale=1.0), chunk_gla(q, *(x.repeat_interleave(3, 1) for x in (k, v, gate)), scale=1.0)
    print("chunk_gla grouped against repeated: max |o| difference", (grouped[0] - repeated[0]).abs().max().item(),
          "state", (grouped[1] - repeated[1][:, ::3]).abs().max().item())
    in_turns({"chunk_gla grouped": lambda: chunk_gla(q, k, v, gate, scale=1.0),
              "chunk_gla repeated": lambda: chunk_gla(q, *(x.repeat_interleave(3, 1) for x in (k, v, gate)), scale=1.0)})
    wq, wk, wv = (torch.randn(1, 9, 2048, 64, generator=g) for _ in range(3))
    fq, fk = (torch.rand(1, 9, 2048, 128, generator=g) for _ in range(2))
    in_turns({f"chunk_window_linear chunks of {c}": (lambda c=c: chunk_window_linear(
        wq, wk, wv, fq, fk, window=256, scaling=0.125, output_state=True, chunk_size=c)) for c in (64, 128, 256)})
