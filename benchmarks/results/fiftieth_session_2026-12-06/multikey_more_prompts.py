"""RULER-style multi-key needles at LENGTH tokens on prompts the GPU runs did not ask (probe seeds SEEDS, depths
0.1/0.5/0.9, 9 trials each): the original teacher (the GGUF, float32) and a saved student, in turns per seed, on the
same prompts (with a fourth argument `student`, the student alone). Float32, CPU (2 threads); one JSON line per
model and seed:

    python multikey_more_prompts.py STUDENT LENGTH SEEDS [student]      # e.g. /tmp/s50/st/v3 4096 1,2
"""
import json
import random
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from linearize import load_teacher
from linearize.evaluate.longcontext import ask, make_probe

torch.set_num_threads(2)
path, length, seeds = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
tok = AutoTokenizer.from_pretrained(path)
models = {"student": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()}
if sys.argv[4:] != ["student"]:
    models = {"teacher": load_teacher("smollm2-135m")[0].float().eval(), **models}
for seed in seeds:
    rng = random.Random(seed)
    probes = [make_probe(tok, "multikey", length, d, rng) for d in (0.1, 0.5, 0.9) for _ in range(9)]
    for name, model in models.items():
        start = time.time()
        cells = ask(model, tok, probes)
        print(json.dumps({"model": name, "path": path if name == "student" else "smollm2-135m", "seed": seed, "length": length,
                          "hits": {str(d): sum(c.hits) for (_, d), c in sorted(cells.items())},
                          "total": sum(sum(c.hits) for c in cells.values()), "prompts": len(probes),
                          "seconds": round(time.time() - start)}), flush=True)
