"""Perplexity at 2,048 tokens (the first 60K tokens of each held-out text, as benchmarks/quality.py) of the trained
lolcats_keep student (seed 0, rebuilt from its delta) at inference-time keep sizes, against the teacher's figures of
the thirty-sixth session's quality-v1.json."""
import json, sys, time
from pathlib import Path
import os
import torch
import linearize
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, "/work/main/benchmarks")
from quality import heldout_windows
from linearize.evaluate.perplexity import perplexity
STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")  # the fortieth session's lolcats_keep: student_delta.py load of runs/keepbench/delta-v2.tgz

torch.set_num_threads(2)
keeps = [int(k) for k in sys.argv[1].split(",")]
names = sys.argv[2].split(",")
teacher = json.load(open("/work/main/benchmarks/results/thirtysixth_session_2026-12-04/quality-v1.json"))[0]["teacher"]
model = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(STUDENT)
windows = heldout_windows(tok, Path("/work/main/corpus/heldout"), [2048], 60000)
for keep in keeps:
    linearize.set_options(model, keep=keep)
    for name in names:
        start = time.time()
        ppl = perplexity(model, windows[f"{name}_2048"], batch_size=4)
        print(json.dumps({"keep": keep, "text": name, "ppl_2048": round(ppl, 4), "teacher": round(teacher[f"ppl_{name}_2048"], 4),
                          "ratio": round(ppl / teacher[f"ppl_{name}_2048"], 4), "seconds": round(time.time() - start)}), flush=True)
