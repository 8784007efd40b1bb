"""CPU, batch 1: 2K prefills of the teacher, `lolcats` and `liger` in turns (decode_paired's `in_turns` with
`Prefilling`), each student also as NAME@before with the window's and GLA's chunked forms of 10e2908's parent swapped
in before its blocks. python benchmarks/results/fifty_third_session_2026-12-06/prefill_before_after_cpu.py"""
import copy, importlib.util, subprocess, sys, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import torch
from cpu_decode import recipe_student
from decode_paired import Prefilling, in_turns, paired, report
from linearize import load_teacher
from linearize.hf import kernel_dispatch, ops_gated, ops_window


def old(module: str):
    source = subprocess.run(["git", "show", f"10e2908~1:linearize/hf/{module}.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"old_{module}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


OLD_WINDOW, OLD_GATED = old("ops_window"), old("ops_gated")
NEW = (ops_window._chunk_window_block, kernel_dispatch.chunk_gla)


def swap(name: str) -> None:
    before = name.endswith("@before")
    ops_window._chunk_window_block = OLD_WINDOW._chunk_window_block if before else NEW[0]
    kernel_dispatch.chunk_gla = OLD_GATED.chunk_gla if before else NEW[1]


ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0]}
for recipe in ("lolcats", "liger"):
    models[recipe] = recipe_student(load_teacher("smollm2-135m")[0], recipe)
    models[f"{recipe}@before"] = copy.deepcopy(models[recipe])
report(paired(in_turns(models, ids, blocks=6, steps=1, before=swap, kind=Prefilling)), "prefill")
