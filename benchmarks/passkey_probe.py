"""What breaks passkey retrieval in a converted model: the teacher and untrained conversions side by side.

Every distilled recipe so far scores 0 on passkey retrieval, even at 512 tokens where the passkey lies inside
the softmax window. This converts the real teacher without training and asks each variant the same passkey
probes (`linearize.evaluate.longcontext`), so the mixer's structure is measured apart from distillation.
A variant is LABEL=MIXER[:key=value...]; `share=X` sets hedgehog_swa's window share (the sigmoid of its
per-head `window_logit`, 0.5 at conversion) to X in every layer.

    python benchmarks/passkey_probe.py --lengths 512,2048 --out runs/passkey_probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time

import torch

import linearize
from linearize.evaluate.longcontext import answer, answer_of, make_probe

DEFAULT_VARIANTS = (
    "swa256=swa:window=256,"
    "hedgehog_swa256=hedgehog_swa:window=256,"
    "hedgehog_swa256_share0.88=hedgehog_swa:window=256:share=0.88,"
    "hedgehog_swa256_share0.99=hedgehog_swa:window=256:share=0.99,"
    "hedgehog_swa512=hedgehog_swa:window=512"
)


def parse_variant(text: str) -> tuple[str, str, dict, float | None]:
    """LABEL=MIXER[:key=value...] -> (label, mixer, options, window share or None)."""
    label, _, spec = text.partition("=")
    mixer, *pairs = spec.split(":")
    options, share = {}, None
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "share":
            share = float(value)
        else:
            options[key] = int(value)
    return label, mixer, options, share


def build(teacher, mixer: str, options: dict, share: float | None):
    model = linearize.convert(copy.deepcopy(teacher), mixer, **options)
    if share is not None:
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "window_logit"):
                    module.window_logit.fill_(math.log(share / (1.0 - share)))
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--depths", default="0.5,0.9")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    teacher, tokenizer = linearize.load_teacher(args.teacher, dtype=torch.float32)
    variants = [("teacher", None, {}, None)] + [parse_variant(v) for v in args.variants.split(",")]
    rows = []
    for length in [int(n) for n in args.lengths.split(",")]:
        rng = random.Random(0)
        probes = [make_probe(tokenizer, "passkey", length, float(d), rng) for d in args.depths.split(",") for _ in range(args.trials)]
        for label, mixer, options, share in variants:
            model = teacher if mixer is None else build(teacher, mixer, options, share)
            started = time.time()
            correct = [answer_of(answer(model, tokenizer, p)) == p.answer for p in probes]
            rows.append({"variant": label, "length": length, "correct": sum(correct), "probes": len(probes),
                         "by_depth": {d: sum(c for c, p in zip(correct, probes) if f"{p.depth:g}" == d) for d in args.depths.split(",")},
                         "seconds": round(time.time() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"teacher": args.teacher, "depths": args.depths, "trials": args.trials, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
