"""RULER-style multi-key needle (the eval's 27 prompts: seed 0, depths 0.1/0.5/0.9, 9 trials) at LENGTH tokens, of
the student at STUDENT served with KEEP kept keys, its keys kept by their recall error max-pooled over the RADIUS
positions either side (0: as shipped): a probe of whether keeping needle lines whole helps, monkeypatching
`ops_kept.recall_errors` for the prefill and the decode step's decisions alike. Float32, CPU:

    STUDENT=/tmp/kb/student python multikey_pooled.py LENGTH KEEP RADIUS[,RADIUS...]
"""
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.evaluate.longcontext import ask, make_probe
from linearize.hf import ops_kept

STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")
torch.set_num_threads(2)
length, keep, radii = int(sys.argv[1]), int(sys.argv[2]), [int(r) for r in sys.argv[3].split(",")]
tok = AutoTokenizer.from_pretrained(STUDENT)
rng = random.Random(0)
probes = [make_probe(tok, "multikey", length, d, rng) for d in (0.1, 0.5, 0.9) for _ in range(9)]
student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
linearize.set_options(student, keep=keep)
shipped = ops_kept.recall_errors


def pooled(radius):
    def errors(fk, v, mask, *args):
        err = shipped(fk, v, mask, *args)
        if radius == 0:
            return err
        real = mask[:, None, :].expand_as(err)
        spread = F.max_pool1d(err.flatten(0, 1)[:, None].nan_to_num(posinf=1e30, neginf=-1e30), 2 * radius + 1, 1, radius)
        return torch.where(real, spread.view_as(err).clamp_min(err.nan_to_num(neginf=-1e30)), err)
    return errors


for radius in radii:
    ops_kept.recall_errors = pooled(radius)
    start = time.time()
    cells = ask(student, tok, probes)
    print(json.dumps({"keep": keep, "radius": radius, "length": length, "hits": {str(d): sum(c.hits) for (_, d), c in sorted(cells.items())},
                      "total": sum(sum(c.hits) for c in cells.values()), "seconds": round(time.time() - start)}), flush=True)
