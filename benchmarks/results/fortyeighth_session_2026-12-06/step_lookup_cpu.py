"""Dynamo's cache lookup a step of a compiled static-cache generate() on the CPU, for step_guards.py's narrow 30-layer
`hedgehog_swa` models (window 8, and with 8 kept keys in blocks of 4): torch.profiler over a third generate() of 64 new
tokens (the first two compile and warm), the lookup's and the compiled region's mean CPU time, and Dynamo's count of
graphs. Run each model alone (a fresh process: Dynamo's counters add up over a process):
    python benchmarks/results/fortyeighth_session_2026-12-06/step_lookup_cpu.py hedgehog_swa:window=8
    python benchmarks/results/fortyeighth_session_2026-12-06/step_lookup_cpu.py hedgehog_swa:window=8:keep=8:keep_block=4
"""
import sys
from pathlib import Path

import torch
from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from step_guards import model_for  # noqa: E402

entry = sys.argv[1]
config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
config._compile_all_devices = True
ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
settings = dict(input_ids=ids, max_new_tokens=65, min_new_tokens=65, do_sample=False, cache_implementation="static", compile_config=config)
model = model_for(entry, 30)
with torch.no_grad():
    model.generate(**settings)
    model.generate(**settings)
    with torch.profiler.profile() as profile:
        model.generate(**settings)
events = {e.key: e for e in profile.key_averages()}
for key in ("TorchDynamo Cache Lookup", "Pregraph bytecode", "Torch-Compiled Region: 0/0"):
    print(f"{entry}: {key}: {events[key].count} calls, {events[key].cpu_time_total / events[key].count:.0f} us each")
print(f"{entry}: graphs {dict(torch._dynamo.utils.counters['stats'])}, graph breaks {dict(torch._dynamo.utils.counters['graph_break'])}")
