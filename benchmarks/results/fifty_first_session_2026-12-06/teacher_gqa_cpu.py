"""The teacher's CPU decode at 2K with transformers' GQA-native SDPA (as 5.25 calls it) and with its kv heads repeated
(as earlier versions did), timed in turns beside two students (`decode_paired.in_turns`): how much of the students'
ratio the teacher's SDPA path moves. python benchmarks/results/fifty_first_session_2026-12-06/teacher_gqa_cpu.py 30"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # benchmarks/
import transformers.integrations.sdpa_attention as sdpa
from decode_paired import in_turns, paired, report
from cpu_decode import recipe_student
from linearize import load_teacher
native = sdpa.use_gqa_in_sdpa
ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0], "teacher, kv heads repeated": load_teacher("smollm2-135m")[0],
          "lolcats": recipe_student(load_teacher("smollm2-135m")[0], "lolcats"), "hybrid_long": recipe_student(load_teacher("smollm2-135m")[0], "hybrid_long")}
def before(name):
    sdpa.use_gqa_in_sdpa = (lambda *a, **k: False) if name == "teacher, kv heads repeated" else native
print(transformers_version := __import__("transformers").__version__)
report(paired(in_turns(models, ids, blocks=int(sys.argv[1]), steps=8, before=before)))
