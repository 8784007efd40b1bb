"""Which layers each selection scorer keeps, on an untrained conversion of the real teacher.

Converts the teacher to `--mixer` (with `--options`) without training and runs `keep_attention: auto` selection
(`linearize.distillation.select_attention`) on the packaged Persuasion in windows of `--seq-len`, with the single-
layer KL, restore-one-layer KL and, with `--retrieval N`, the KL at the answers of N retrieval tasks. It prints
and writes every scorer's proposal and its measured KL on text and at the answers, and the per-layer figures. The
proposals then go to `passkey_probe.py` as `keep=` variants, to see which keeps retrieval:

    python benchmarks/selection_probe.py --seq-len 1024 --tokens 4096 --retrieval 6 --keep 8 --out selection.json
    python benchmarks/selection_probe.py --seq-len 512 --tokens 1024 --retrieval 3 --no-restore   # CPU, minutes
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import linearize
from linearize.config import SelectionConfig
from linearize.distillation import select_attention
from linearize.textdata import packaged_text, token_windows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--mixer", default="gated_deltanet")
    parser.add_argument("--options", default="window=64", help="the mixer's options, e.g. window=64")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens the text scores use")
    parser.add_argument("--retrieval", type=int, default=6, help="retrieval tasks the answer scores use (0: none)")
    parser.add_argument("--keep", type=int, default=8, help="layers kept as softmax attention")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--restore", action=argparse.BooleanOptionalAction, default=True, help="the restore-one-layer KL "
                        "scorer on text too (one forward pass per layer)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    options = {k: int(v) if v.isdigit() else v for k, v in (o.split("=", 1) for o in args.options.split(",") if o)}
    teacher, tokenizer = linearize.load_teacher(args.teacher, dtype=torch.float32)
    model = linearize.convert(teacher, args.mixer, **options).eval()
    windows = token_windows(tokenizer, packaged_text("persuasion"), args.seq_len, max_tokens=args.tokens)
    config = SelectionConfig(kl=True, restore=args.restore, seq_len=args.seq_len, batch_size=args.batch_size, retrieval=args.retrieval)
    started = time.time()
    selection = select_attention(model, windows, args.keep, config, tokenizer=tokenizer)
    selection["seconds"] = time.time() - started
    for method, candidate in selection["candidates"].items():
        print(f"{method}: layers {candidate['kept_attention']}, KL on text {candidate['kl']:.4f}"
              + (f", at the answers {candidate['answer_kl']:.4f}" if "answer_kl" in candidate else ""), flush=True)
    print(f"chosen: {selection['method']} {selection['kept_attention']} in {selection['seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), **selection}, f, indent=1)


if __name__ == "__main__":
    main()
