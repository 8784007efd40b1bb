"""ATen operations of one converted layer's decode step (its attention module, projections included), with the CPU
step and on the PyTorch path (LINEARIZE_FUSED_STEP=off), at 2K, CPU: python benchmarks/results/fifty_second_session_2026-12-06/op_count_cpu.py lolcats,lolcats_linear,lolcats_keep"""
import sys, os, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # benchmarks/
from cpu_decode import recipe_student
from linearize import load_teacher
from linearize.hf.cache import returned_cache
from torch.profiler import profile, ProfilerActivity
ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
for recipe in sys.argv[1].split(","):
    m = recipe_student(load_teacher("smollm2-135m")[0], recipe).eval()
    base = m.model.model if hasattr(m.model, "model") else m.model
    idx = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    layer = base.layers[idx]
    with torch.no_grad():
        out = m(ids, use_cache=True); cache = returned_cache(out)
        x = torch.randn(1, 1, 576); pe = base.rotary_emb(x, torch.tensor([[2048]]))
        for switch in ("off", "auto"):
            os.environ["LINEARIZE_FUSED_STEP"] = switch
            f = lambda: layer.self_attn(x, position_embeddings=pe, attention_mask=None, past_key_values=cache)
            f()
            with profile(activities=[ProfilerActivity.CPU]) as p: f()
            ev = list(p.events())
            top = [e for e in ev if e.cpu_parent is None]
            print(f"{recipe} layer {idx} {'PyTorch path' if switch == 'off' else 'CPU step'}: {len(top)} top-level ATen calls, {len(ev)} in all")
