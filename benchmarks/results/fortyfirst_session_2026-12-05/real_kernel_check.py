"""The real lolcats_keep student (float32 and bfloat16) through linearize's kernels (Triton's interpreter, CPU) against
its PyTorch path: a 700-token prompt's logits (the prefill kernel) and 6 greedy steps (the fused decode step, one of
them deciding a block at 703)."""
import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its kernels run on CPU tensors
import time, torch
os.environ["LINEARIZE_FUSED_STEP"] = "on"
import linearize
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("/tmp/s41/student-v2", dtype=torch.float32).eval()
ids = torch.randint(100, 40000, (1, 700), generator=torch.Generator().manual_seed(0))
for dtype in (torch.float32, torch.bfloat16):
    model.to(dtype)
    results = {}
    for mode in ("on", "off"):
        os.environ["LINEARIZE_FUSED_STEP"] = mode
        t0 = time.time()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        results[mode] = (out.sequences[0, 700:].tolist(), torch.stack(out.logits).float())
        print(dtype, mode, f"{time.time() - t0:.0f} s", results[mode][0])
    (a, la), (b, lb) = results["on"], results["off"]
    print(dtype, "tokens equal", a == b, "logits max diff / max", ((la - lb).abs().max() / lb.abs().max()).item())
