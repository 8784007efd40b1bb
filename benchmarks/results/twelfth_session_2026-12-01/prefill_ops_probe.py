"""CPU probe (twelfth session): top-level aten ops in one 64-token prefill of a random student of hybrid_gdn's shape
(the gated delta rule stubbed out) against its teacher (teacher_mode), and a converted layer's ops by part. Run from the
repository root: python benchmarks/results/twelfth_session_2026-12-01/prefill_ops_probe.py"""

import collections
import sys

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

import linearize
import linearize.hf.mixer_gated_deltanet as gdn

sys.path.insert(0, "benchmarks")
from serving_speed import random_students  # noqa: E402


def stub(q, k, v, g, beta, scale=None, initial_state=None, decode=False, output_state=False):
    return torch.zeros_like(v), None


def labelled(function, label):
    def inner(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)

    return inner


def top_level(model, ids):
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return [e for e in prof.events() if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


gdn.gated_delta_rule = stub
for name in ("convolve_heads", "add_window", "repeat_heads"):
    setattr(gdn, name, labelled(getattr(gdn, name), name))
gdn.F.normalize = labelled(gdn.F.normalize, "normalize")
gdn.GatedDeltaNetMixer.gates = labelled(gdn.GatedDeltaNetMixer.gates, "gates")
model = random_students("smollm2-135m", ["hybrid_gdn"], torch.float32)["hybrid_gdn"].eval()
ids = torch.randint(0, 49152, (1, 64))
top_level(model, ids)
student = top_level(model, ids)
with linearize.teacher_mode(model):
    teacher = top_level(model, ids)
converted = sum(entry["mixer"] != "attention" for entry in model.config.layers)
print(f"top-level aten ops: student {len(student)}, teacher {len(teacher)}, per converted layer beyond a teacher layer "
      f"{(len(student) - len(teacher)) / converted:.0f}")
parts = collections.Counter()
labels = {"convolve_heads", "add_window", "repeat_heads", "normalize", "gates"}
for event in student:
    parent = event.cpu_parent
    while parent is not None and parent.name not in labels:
        parent = parent.cpu_parent
    parts[parent.name if parent else "rest of the layer"] += 1
print({part: round(count / converted) for part, count in parts.items()})
