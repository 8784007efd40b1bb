"""What breaks passkey retrieval in a converted model: the teacher and untrained conversions side by side.

Every distilled recipe so far scores 0 on passkey retrieval, even at 512 tokens where the passkey lies inside
the softmax window. This converts the real teacher without training and asks each variant the same passkey
probes (`linearize.evaluate.longcontext`), so the mixer's structure is measured apart from distillation.
A variant is LABEL=MIXER[:key=value...]; `share=X` sets hedgehog_swa's window share (the sigmoid of its
per-head `window_logit`, 0.5 at conversion) to X in every layer; `keep=3/4/7` keeps softmax attention in those
layers (a hybrid's layout, with the converted layers' mixer standing in); `sink=N` (for `swa`) also lets every query see
the first N keys, through a dense reference of the window attention and uncached greedy decoding (an
experiment: the mixer has no such option; slow, O(T^2) per token).

    python benchmarks/passkey_probe.py --lengths 512,2048 --out runs/passkey_probe.json
    python benchmarks/passkey_probe.py --lengths 2048 --variants "swa256=swa:window=256:sink=0,swa256_sink4=swa:window=256:sink=4"

`--students DIR,...` probes saved (distilled) models as well, and reports their learned window shares:

    linearize distill quickstart convert.options.window=256 --out runs/qs256
    python benchmarks/passkey_probe.py --lengths 512 --variants "" --students runs/qs256
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from contextlib import contextmanager, nullcontext

import torch
from transformers import AutoModelForCausalLM

import linearize
import linearize.hf.windows as windows
from linearize.evaluate.longcontext import ANSWER_TOKENS, answer, answer_of, make_probe

DEFAULT_VARIANTS = (
    "swa256=swa:window=256,"
    "hedgehog_swa256=hedgehog_swa:window=256,"
    "hedgehog_swa256_share0.88=hedgehog_swa:window=256:share=0.88,"
    "hedgehog_swa256_share0.99=hedgehog_swa:window=256:share=0.99,"
    "hedgehog_swa512=hedgehog_swa:window=512"
)


def parse_variant(text: str) -> tuple[str, str, dict, float | None, int | None]:
    """LABEL=MIXER[:key=value...] -> (label, mixer, options, window share or None, sink tokens or None); a kept-layer
    list keep=3/4/7 goes into the options as keep_attention."""
    label, _, spec = text.partition("=")
    mixer, *pairs = spec.split(":")
    options, share, sink = {}, None, None
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "share":
            share = float(value)
        elif key == "sink":
            sink = int(value)
        elif key == "keep":
            options["keep_attention"] = [int(i) for i in value.split("/")]
        else:
            options[key] = value  # the mixer reads it as its option's type (true/false, numbers)
    return label, mixer, options, share, sink


@contextmanager
def sink_tokens(count: int):
    """`swa` layers attend to the first `count` keys as well as their window (dense, uncached forms only)."""

    def dense(q, k, v, *, window, scaling, softcap=None, key_mask=None, band=None):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
        scores = torch.einsum("bhtd,bhsd->bhts", q.float(), k) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        total, length = k.shape[2], q.shape[2]
        query = torch.arange(total - length, total)[:, None]
        key = torch.arange(total)[None, :]
        allowed = (query >= key) & ((query - key < window) | (key < count))
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :].bool()
        return (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v).to(v.dtype)

    original = windows.window_attention
    windows.window_attention = dense
    try:
        yield
    finally:
        windows.window_attention = original


@torch.no_grad()
def answer_uncached(model, tokenizer, probe) -> str:
    """Greedy continuation with a full forward pass per token (no cache), as `answer` decodes with one."""
    ids = torch.tensor([probe.prompt_ids])
    for _ in range(ANSWER_TOKENS):
        token = model(ids, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, token), dim=1)
    return tokenizer.decode(ids[0, len(probe.prompt_ids) :], skip_special_tokens=True)


def window_shares(model) -> list[float]:
    """Each hedgehog_swa layer's mean window share (the sigmoid of its per-head `window_logit`)."""
    return [round(torch.sigmoid(m.window_logit.float()).mean().item(), 3) for m in model.modules() if hasattr(m, "window_logit")]


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
    parser.add_argument("--students", default="", help="saved models to probe as well, comma-separated folders")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    teacher, tokenizer = linearize.load_teacher(args.teacher, dtype=torch.float32)
    variants = [("teacher", None, {}, None, None)] + [parse_variant(v) for v in args.variants.split(",") if v]
    students = {folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval() for folder in args.students.split(",") if folder}
    variants += [(folder, folder, {}, None, None) for folder in students]
    rows = []
    for length in [int(n) for n in args.lengths.split(",")]:
        rng = random.Random(0)
        probes = [make_probe(tokenizer, "passkey", length, float(d), rng) for d in args.depths.split(",") for _ in range(args.trials)]
        for label, mixer, options, share, sink in variants:
            if mixer is None:
                model = teacher
            else:
                model = students[mixer] if mixer in students else build(teacher, mixer, options, share)
            started = time.time()
            with nullcontext() if sink is None else sink_tokens(sink):
                decode = answer if sink is None else answer_uncached
                correct = [answer_of(decode(model, tokenizer, p)) == p.answer for p in probes]
            rows.append({"variant": label, "length": length, "correct": sum(correct), "probes": len(probes),
                         "by_depth": {d: sum(c for c, p in zip(correct, probes) if f"{p.depth:g}" == d) for d in args.depths.split(",")},
                         "window_shares": window_shares(model), "seconds": round(time.time() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"teacher": args.teacher, "depths": args.depths, "trials": args.trials, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
