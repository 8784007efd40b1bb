"""The ATen ops of a batch-1 CPU decode step at SmolLM2-135M's shapes (9 query and 3 kv heads of 64, `hedgehog_swa`'s
256-token window and 128 features, the teacher's 2,048 cached keys), each timed alone with one intra-op thread and
with two, in turns over five rounds (each op's fastest): what a second core adds to, or takes from, each kind of op.

A decode step of a 135M model on two cores is a few hundred small ops between the weight-bound projections. An op
that enters an OpenMP parallel region pays for it whatever its size; `OMP_WAIT_POLICY=PASSIVE` (the second thread
sleeps between regions and must be woken) makes that cost stand out as tens of microseconds:

    python benchmarks/cpu_small_ops.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_small_ops.py
"""

from __future__ import annotations

import time

import torch

HEADS, KV_HEADS, HEAD_DIM, WINDOW, FEATURES, CONTEXT, HIDDEN = 9, 3, 64, 256, 128, 2048, 576


def microseconds(op, calls: int = 2000) -> float:
    for _ in range(50):
        op()
    start = time.perf_counter()
    for _ in range(calls):
        op()
    return (time.perf_counter() - start) / calls * 1e6


def ops() -> dict:
    group = HEADS // KV_HEADS
    q = torch.randn(KV_HEADS, group, HEAD_DIM)
    window_keys, old_keys, new_key = torch.randn(KV_HEADS, WINDOW, HEAD_DIM), torch.randn(1, KV_HEADS, WINDOW - 1, HEAD_DIM), torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    old_features, new_features = torch.randn(1, KV_HEADS, WINDOW - 1, FEATURES), torch.randn(1, KV_HEADS, 1, FEATURES)
    rows, weight, bias = torch.randn(HEADS, 1, HEAD_DIM), torch.randn(HEADS, HEAD_DIM, FEATURES // 2), torch.randn(HEADS, 1, FEATURES // 2)
    scores, state = torch.randn(KV_HEADS, group, WINDOW), torch.randn(1, KV_HEADS, FEATURES, HEAD_DIM)
    cache, token = torch.randn(1, KV_HEADS, CONTEXT, HEAD_DIM), torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    x, projection = torch.randn(1, 1, HIDDEN), torch.randn(HIDDEN, HIDDEN)
    query = torch.randn(1, HEADS, 1, HEAD_DIM)
    return {
        "student: window scores (bmm)": lambda: torch.bmm(q, window_keys.transpose(1, 2)),
        "student: a feature map (baddbmm)": lambda: torch.baddbmm(bias, rows, weight),
        "student: its softmax": lambda: torch.softmax(rows, -1),
        "student: the window's keys (cat)": lambda: torch.cat((old_keys, new_key), 2),
        "student: the window's features (cat)": lambda: torch.cat((old_features, new_features), 2),
        "student: exp of the scores": lambda: torch.exp(scores),
        "student: the state's update (mul)": lambda: state * 0.5,
        "teacher: its KV cache (cat)": lambda: torch.cat((cache, token), 2),
        "teacher: SDPA, its keys repeated": lambda: torch.nn.functional.scaled_dot_product_attention(
            query, cache.repeat_interleave(group, 1), cache.repeat_interleave(group, 1)),
        "both: a projection (linear)": lambda: torch.nn.functional.linear(x, projection),
    }


def main(rounds: int = 5) -> None:
    timed: dict[int, dict[str, float]] = {1: {}, 2: {}}
    for _ in range(rounds):  # the thread counts in turn, each op's fastest round: a drift of the machine reaches both
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, op in ops().items():
                timed[threads][name] = min(microseconds(op), timed[threads].get(name, float("inf")))
    print(f"{'op':40s} {'1 thread':>10s} {'2 threads':>10s}")
    for name in timed[1]:
        print(f"{name:40s} {timed[1][name]:8.1f}us {timed[2][name]:8.1f}us")


if __name__ == "__main__":
    main()
