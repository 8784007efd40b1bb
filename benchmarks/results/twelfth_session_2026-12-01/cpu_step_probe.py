"""CPU probe (twelfth session): eager batch-1 decode after a 2,048-token prompt, a random student of hybrid_gdn's shape
against its teacher (teacher_mode, a KV cache in every layer), 16 steps each, and the costliest ops of one step. Run from
the repository root: python benchmarks/results/twelfth_session_2026-12-01/cpu_step_probe.py"""

import contextlib
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import linearize

sys.path.insert(0, "benchmarks")
from serving_speed import random_students  # noqa: E402

torch.set_num_threads(2)
model = random_students("smollm2-135m", ["hybrid_gdn"], torch.float32)["hybrid_gdn"].eval()
ids = torch.randint(0, 49152, (1, 2048))
for name, mode in (("student", contextlib.nullcontext()), ("teacher", linearize.teacher_mode(model))):
    with mode, torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(16):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        print(f"{name}: {(time.perf_counter() - start) / 16 * 1e3:.1f} ms a token")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=token, past_key_values=cache, use_cache=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
