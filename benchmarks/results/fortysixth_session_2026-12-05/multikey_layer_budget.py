"""RULER-style multi-key needle (the eval's 27 prompts: seed 0, depths 0.1/0.5/0.9, 9 trials) at LENGTH tokens, of
the student at STUDENT with its kept keys spread unevenly over the layers at the same total: BIG kept keys a kv head in
the layers LAYERS, SMALL in the others (as shipped: 512 in all 30, 15,360 a kv head's column in all). LAYERS are
hybrid_long's retrieval layers (6, 7, 14, 17, 18, 20, 21, 23), found at conversion on 12 retrieval tasks of the
training pool, not on these prompts. Float32, CPU:

    STUDENT=/tmp/kb/student python multikey_layer_budget.py LENGTH BIG SMALL [LAYERS]
"""
import dataclasses
import json
import os
import random
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.evaluate.longcontext import ask, make_probe
from linearize.hf.mixers import mixers_in

STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")
torch.set_num_threads(2)
length, big, small = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
layers = [int(i) for i in (sys.argv[4] if len(sys.argv) > 4 else "6,7,14,17,18,20,21,23").split(",")]
tok = AutoTokenizer.from_pretrained(STUDENT)
rng = random.Random(0)
probes = [make_probe(tok, "multikey", length, d, rng) for d in (0.1, 0.5, 0.9) for _ in range(9)]
student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
linearize.set_options(student, keep=small)
for mixer in mixers_in(student):
    if mixer.layer_idx in layers:
        mixer.options = dataclasses.replace(mixer.options, keep=big)
budget = sum(m.options.keep for m in mixers_in(student))
start = time.time()
cells = ask(student, tok, probes)
print(json.dumps({"big": big, "small": small, "layers": layers, "kept_in_all_layers": budget, "length": length,
                  "hits": {str(d): sum(c.hits) for (_, d), c in sorted(cells.items())},
                  "total": sum(sum(c.hits) for c in cells.values()), "seconds": round(time.time() - start)}), flush=True)
