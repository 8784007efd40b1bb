# %% [markdown]
# # linearize from Python
#
# The whole pipeline as notebook cells: load a teacher, convert it, check the self-teacher, distill briefly,
# score teacher and student side by side, save, reload with plain transformers, and generate with the cache.
# Runs on CPU in a few minutes with the embedded default teacher:
#
#     python examples/python_api.py                                  # SmolLM2-135M-Instruct, offline
#     python examples/python_api.py --teacher path/to/hf-folder --tokens 1024 --out /tmp/example
#
# In a notebook, run the cells in order (the argument parsing falls back to the defaults).

# %%
import argparse
import sys

import torch
from transformers import AutoModelForCausalLM

import linearize

parser = argparse.ArgumentParser(description="linearize's Python API, end to end")
parser.add_argument("--teacher", default="smollm2-135m", help="Hub id, local folder, .gguf file or alias")
parser.add_argument("--mixer", default="hedgehog_swa")
parser.add_argument("--tokens", type=int, default=8192, help="attention-transfer budget")
parser.add_argument("--seq-len", type=int, default=512)
parser.add_argument("--out", default="out/example")
args = parser.parse_args([] if "ipykernel" in sys.modules else None)

# %% Load the teacher (float32 on CPU) and convert every layer, reusing its q/k/v/o weights.
teacher, tokenizer = linearize.load_teacher(args.teacher)
prompt = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt")
with torch.no_grad():
    teacher_logits = teacher(**prompt).logits

student = linearize.convert(teacher, args.mixer)  # converts in place and returns the converted model
for line in student.config.layers[:3]:
    print(line)

# %% The self-teacher: the converted model computes the original softmax attention on the same weights.
with torch.no_grad(), linearize.teacher_mode(student):
    again = student(**prompt).logits
print("teacher_mode reproduces the teacher:", torch.allclose(again, teacher_logits, atol=1e-4, rtol=0))

# %% The quickstart recipe's two stages on the packaged Pride and Prejudice, with smaller budgets: attention
# transfer, then LoRA knowledge distillation from the same weights under teacher_mode (a quarter of the tokens).
lora_tokens = max(2 * args.seq_len, args.tokens // 4)
student = linearize.distill(
    student,
    "prideprejudice",
    "quickstart",
    tokenizer=tokenizer,
    overrides=[f"data.seq_len={args.seq_len}", f"stages.0.tokens={args.tokens}", f"stages.1.tokens={lora_tokens}",
               "stages.0.checkpoint_every=0", "stages.1.checkpoint_every=0"],
)

# %% Teacher and student side by side on held-out text (Persuasion, packaged).
results = linearize.evaluate(student, tokenizer, perplexity="persuasion", contexts=[args.seq_len], max_tokens=4 * args.seq_len)
for record in results.of("perplexity"):
    print(f"{record['model']:>40s}: perplexity {record['value']:.2f}")

# %% Save, reload with plain transformers, and generate with and without the cache.
student.save_pretrained(args.out)
tokenizer.save_pretrained(args.out)
reloaded = AutoModelForCausalLM.from_pretrained(args.out)  # `import linearize` registers the classes
settings = dict(max_new_tokens=24, do_sample=False)
with torch.no_grad():
    cached = reloaded.generate(**prompt, **settings)
    uncached = reloaded.generate(**prompt, **settings, use_cache=False)
print("cached generation equals uncached:", torch.equal(cached, uncached))
print(tokenizer.decode(cached[0], skip_special_tokens=True))
