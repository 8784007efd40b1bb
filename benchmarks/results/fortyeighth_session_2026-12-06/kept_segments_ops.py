"""ATen calls of a 12,608-token prefill with kept keys (SmolLM2-135M's shape: 9 query / 3 kv heads of 64, 128 features;
window 256, blocks of 64; 139 and 1,536 kept keys), the heads' scoring replaced by nothing (on the GPU the kernel does it
in one launch): segmented as the PyTorch path segments it and as the kernel path now does (`ops_kept.segment_length`).
A prefill on the GPU is bound by these calls (host-bound, forty-seventh session). `python kept_segments_ops.py`"""
import torch, sys
from torch.utils._python_dispatch import TorchDispatchMode
from linearize.hf import ops_kept
class Count(TorchDispatchMode):
    n = 0
    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        s.n += 1
        return func(*args, **(kwargs or {}))
ops_kept._heads = lambda *a, **k: a[0]  # the GPU runs the kernel here: the decisions and sums alone
ops_kept.kept_window_prefill = ops_kept._heads
b,h,hkv,d,F=1,9,3,64,128
for keep in (139, 1536):
    for kernel in (False, True):
        ops_kept.kept_prefill_problem = (lambda *a: None) if kernel else (lambda *a: "cpu")
        T = 12608
        q=torch.randn(b,h,T,d); k=torch.randn(b,hkv,T,d); v=torch.randn(b,hkv,T,d)
        fq=torch.rand(b,h,T,F); fk=torch.rand(b,hkv,T,F)
        kw=dict(window=256, keep=keep, block=64, scaling=0.125, sm_weight=torch.full((h,),.5), ln_weight=torch.full((h,),.5))
        with torch.no_grad(), Count() as c:
            ops_kept.kept_window_linear(q,k,v,fq,fk, output_state=True, **kw)
        print(f"keep {keep}, {'kernel' if kernel else 'pytorch'} segments: {T} tokens, {c.n} ATen calls")
