"""Batch-1 CPU decode at 2K of the teacher and lolcats_keep as served (139 kept keys, 1,536 on layers 6, 7, 14, 17, 18,
20, 21, 23; untrained: a step's work does not depend on its weights), in turns (decode_paired.py's Decoding), each
attention module's wall time per call by forward hooks, and the first layer's, its MLP's, the decoder's and the
model's: where the student's step differs from the teacher's. Run from the repository root:
    python benchmarks/results/fortyeighth_session_2026-12-06/layer_times_cpu.py
"""
import sys, torch, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from cpu_decode import recipe_student
from decode_paired import Decoding
from linearize import load_teacher, set_options
ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
t = load_teacher("smollm2-135m")[0].eval()
s = recipe_student(load_teacher("smollm2-135m")[0], "lolcats_keep").eval()
set_options(s, keep=139)
set_options(s, layers="6-7+14+17-18+20-21+23", keep=1536)
times = {}
def hook(name):
    def pre(mod, args, kwargs):
        mod._t = time.perf_counter()
    def post(mod, args, kwargs, out):
        times.setdefault(name, []).append(time.perf_counter() - mod._t)
    return pre, post
for name, m in (("teacher", t), ("student", s)):
    for i, layer in enumerate(m.get_decoder().layers):
        pre, post = hook(f"{name}{'K' if name=='student' and i in (6,7,14,17,18,20,21,23) else ''}")
        layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True)
        layer.self_attn.register_forward_hook(post, with_kwargs=True)
    for part, mod in (("model", m), ("decoder", m.get_decoder()), ("layer0", m.get_decoder().layers[0]), ("mlp0", m.get_decoder().layers[0].mlp)):
        pre, post = hook(name + "-" + part)
        mod.register_forward_pre_hook(pre, with_kwargs=True)
        mod.register_forward_hook(post, with_kwargs=True)
with torch.no_grad():
    ds = {n: Decoding(m, ids) for n, m in (("teacher", t), ("student", s))}
    times.clear()
    for r in range(6):
        for n, d in ds.items():
            d.block(8)
for n, v in times.items():
    v = sorted(v)
    print(n, len(v), "median us", round(v[len(v)//2]*1e6), "mean", round(sum(v)/len(v)*1e6))
