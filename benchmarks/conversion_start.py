"""Where a conversion starts before any training: every layer's error against the teacher, and the perplexity.

Converts the real teacher with every layer of one mixer (no training) and measures, beside the teacher, the
perplexity of the first `--tokens` tokens of Persuasion in 512-token windows and each layer's attention-transfer
error normalised by the teacher's output there (`layer_errors`, on the first 4 windows; 1.0 is what a zero
output scores). Variants are LABEL=MIXER[:key=value...][:share=X] as in passkey_probe.py; `share` sets the
learned window share (sigmoid of `window_logit`) of every layer, 0.5 at conversion.

    python benchmarks/conversion_start.py --out results/conversion_start.json
    python benchmarks/conversion_start.py --variants "gdn_w64=gated_deltanet:window=64,gdn_w64_share0.75=gated_deltanet:window=64:share=0.75"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import linearize
from linearize.distillation.stages.attention_transfer import layer_errors
from linearize.evaluate.perplexity import perplexity
from linearize.textdata import read_text_source, token_windows
from passkey_probe import build, parse_variant  # benchmarks/, first on the path when run as a script

DEFAULT_VARIANTS = ",".join(
    f"{short}{label}={mixer}{options}"
    for mixer, short in (("gated_deltanet", "gdn"), ("mamba2", "mamba2"))
    for label, options in (("", ""), ("_w64", ":window=64"), ("_w64_share0.75", ":window=64:share=0.75"), ("_w64_share0.9", ":window=64:share=0.9"))
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--text", default="persuasion", help="a packaged text or a .txt file")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    teacher, tokenizer = linearize.load_teacher(args.teacher, dtype=torch.float32)
    windows = token_windows(tokenizer, read_text_source(args.text), 512, max_tokens=args.tokens)
    rows = [{"variant": "teacher", "perplexity": perplexity(teacher, windows, batch_size=4)}]
    print(json.dumps(rows[-1]), flush=True)
    for label, mixer, options, share, _ in (parse_variant(v) for v in args.variants.split(",") if v):
        started = time.time()
        model = build(teacher, mixer, options, share)
        errors = layer_errors(model, windows[:4], batch_size=2)
        normalized = [errors[i]["normalized"] for i in sorted(errors)]
        rows.append({"variant": label, "perplexity": perplexity(model, windows, batch_size=4),
                     "mean_normalized_error": sum(normalized) / len(normalized),
                     "normalized_error_by_layer": [round(e, 4) for e in normalized], "seconds": round(time.time() - started, 1)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "normalized_error_by_layer"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"teacher": args.teacher, "text": args.text, "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
