"""CPU, batch 1: 2K prefills of the teacher, `lolcats` and `lolcats@before` in turns (decode_paired's `in_turns` with
`Prefilling`). `lolcats@before` runs REV's (default 078fb15) `ops_window._chunk_window_block`: query chunks as long as
the 256-key window, each scoring two chunks of keys; `lolcats` today's: chunks of 64 queries, each scoring the four
chunks its window reaches and its own.
python benchmarks/results/fifty_fourth_session_2026-12-06/window_prefill_before_after_cpu.py [REV [BLOCKS]]"""
import copy, sys
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1] / "fifty_third_session_2026-12-06")]
import torch
from cpu_decode import recipe_student
from decode_paired import Prefilling, in_turns, paired, report
from ops_before_after_cpu import old_module
from linearize import load_teacher
from linearize.hf import ops_window

REV = sys.argv[1] if len(sys.argv) > 1 else "078fb15"
OLD, today = old_module("ops_window", REV)._chunk_window_block, ops_window._chunk_window_block


def swap(name: str) -> None:
    ops_window._chunk_window_block = OLD if name.endswith("@before") else today


ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0], "lolcats": recipe_student(load_teacher("smollm2-135m")[0], "lolcats")}
models["lolcats@before"] = copy.deepcopy(models["lolcats"])
with torch.no_grad():
    a = models["lolcats"](ids).logits
    swap("lolcats@before")
    b = models["lolcats@before"](ids).logits
    swap("lolcats")
    print("max |logits after - before|:", (a - b).abs().max().item(), "of", a.abs().max().item())
report(paired(in_turns(models, ids, blocks=int(sys.argv[2]) if len(sys.argv) > 2 else 6, steps=1, before=swap, kind=Prefilling)), "prefill")
