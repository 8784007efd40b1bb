"""The host's share of a compiled decode step: the guards Dynamo evaluates before every step of a static-cache
`generate()`, and the time per generated token of a model so narrow that the host's work is most of it, for the
teacher and its converted students side by side, on the CPU (transformers compiles there when told to).

On an H100 a batch-1 student's compiled step spent about 565 us of host time in Dynamo's cache lookup against its
teacher's 196 (BENCHMARKS.md, forty-fifth session): the guards scale with what the traced forward reads (each state
tensor, each parameter, each Python attribute it branches on), not with the model's width, so a random model of the
same depth and head layout and a tiny width counts the same guards on any machine. Each row is a JSON line:

    python benchmarks/step_guards.py --mixers hedgehog_swa:window=8,gated_deltanet:window=8 --out guards.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig

import linearize
from linearize.cli import parse_options

GUARD_LOGGER = "torch._dynamo.guards"  # where torch._logging's artifact "guards" logs the guard tree of each compiled frame


class _Guards(logging.Handler):
    """Counts the guards (`+- NAME:` lines of the guard tree, the managers left out) of the frames compiled while attached."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += sum(1 for line in record.getMessage().splitlines() if "+- " in line and "GuardManager" not in line)


def model_for(entry: str, layers: int):
    """The tiny-width teacher ("teacher") or its student MIXER[:key=value...]: SmolLM2's depth and heads (9 query, 3 kv)."""
    config = AutoConfig.for_model(
        "llama", hidden_size=36, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=64, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if entry == "teacher":
        return model
    name, *options = entry.split(":")
    return linearize.convert(model, name, **parse_options(options)).eval()


def measure(entry: str, layers: int, new_tokens: int, repeats: int) -> dict:
    """Guards of the compiled decode step (traced once for every step) and the median time per generated token."""
    model = model_for(entry, layers)
    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles on CUDA only, unless told so
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    settings = dict(input_ids=ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                    cache_implementation="static", compile_config=config)
    torch._dynamo.reset()
    counter = _Guards()
    logger = logging.getLogger(GUARD_LOGGER)
    torch._logging.set_logs(guards=True)
    logger.addHandler(counter)
    try:
        with torch.no_grad():
            model.generate(**settings)
    finally:
        logger.removeHandler(counter)
        torch._logging.set_logs()
    per_token = []
    with torch.no_grad():
        model.generate(**settings)
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**settings)
            per_token.append((time.perf_counter() - start) / new_tokens)
    return {"model": entry, "layers": layers, "guards": counter.count, "us_per_token_median": 1e6 * statistics.median(per_token),
            "us_per_token": sorted(round(1e6 * t) for t in per_token), "new_tokens": new_tokens, "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default="hedgehog_swa:window=8", help="students, MIXER or MIXER:key=value:..., comma-separated")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for entry in ["teacher", *args.mixers.split(",")]:
        line = json.dumps(measure(entry, args.layers, args.new_tokens, args.repeats))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
