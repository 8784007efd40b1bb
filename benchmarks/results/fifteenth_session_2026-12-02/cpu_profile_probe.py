"""torch.profiler of 10 batch-1 decode steps at 2K on the CPU (the model called in a loop with its cache), for the
teacher or a shipped recipe's untrained student: `python cpu_profile_probe.py teacher|RECIPE` (as run in the
fifteenth session, with an extra ignored argument)."""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for cpu_decode
from cpu_decode import recipe_student  # noqa: E402
from linearize import load_teacher  # noqa: E402

name = sys.argv[1]
teacher, _ = load_teacher("smollm2-135m")
model = (teacher if name == "teacher" else recipe_student(teacher, name)).eval()
ids = torch.randint(0, 1000, (1, 2048))
with torch.no_grad():
    cache = model(ids, use_cache=True).past_key_values
    token = ids[:, :1]
    for _ in range(3):
        cache = model(token, past_key_values=cache, use_cache=True).past_key_values
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            cache = model(token, past_key_values=cache, use_cache=True).past_key_values
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
