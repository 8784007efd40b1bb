"""Timing probe only (python window_copy_probe.py hybrid_long,lolcats 20): hedgehog_swa's decode step with the window's copies removed (the window read in place, the
new key not written: wrong numbers, the lower bound of a copy-free window), in turns with the real step."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from cpu_decode import recipe_student
from decode_paired import in_turns, paired, report
import linearize.hf.mixer_hedgehog as hedgehog
from linearize import load_teacher
real = hedgehog.decode_window_linear

def nocopy(q, k, v, fq, fk, *, window, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None, state=None, decay=None):
    if not state:
        return real(q, k, v, fq, fk, window=window, scaling=scaling, sm_weight=sm_weight, ln_weight=ln_weight, key_mask=key_mask, softcap=softcap, state=state, decay=decay)
    b, h, _, d = q.shape
    hkv = k.shape[1]
    keys, values, features, mask = state["k"], state["v"], state["fk"], state["mask"]
    g, rows, width = h // hkv, b * hkv, keys.shape[2]
    scores = torch.bmm(q.reshape(rows, g, d), keys.view(rows, width, d).mT) * scaling
    scores = torch.where(mask.view(b, 1, 1, width), scores.view(b, hkv, g, width), float("-inf"))
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    smw, lnw = (w.view(hkv, g, 1) for w in (sm_weight, ln_weight))
    a = torch.exp(scores - peak) * smw
    S, z = state["S"], state["z"]
    fqg = fq.reshape(rows, g, -1)
    linear = torch.bmm(fqg, S.view(rows, *S.shape[2:])).view(b, hkv, g, -1)
    linear_mass = torch.bmm(fqg, z.view(rows, -1, 1)).view(b, hkv, g, 1)
    num = torch.bmm(a.view(rows, g, width), values.view(rows, width, -1)).view(b, hkv, g, -1)
    num, den = (torch.addcmul(x, lnw, y) for x, y in ((num, linear), (a.sum(-1, keepdim=True), linear_mass)))
    o = (num / den.clamp_min(1e-30)).view(b, h, 1, -1)
    old = features[:, :, 0] * mask[:, :1].view(b, 1, 1)
    S = torch.baddbmm(S.reshape(rows, *S.shape[2:]), old.view(rows, -1, 1), values[:, :, 0].view(rows, 1, -1)).view(S.shape)
    return o, {"S": S, "z": z + old, "k": keys, "v": values, "fk": features, "mask": mask}

ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0]}
for recipe in sys.argv[1].split(","):
    models[recipe] = models[recipe + " nocopy"] = recipe_student(load_teacher("smollm2-135m")[0], recipe)
def use(name):
    hedgehog.decode_window_linear = nocopy if name.endswith(" nocopy") else real
report(paired(in_turns(models, ids, int(sys.argv[2]), 8, before=use)))
