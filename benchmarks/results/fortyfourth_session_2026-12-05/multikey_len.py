"""RULER-style multi-key needle (the eval's prompts: seed 0, depths 0.1/0.5/0.9, 9 trials; the forty-third session's
multikey_len.py without its teacher, whose 22 of 27 at 4K it measured on these prompts) at LENGTH tokens, of the
student at STUDENT served with each number of kept keys in KEEPS: python multikey_len.py LENGTH KEEPS. KIND=passkey asks
the eval's single passkeys instead (the same seed and depths)."""
import json
import os
import random
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.evaluate.longcontext import ask, make_probe

KIND = os.environ.get("KIND", "multikey")
STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")  # student_delta.py load of runs/keepbench/delta-v2.tgz (or delta-k512.tgz)

torch.set_num_threads(2)
length, keeps = int(sys.argv[1]), [int(k) for k in sys.argv[2].split(",")]
tok = AutoTokenizer.from_pretrained(STUDENT)
rng = random.Random(0)
probes = [make_probe(tok, KIND, length, d, rng) for d in (0.1, 0.5, 0.9) for _ in range(9)]
student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
for keep in keeps:
    linearize.set_options(student, keep=keep)
    start = time.time()
    cells = ask(student, tok, probes)
    print(json.dumps({"student": STUDENT, "kind": KIND, "keep": keep, "length": length, "hits": {str(d): sum(c.hits) for (_, d), c in sorted(cells.items())},
                      "total": sum(sum(c.hits) for c in cells.values()), "seconds": round(time.time() - start)}), flush=True)
