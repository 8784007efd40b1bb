"""Perplexity at 2,048 tokens (the first 60K tokens of each held-out text named, as benchmarks/quality.py cuts them) of
the `lolcats_keep` student at STUDENT served with 512 kept keys in every layer, then with the same state spread
unevenly (1,536 in the 8 retrieval layers, 139 in the rest), in one process; the teacher's figure from the thirty-sixth
session's quality-v1.json beside them. Float32, CPU, from the repository root's benchmarks/ on the path:

    STUDENT=/tmp/kb/student python ppl_layer_budget.py dialogue,debian-handbook
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import heldout_windows  # noqa: E402

from linearize.evaluate.perplexity import perplexity  # noqa: E402

STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")
RETRIEVAL_LAYERS = "6,7,14,17,18,20,21,23"
torch.set_num_threads(2)
names = sys.argv[1].split(",")
teacher = json.load(open(ROOT / "benchmarks/results/thirtysixth_session_2026-12-04/quality-v1.json"))[0]["teacher"]
model = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(STUDENT)
windows = heldout_windows(tok, ROOT / "corpus/heldout", [2048], 60000)
for served in ("512 everywhere", "1536 in 8, 139 elsewhere"):
    if served.startswith("512"):
        linearize.set_options(model, keep=512)
    else:
        linearize.set_options(model, keep=139)
        linearize.set_options(model, layers=RETRIEVAL_LAYERS, keep=1536)
    for name in names:
        start = time.time()
        ppl = perplexity(model, windows[f"{name}_2048"], batch_size=4)
        print(json.dumps({"served": served, "text": name, "ppl_2048": round(ppl, 4), "teacher": round(teacher[f"ppl_{name}_2048"], 4),
                          "ratio": round(ppl / teacher[f"ppl_{name}_2048"], 4), "seconds": round(time.time() - start)}), flush=True)
