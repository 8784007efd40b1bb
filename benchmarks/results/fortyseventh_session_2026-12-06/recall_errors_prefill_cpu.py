"""A 2,048-token prefill of a `lolcats_keep` student on the CPU (float32, batch 1) with `ops_kept.recall_errors` as
it was before the forty-seventh session (einsums; the code of 11540b4, saved to /tmp/ops_kept_old.py by
`git show 11540b4:linearize/hf/ops_kept.py`) and as it is (matrix products on values with a column of ones), in
turns in one process, the student's options as shipped (139 kept keys, 1,536 in its eight retrieval layers).
    python recall_errors_prefill_cpu.py STUDENT"""
import importlib.util
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.hf import ops_kept

spec = importlib.util.spec_from_file_location("linearize.hf.ops_kept_old", "/tmp/ops_kept_old.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
forms = {"before": old.recall_errors, "after": ops_kept.recall_errors}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
linearize.set_options(model, keep=139)
linearize.set_options(model, layers=[6, 7, 14, 17, 18, 20, 21, 23], keep=1536)
ids = torch.randint(0, 49152, (1, 2048), generator=torch.Generator().manual_seed(0))
times = {name: [] for name in forms}
logits = {}
with torch.no_grad():
    for _ in range(4):
        for name, form in forms.items():
            ops_kept.recall_errors = form
            start = time.perf_counter()
            logits[name] = model(ids, use_cache=True).logits[0, -1]
            times[name].append(time.perf_counter() - start)
print({name: [round(t, 2) for t in ts] for name, ts in times.items()})
print({name: round(statistics.median(ts[1:]), 2) for name, ts in times.items()}, "s median of the last three")
print("largest logit difference", (logits["before"] - logits["after"]).abs().max().item())
