"""CPU, batch 1, at 2K: each decoder layer's attention module (and MLP) timed by hooks over 16 decode steps, the
teacher, `lolcats` and `lolcats_keep` as shipped (139 / 1,536 kept keys), after decode_paired's prefill; the median
a layer, and the sum over the 30 layers. python benchmarks/results/fifty_first_session_2026-12-06/module_times_cpu.py"""
import sys, torch, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # benchmarks/
from decode_paired import Decoding
from cpu_decode import recipe_student
from linearize import load_teacher, set_options
from linearize.cli import parse_options
ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
models = {"teacher": load_teacher("smollm2-135m")[0].eval(), "lolcats": recipe_student(load_teacher("smollm2-135m")[0], "lolcats").eval()}
k = recipe_student(load_teacher("smollm2-135m")[0], "lolcats_keep").eval()
set_options(k, **parse_options(["keep=139"])); set_options(k, layers="6-7+14+17-18+20-21+23", **parse_options(["keep=1536"]))
models["lolcats_keep"] = k
def layers(m):
    return m.model.layers if hasattr(m.model, "layers") else m.model.model.layers
with torch.no_grad():
    runs = {n: Decoding(m, ids) for n, m in models.items()}
    res = {n: {"attn": [], "mlp": [], "step": []} for n in models}
    for n, m in models.items():
        st = {}
        for part in ("self_attn", "mlp"):
            for i, l in enumerate(layers(m)):
                mod = getattr(l, part)
                mod.register_forward_pre_hook(lambda mm, a, kw, part=part, i=i: st.__setitem__((part, i), time.perf_counter()), with_kwargs=True)
                mod.register_forward_hook(lambda mm, a, kw, o, part=part, i=i, n=n: res[n]["attn" if part == "self_attn" else "mlp"].append((i, time.perf_counter() - st[(part, i)])), with_kwargs=True)
    for r in range(6):
        for n, d in runs.items():
            for v in res[n].values(): v.clear()
            res[n]["step"].append(d.block(16))
    for n in models:
        a = res[n]["attn"]; per = {}
        for i, t in a: per.setdefault(i, []).append(t)
        import statistics
        med = {i: statistics.median(v) * 1e6 for i, v in per.items()}
        mlp = statistics.median(t for _, t in res[n]["mlp"]) * 1e6
        print(n, "step ms", round(res[n]["step"][-1], 2), "attn us/layer median", round(statistics.median(med.values()), 1), "sum attn ms", round(sum(med.values()) / 1e3, 2), "mlp us", round(mlp, 1))
        if n == "lolcats_keep":
            print("  kept layers", {i: round(med[i]) for i in (6, 7, 14, 17)}, "others", {i: round(med[i]) for i in (0, 3, 10)})
