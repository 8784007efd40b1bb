"""Multi-key needle at 2K (RULER-style, the eval's prompts: seed 0, depths 0.1/0.5/0.9, 9 trials) for the trained
lolcats_keep student (seed 0, rebuilt from its delta) at inference-time keep sizes: does the cache's size limit it?"""
import json, random, sys, time
import os
import torch
import linearize
from transformers import AutoModelForCausalLM, AutoTokenizer
from linearize.evaluate.longcontext import ask, make_probe
STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")  # the fortieth session's lolcats_keep: student_delta.py load of runs/keepbench/delta-v2.tgz

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
keeps = [int(k) for k in sys.argv[1].split(",")]
kind = sys.argv[3] if len(sys.argv) > 3 else "multikey"
model = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(STUDENT)
rng = random.Random(0)
probes = [make_probe(tok, kind, 2048, d, rng) for d in (0.1, 0.5, 0.9) for _ in range(9)]
for keep in keeps:
    linearize.set_options(model, keep=keep)
    start = time.time()
    cells = ask(model, tok, probes)
    row = {"kind": kind, "keep": keep, "hits": {str(d): sum(c.hits) for (_, d), c in sorted(cells.items())},
           "total": sum(sum(c.hits) for c in cells.values()), "seconds": round(time.time() - start),
           "misses": {str(d): c.misses[:2] for (_, d), c in sorted(cells.items())}}
    print(json.dumps(row), flush=True)
