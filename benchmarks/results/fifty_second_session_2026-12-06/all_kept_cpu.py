"""CPU, 2K, in turns: the teacher; the teacher converted with 29 of its 30 layers kept as softmax (the student's model class and
cache, no converted layer but the last); hybrid_gdn's and lolcats' students. python benchmarks/results/fifty_second_session_2026-12-06/all_kept_cpu.py hybrid_gdn,lolcats 20"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # benchmarks/
from decode_paired import in_turns, paired, report
from cpu_decode import recipe_student
import linearize
from linearize import load_teacher
ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0]}
models["29 kept"] = linearize.convert(load_teacher("smollm2-135m")[0], "gated_deltanet", keep_attention=list(range(29)))
for r in sys.argv[1].split(","):
    models[r] = recipe_student(load_teacher("smollm2-135m")[0], r)
print({n: type(m).__name__ for n, m in models.items()})
report(paired(in_turns(models, ids, int(sys.argv[2]), 8)))
