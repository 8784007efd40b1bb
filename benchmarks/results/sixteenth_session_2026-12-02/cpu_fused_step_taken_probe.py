"""Which decode steps of a saved student take the fused step, against the random layout serving_speed.py builds: each
mixer's `fuses_step` answer (None: taken, else fused_step_problem's reason), counted over greedy generate() of 3 tokens
in bf16, the kernels interpreted on the CPU (TRITON_INTERPRET=1, LINEARIZE_FUSED_STEP=on).

    python cpu_fused_step_taken_probe.py STUDENT_FOLDER
"""
import collections
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
os.environ["LINEARIZE_FUSED_STEP"] = "on"
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import serving_speed  # noqa: E402
from linearize.hf import mixers, triton_step  # noqa: E402

taken = collections.Counter()


def fuses_step(self, hidden_states, q, k, v, position_embeddings, state):
    if state is None or q.shape[2] != 1:
        return False
    problem = triton_step.fused_step_problem(
        hidden_states, q, k, v, position_embeddings, self.window, state.tensors, self.step_tensors, self.chunks_window
    )
    taken[(type(self).__name__, problem)] += 1
    return problem is None


mixers.FusedStepMixer.fuses_step = fuses_step
for name, model in [
    ("saved", AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)),
    ("random layout", serving_speed.random_students("smollm2-135m", ["hybrid_gdn"], torch.bfloat16)["hybrid_gdn"]),
]:
    taken.clear()
    with torch.no_grad():
        model.eval().generate(input_ids=torch.randint(0, 49152, (1, 40)), max_new_tokens=3, do_sample=False)
    print(name, dict(taken), collections.Counter(str(p.dtype) for p in model.parameters()), flush=True)
