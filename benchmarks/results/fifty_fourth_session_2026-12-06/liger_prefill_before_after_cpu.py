"""CPU, batch 1: 2K prefills of the teacher, `liger` and `liger@before` in turns (decode_paired's `in_turns` with
`Prefilling`). `liger@before` runs GLA as efc6ffe did: the keys, values, gates and state repeated to the 9 query heads,
efc6ffe's `chunk_gla` on them, the state cut back to the 3 kv heads; `liger` runs grouped queries on the kv heads.
python benchmarks/results/fifty_fourth_session_2026-12-06/liger_prefill_before_after_cpu.py [BLOCKS]"""
import copy, sys
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1] / "fifty_third_session_2026-12-06")]
import torch
from cpu_decode import recipe_student
from decode_paired import Prefilling, in_turns, paired, report
from ops_before_after_cpu import old_module
from linearize import load_teacher
from linearize.hf import mixer_gla

OLD = old_module("ops_gated", "efc6ffe")
today = mixer_gla.gla


def repeated(q, k, v, gk, scale=None, initial_state=None, decode=False, output_state=False, dtype=None):
    groups = q.shape[1] // k.shape[1]
    k, v, gk = (x.repeat_interleave(groups, 1) for x in (k, v, gk))
    state = None if initial_state is None else initial_state.repeat_interleave(groups, 1)
    o, final = (OLD.recurrent_gla if decode else OLD.chunk_gla)(q, k, v, gk, scale=scale, initial_state=state)
    return o, final[:, ::groups].clone()


def swap(name: str) -> None:
    mixer_gla.gla = repeated if name.endswith("@before") else today


ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0], "liger": recipe_student(load_teacher("smollm2-135m")[0], "liger")}
models["liger@before"] = copy.deepcopy(models["liger"])
with torch.no_grad():
    a = models["liger"](ids[:, :300]).logits
    swap("liger@before")
    b = models["liger@before"](ids[:, :300]).logits
    swap("liger")
    print("max |logits after - before| (300 tokens):", (a - b).abs().max().item())
report(paired(in_turns(models, ids, blocks=int(sys.argv[1]) if len(sys.argv) > 1 else 6, steps=1, before=swap, kind=Prefilling)), "prefill")
