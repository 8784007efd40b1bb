"""On the GPU: another process holds 60 GiB, this one 4 GiB and asks for 40 more; after the out-of-memory error
`held_elsewhere` and the stage error it feeds (`out_of_memory_message`). Run from the repository root:
PYTHONPATH=$PWD python3 benchmarks/results/fifty_first_session_2026-12-06/oom_shared_gpu.py
"""
import subprocess, sys, torch
from linearize.distillation.loop import held_elsewhere, out_of_memory_message
hog = subprocess.Popen([sys.executable, "-c", "import torch,time; x=torch.empty(60*2**30, dtype=torch.uint8, device='cuda'); print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
print(hog.stdout.readline().strip())
dev = torch.device("cuda", 0)
mine = torch.empty(4 * 2**30, dtype=torch.uint8, device=dev)
try:
    torch.empty(40 * 2**30, dtype=torch.uint8, device=dev)
except torch.cuda.OutOfMemoryError:
    held, total = held_elsewhere(dev)
    print("held elsewhere %.2f GiB of %.2f; reserved here %.2f GiB" % (held / 2**30, total / 2**30, torch.cuda.memory_reserved(dev) / 2**30))
    print(out_of_memory_message("stages[1] (lora_kd)", 1, 1, 512, "data.seq_len", dev))
hog.kill()
