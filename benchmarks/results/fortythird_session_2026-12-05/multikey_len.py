"""RULER-style multi-key needle (the eval's prompts: seed 0, depths 0.1/0.5/0.9, 9 trials) at LENGTH tokens: the GGUF
teacher, then the trained lolcats_keep student (seed 0, rebuilt from its delta) at inference-time keep sizes."""
import json, random, sys, time
import os
import torch
import linearize
from transformers import AutoModelForCausalLM, AutoTokenizer
from linearize.evaluate.longcontext import ask, make_probe
STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")  # the fortieth session's lolcats_keep: student_delta.py load of runs/keepbench/delta-v2.tgz

torch.set_num_threads(2)
length, keeps = int(sys.argv[1]), [int(k) for k in sys.argv[2].split(",")]
tok = AutoTokenizer.from_pretrained(STUDENT)
rng = random.Random(0)
probes = [make_probe(tok, "multikey", length, d, rng) for d in (0.1, 0.5, 0.9) for _ in range(9)]


def report(name, model):
    start = time.time()
    cells = ask(model, tok, probes)
    print(json.dumps({"model": name, "length": length, "hits": {str(d): sum(c.hits) for (_, d), c in sorted(cells.items())},
                      "total": sum(sum(c.hits) for c in cells.values()), "seconds": round(time.time() - start)}), flush=True)


report("teacher", linearize.load_teacher("smollm2-135m")[0].eval())
student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
for keep in keeps:
    linearize.set_options(student, keep=keep)
    report(f"lolcats_keep keep={keep}", student)
