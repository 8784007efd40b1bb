"""Time per generated token of a static-cache compiled generate() on the CPU with every guard evaluated every step
(LINEARIZE_STEP_GUARDS=every) and with the guards trusted after a generate()'s first two steps (the default), in
turns within one process, for step_guards.py's narrow 30-layer models (the host's work is most of a step). The
teacher is plain transformers and takes neither. Run from benchmarks/:
    python results/fortyseventh_session_2026-12-06/trusted_guards_cpu.py"""
import json
import os
import statistics
import sys
import time

import torch
from transformers import CompileConfig

sys.path.insert(0, os.getcwd())
from step_guards import model_for  # noqa: E402

config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
config._compile_all_devices = True
ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
new_tokens = 128
settings = dict(input_ids=ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                cache_implementation="static", compile_config=config)
for entry in ["teacher", "hedgehog_swa:window=8", "hedgehog_swa:window=8:keep=8:keep_block=4"]:
    torch._dynamo.reset()
    model = model_for(entry, 30)
    times = {"every": [], "first": []}
    with torch.no_grad():
        for mode in ("every", "first"):
            os.environ["LINEARIZE_STEP_GUARDS"] = mode
            model.generate(**settings)  # compile, and warm each mode
        for _ in range(7):
            for mode in ("every", "first"):
                os.environ["LINEARIZE_STEP_GUARDS"] = mode
                start = time.perf_counter()
                out = model.generate(**settings)
                times[mode].append(1e6 * (time.perf_counter() - start) / new_tokens)
    row = {"model": entry, **{f"us_per_token_{m}": round(statistics.median(t)) for m, t in times.items()},
           **{f"all_{m}": sorted(round(x) for x in t) for m, t in times.items()}}
    print(json.dumps(row), flush=True)
