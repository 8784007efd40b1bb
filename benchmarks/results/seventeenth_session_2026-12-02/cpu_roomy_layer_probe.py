"""Decode steps of the real teacher converted with every layer kept, one prefill, its kept layers' caches alternately
transformers' DynamicLayer (concatenating every step) and linearize's RoomyLayer (appending into room), float32, on
the CPU. Each round times STEPS greedy steps of each kind from the same cache, swapping the layers' classes between.

    python cpu_roomy_layer_probe.py [BATCH] [CONTEXT] [STEPS] [ROUNDS]
"""
import sys
import time

import torch
from transformers.cache_utils import DynamicLayer

import linearize
from linearize.hf.cache import RoomyLayer, returned_cache

batch, context, steps, rounds = (int(a) for a in (sys.argv[1:] + ["8", "4096", "8", "2"][len(sys.argv) - 1 :]))
teacher, _ = linearize.load_teacher("smollm2-135m")
model = linearize.convert(teacher, "attention").eval()
ids = torch.randint(0, 49152, (batch, context), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    cache = None
    for chunk in ids.split(1024, dim=1):
        out = model(chunk, cache=cache, use_cache=True, logits_to_keep=1)
        cache = returned_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(rounds):
        for kind in (DynamicLayer, RoomyLayer):
            for layer in cache.layers:
                layer.__class__ = kind
            begin = time.perf_counter()
            for _ in range(steps):
                out = model(token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            seconds = time.perf_counter() - begin
            print(f"{kind.__name__}: {batch * steps / seconds:.1f} tokens/s ({seconds / steps * 1000:.0f} ms a step), batch {batch}, context {cache.get_seq_length()}", flush=True)
