"""`hedgehog_swa`'s decode step before and after commit fcee372, timed in turns with the teacher (decode_paired.py's
blocks): each recipe's student decodes twice from its own cache, once through the step of commit 8e21cb6.

    git show 8e21cb6:linearize/hf/ops_window.py > /tmp/ops_window_8e21cb6.py
    python benchmarks/results/thirtyseventh_session_2026-12-04/old_step_probe.py /tmp/ops_window_8e21cb6.py lolcats,hybrid_long 40
"""

import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from cpu_decode import recipe_student  # noqa: E402
from decode_paired import in_turns, paired, report  # noqa: E402

import linearize.hf.mixer_hedgehog as hedgehog  # noqa: E402
from linearize import load_teacher  # noqa: E402

spec = importlib.util.spec_from_file_location("ops_window_before", sys.argv[1])
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)
steps = {False: hedgehog.decode_window_linear, True: before.decode_window_linear}
ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0]}
for recipe in sys.argv[2].split(","):
    models[recipe] = models[recipe + " before"] = recipe_student(load_teacher("smollm2-135m")[0], recipe)


def use(name: str) -> None:
    hedgehog.decode_window_linear = steps[name.endswith(" before")]


report(paired(in_turns(models, ids, int(sys.argv[3]), 8, before=use)))
