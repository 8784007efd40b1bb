"""The trained lolcats_keep student (float32, CPU): greedy generate() of 140 tokens after a 300-token prompt of Emma,
dynamic cache (eager) against a static cache compiled as generate() compiles it on CUDA (fullgraph, dynamo's eager
backend): graphs traced, tokens and logits. Positions 300-439 cross the block ends at 319 and 383."""
import os
import time

import torch
import linearize  # noqa: F401 (registers the converted model's classes)
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig
STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")  # the fortieth session's lolcats_keep: student_delta.py load of runs/keepbench/delta-v2.tgz
m = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(STUDENT)
text = open("/work/shared/data/austen/" + sorted(os.listdir("/work/shared/data/austen"))[0]).read()[20000:40000]
ids = tok(text, return_tensors="pt").input_ids[:, :300]
s = dict(input_ids=ids, max_new_tokens=140, min_new_tokens=140, do_sample=False, output_logits=True, return_dict_in_generate=True)
t = time.time(); dyn = m.generate(**s); print("dynamic", time.time() - t)
cfg = CompileConfig(backend="eager", fullgraph=True, mode=None); cfg._compile_all_devices = True
torch._dynamo.reset(); counters.clear()
t = time.time(); st = m.generate(**s, cache_implementation="static", compile_config=cfg); print("static compiled", time.time() - t)
print("graphs", counters["stats"]["unique_graphs"], "equal tokens", torch.equal(st.sequences, dyn.sequences))
print("max logit diff", (torch.stack(st.logits) - torch.stack(dyn.logits)).abs().max().item())
print(tok.decode(st.sequences[0, 300:]))
