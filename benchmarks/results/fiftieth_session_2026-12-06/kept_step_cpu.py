"""CPU, 2 threads, float32: one decode step's attention of `lolcats_keep`'s kept keys (`ops_kept.decode_kept_window_linear`,
window 256, kept keys 139 and 1,536, after a 2,048-token prefill of random tensors at SmolLM2-135M's shape: 9 query
and 3 kv heads of 64, 64 features) against the teacher's SDPA over 2,049 keys (with enable_gqa, as transformers calls it
with no mask, and with its kv heads repeated), microseconds a call; then torch.profiler's table of the 1,536-key step.
Run from the repository root: python benchmarks/results/fiftieth_session_2026-12-06/kept_step_cpu.py
"""
import torch, time
import torch.nn.functional as F
from linearize.hf.ops_kept import decode_kept_window_linear, kept_window_linear
torch.set_num_threads(2)
torch.manual_seed(0)
b,h,hkv,d,f=1,9,3,64,64
def bench(fn, n=300):
    for _ in range(20): fn()
    t=time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter()-t)/n*1e6
# teacher: SDPA over 2049 keys, GQA expand as HF does (repeat_kv)
K=torch.randn(b,hkv,2049,d); V=torch.randn(b,hkv,2049,d); q=torch.randn(b,h,1,d)
def teacher():
    k=K[:,:,None].expand(b,hkv,3,2049,d).reshape(b,h,2049,d); v=V[:,:,None].expand(b,hkv,3,2049,d).reshape(b,h,2049,d)
    return F.scaled_dot_product_attention(q,k,v)
def teacher_gqa():
    return F.scaled_dot_product_attention(q,K,V,enable_gqa=True)
print("teacher sdpa (repeat_kv)", round(bench(teacher)), "us; enable_gqa", round(bench(teacher_gqa)))
for keep in (139, 1536):
    with torch.no_grad():
        T=2048
        qq=torch.randn(b,h,T,d); kk=torch.randn(b,hkv,T,d); vv=torch.randn(b,hkv,T,d); fq=torch.rand(b,h,T,f); fk=torch.rand(b,hkv,T,f)
        o, st = kept_window_linear(qq,kk,vv,fq,fk,window=256,keep=keep,block=64,scaling=0.125,state=None,position=0,output_state=True)
        q1=torch.randn(b,h,1,d); k1=torch.randn(b,hkv,1,d); v1=torch.randn(b,hkv,1,d); fq1=torch.rand(b,h,1,f); fk1=torch.rand(b,hkv,1,f)
        def step():
            return decode_kept_window_linear(q1,k1,v1,fq1,fk1,window=256,keep=keep,block=64,scaling=0.125,state=st,position=2048+1, decide=False)
        print("kept", keep, "width", st["k"].shape[2], round(bench(step)), "us")
from torch.profiler import profile
with torch.no_grad(), profile() as p:
    for _ in range(100): step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
