"""Kept softmax layers' keys and values written into room after them (`RoomyLayer`, as shipped) against concatenated at
every step (as transformers' own cache does), each student decoding twice from its own cache, in turns with the
teacher (decode_paired.py's blocks of 8 steps):

    python benchmarks/results/thirtyseventh_session_2026-12-04/kv_room_probe.py hybrid_long,hybrid_gdn 30
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from cpu_decode import recipe_student  # noqa: E402
from decode_paired import in_turns, paired, report  # noqa: E402

import linearize.hf.cache as cache_module  # noqa: E402
from linearize import load_teacher  # noqa: E402

room = cache_module.append_into_room


def cat(room_, held, new, *args, **kwargs):
    return None, torch.cat((held, new), dim=-2)


recipes, blocks = sys.argv[1].split(","), int(sys.argv[2])
context = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
ids = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0]}
for r in recipes:
    models[r] = models[r + "@cat"] = recipe_student(load_teacher("smollm2-135m")[0], r)


def use(name: str) -> None:
    cache_module.append_into_room = cat if name.endswith("@cat") else room


report(paired(in_turns(models, ids, blocks, 8, before=use)))
