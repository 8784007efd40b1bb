"""decode_dispatches.measure on CPU with the fused steps' launches mocked (empty heads), as on CUDA where they run."""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # benchmarks/
import decode_dispatches
from cpu_decode import recipe_student
from linearize import load_teacher
from linearize.hf import mixers
mixers.fused_step_problem = lambda *a, **k: None
torch.set_num_threads(2)
for name in ["teacher"] + sys.argv[1].split(","):
    teacher, _ = load_teacher("smollm2-135m")
    model = (teacher if name == "teacher" else recipe_student(teacher, name)).eval()
    for cls in {type(m) for m in mixers.mixers_in(model)}:
        cls.launch_step = lambda self, hidden, q, k, v, cos, sin, real, tensors: torch.empty_like(q, memory_format=torch.contiguous_format)
    r = decode_dispatches.measure(model, 256, 10)
    print(name, round(r["step_ms"], 1), r["dispatches_outside_layers"], {k: (v["count"], round(v["dispatches"]), round(v["ms"], 3)) for k, v in r["layers"].items()}, flush=True)
