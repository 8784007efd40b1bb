"""Batch-1 CPU decode at 2K, in turns (decode_paired.py's blocks), of the teacher and of `lolcats` and `lolcats_keep`
as served (139 kept keys, 1,536 on layers 6, 7, 14, 17, 18, 20, 21, 23), each twice: with both feature maps in one
product (`joint_feature_maps`, joint_maps.patch) and with each map's own call (as before, the mixers' `feature_maps`
replaced on that copy). Untrained students: a step's work does not depend on its weights. From the repository root:
    git apply benchmarks/results/fortyeighth_session_2026-12-06/joint_maps.patch   # the probe, not kept
    python benchmarks/results/fortyeighth_session_2026-12-06/joint_maps_cpu.py --blocks 20 --out R.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from cpu_decode import recipe_student  # noqa: E402
from decode_paired import in_turns, paired, report  # noqa: E402
from linearize import load_teacher, set_options  # noqa: E402
from linearize.hf.mixer_hedgehog import HedgehogMixer  # noqa: E402


def separate(model):
    """Each mixer's feature maps as two calls again (the code before)."""
    for module in model.modules():
        if isinstance(module, HedgehogMixer):
            module.feature_maps = lambda q, k, m=module: (m.feature_q(q), m.feature_k(k))
    return model


def student(recipe, spread):
    model = recipe_student(load_teacher("smollm2-135m")[0], recipe)
    if spread:
        set_options(model, keep=139)
        set_options(model, layers="6-7+14+17-18+20-21+23", keep=1536)
    return model


parser = argparse.ArgumentParser()
parser.add_argument("--blocks", type=int, default=24)
parser.add_argument("--out", default=None)
args = parser.parse_args()
ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0]}
for name, recipe, spread in (("lolcats", "lolcats", False), ("lolcats_keep", "lolcats_keep", True)):
    models[f"{name} joint"] = student(recipe, spread)
    models[f"{name} separate"] = separate(student(recipe, spread))
times = in_turns(models, ids, args.blocks, 8)
rows = paired(times)
report(rows)
for name in ("lolcats", "lolcats_keep"):
    ratios = [s / j for s, j in zip(times[f"{name} separate"], times[f"{name} joint"])]
    mean = sum(ratios) / len(ratios)
    error = (sum((r - mean) ** 2 for r in ratios) / (len(ratios) - 1)) ** 0.5 / len(ratios) ** 0.5
    print(f"{name}: separate / joint {mean:.3f} +- {error:.3f}")
if args.out:
    Path(args.out).write_text(json.dumps({"models": rows, "block_ms": times}, indent=1))
