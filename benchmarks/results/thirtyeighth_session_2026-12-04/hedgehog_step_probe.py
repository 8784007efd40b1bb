"""`hedgehog_swa`'s decode path before this session (commit 3b6a841) and after, in one process, timed in turns with the
teacher (decode_paired.py's blocks): each recipe's student decodes twice from its own cache, once with the step, the
feature maps, RoPE and the projections of 3b6a841 swapped in.

    for f in ops_window attention mixer_hedgehog; do git show 3b6a841:linearize/hf/$f.py > /tmp/old/$f.py; done
    python benchmarks/results/thirtyeighth_session_2026-12-04/hedgehog_step_probe.py /tmp/old lolcats,hybrid_long 30
"""

import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from cpu_decode import recipe_student  # noqa: E402
from decode_paired import in_turns, paired, report  # noqa: E402

import linearize.hf.mixers as mixers  # noqa: E402
import linearize.hf.mixer_hedgehog as hedgehog  # noqa: E402
from linearize import load_teacher  # noqa: E402
from linearize.hf.attention import AttentionSpec  # noqa: E402


def load(name: str):
    """The old file `name`.py as a module of the package (its relative imports resolve to today's modules)."""
    spec = importlib.util.spec_from_file_location(f"linearize.hf.before_{name}", Path(sys.argv[1]) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    keep, mixers.register_mixer = mixers.register_mixer, lambda cls: cls  # the old mixers are not registered again
    spec.loader.exec_module(module)
    mixers.register_mixer = keep
    return module


old_window, old_attention, old_hedgehog = load("ops_window"), load("attention"), load("mixer_hedgehog")
versions = {
    False: (hedgehog.decode_window_linear, hedgehog.apply_rotary, hedgehog.HedgehogFeatureMap.forward, AttentionSpec.project, AttentionSpec.out),
    True: (old_window.decode_window_linear, old_attention.apply_rotary, old_hedgehog.HedgehogFeatureMap.forward,
           old_attention.AttentionSpec.project, old_attention.AttentionSpec.out),
}


def use(name: str) -> None:
    step, rotary, features, project, out = versions[name.endswith(" before")]
    hedgehog.decode_window_linear, hedgehog.apply_rotary = step, rotary
    hedgehog.HedgehogFeatureMap.forward, AttentionSpec.project, AttentionSpec.out = features, project, out


ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0]}
for recipe in sys.argv[2].split(","):
    models[recipe] = models[recipe + " before"] = recipe_student(load_teacher("smollm2-135m")[0], recipe)
report(paired(in_turns(models, ids, int(sys.argv[3]), 8, before=use)))
