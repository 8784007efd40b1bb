"""Plain `generate()` of a teacher, its linearize student and the student exported to qwen3_5, side by side.

Random weights at a given shape (default SmolLM2-135M's: 30 layers, 576 wide, 9 query / 3 KV heads of 64): the
student is every layer `qwen3_5_gdn` but every fourth `qwen3_5_attention` (hybrid_qwen3_5's layout), the native
model is `linearize.export.build_native` of it. Per model and context: prefill tokens/s, batch-1 greedy decode
tokens/s through `model.generate()` and the peak memory, each a JSON line on stdout and in --out as it is measured
(a run cut short keeps what it measured).

    python benchmarks/serving_speed.py --device cuda --dtype bfloat16 --lengths 2048,16384 --out serving.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import linearize
from linearize.export import build_native

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=32768, rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, max_position_embeddings=4096),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model, context: int, new_tokens: int, device) -> dict:
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    # Warm-up first: kernels compile (Triton, fla) on their first call at each shape, which no timing may include.
    model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False)
    sync(device)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    # generate() prefills again: the decode rate is what the steps after it took.
    return {"context": context, "prefill_tokens_per_s": context / prefill, "decode_tokens_per_s": new_tokens / max(total - prefill, 1e-9),
            "generate_seconds": total, "peak_bytes": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="2048,16384")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SHAPES[args.shape])).to(dtype).eval()
    student = linearize.convert(teacher, "qwen3_5_gdn", keep_attention="every:4", keep_as="qwen3_5_attention").to(device)
    native = build_native(student).to(device)
    models = {"student": student, "native_qwen3_5": native}
    out = open(args.out, "a") if args.out else None
    for context in (int(n) for n in args.lengths.split(",")):
        rows = {}
        for name, model in models.items():
            rows[name] = measure(model, context, args.new_tokens, device)
        with linearize.teacher_mode(student):  # the teacher: the student's own weights with softmax everywhere
            rows["teacher"] = measure(student, context, args.new_tokens, device)
        for name, row in rows.items():
            line = json.dumps({"model": name, "shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "dtype": args.dtype, **row})
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()


if __name__ == "__main__":
    main()
