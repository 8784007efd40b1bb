"""CPU, batch 1: 2K prefills of the teacher and students in turns (decode_paired's `in_turns` with `Prefilling`),
each student also as NAME@before with the forms of REV (default 10e2908's parent) swapped in before its blocks: the
window's and GLA's chunked forms, the kept keys' segment heads (`ops_kept._heads`) and the sliding window's bands
(`windows._bands`).
python benchmarks/results/fifty_third_session_2026-12-06/prefill_before_after_cpu.py [REV [RECIPES]]"""
import copy, subprocess, sys
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]  # benchmarks/, and this folder
import torch
from cpu_decode import recipe_student
from decode_paired import Prefilling, in_turns, paired, report
from ops_before_after_cpu import old_module  # beside this file
from linearize import load_teacher
from linearize.hf import kernel_dispatch, ops_kept, ops_window, windows


REV = sys.argv[1] if len(sys.argv) > 1 else "10e2908~1"
RECIPES = sys.argv[2].split(",") if len(sys.argv) > 2 else ["lolcats", "liger"]


def source_of(module: str) -> str:
    return subprocess.run(["git", "show", f"{REV}:linearize/hf/{module}.py"], capture_output=True, text=True, check=True).stdout


def old_function(module, name: str):
    """REV's `module.name`, compiled into today's module's globals (its helpers and imports)."""
    namespace = dict(vars(module))
    exec(compile(source_of(module.__name__.rsplit(".", 1)[-1]), f"{REV}:{module.__name__}", "exec"), namespace)
    return namespace[name]


OLD_WINDOW, OLD_GATED = old_module("ops_window", REV), old_module("ops_gated", REV)
SWAPS = [  # (module, name, REV's, today's)
    (ops_window, "_chunk_window_block", OLD_WINDOW._chunk_window_block, ops_window._chunk_window_block),
    (kernel_dispatch, "chunk_gla", OLD_GATED.chunk_gla, kernel_dispatch.chunk_gla),
    (ops_kept, "_heads", old_function(ops_kept, "_heads"), ops_kept._heads),
    (windows, "_bands", old_function(windows, "_bands"), windows._bands),
]


def swap(name: str) -> None:
    before = name.endswith("@before")
    for module, attribute, theirs, ours in SWAPS:
        setattr(module, attribute, theirs if before else ours)


ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0]}
for recipe in RECIPES:
    models[recipe] = recipe_student(load_teacher("smollm2-135m")[0], recipe)
    models[f"{recipe}@before"] = copy.deepcopy(models[recipe])
report(paired(in_turns(models, ids, blocks=6, steps=1, before=swap, kind=Prefilling)), "prefill")
