"""How much of hedgehog_swa's shared normaliser its softmax window holds, by position in the context.

For query t, the window's keys score exp(q.k * scaling - m_t) * share (the largest is `share`), and every older
key scores (fq_t . fk_s) * (1 - share); the output is the score-weighted mean of the values. The older keys'
total grows with t while the window's stays bounded, so the window's part of the normaliser shrinks as the
context grows. This measures that part on real text, per position range, averaged over heads and layers, for
saved students and untrained conversions of the teacher (LABEL=hedgehog_swa:window=N as in passkey_probe.py).

    python benchmarks/window_mass.py --students out/quickstart --variants "w64=hedgehog_swa:window=64" --length 2048
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.hf.attention import apply_rotary, repeat_heads
from linearize.hf.mixers import mixers_in
from linearize.textdata import read_text_source, token_windows
from passkey_probe import build, parse_variant  # benchmarks/, first on the path when run as a script


@torch.no_grad()
def window_part(model, ids: torch.LongTensor) -> torch.Tensor:
    """(layers, T): the window's part of the normaliser at each position, mean over heads and rows."""
    out = model(ids, output_hidden_states=True, use_cache=False)
    decoder = model.model.model  # the teacher's decoder inside LinearizedForCausalLM
    t = torch.arange(ids.shape[1])
    position_embeddings = decoder.rotary_emb(out.hidden_states[0], t[None].expand(ids.shape[0], -1))
    parts = []
    for mixer in sorted(mixers_in(model), key=lambda m: m.layer_idx):
        hidden = decoder.layers[mixer.layer_idx].input_layernorm(out.hidden_states[mixer.layer_idx])
        q, k, _ = mixer.spec.project(mixer.attn, hidden)
        q, k = apply_rotary(q, k, position_embeddings)
        fq, fk = mixer.feature_q(q).double(), repeat_heads(mixer.feature_k(k), mixer.spec.groups).double()
        k = repeat_heads(k, mixer.spec.groups)
        share = torch.sigmoid(mixer.window_logit.double())[:, None]
        inside = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - mixer.window)
        scores = (q.double() @ k.double().transpose(-1, -2) * mixer.spec.scaling).masked_fill(~inside, float("-inf"))
        window = torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1) * share
        # Query t's older keys are s <= t - window: their feature sum is the running sum of fk, shifted by the window.
        older = torch.nn.functional.pad(fk.cumsum(2), (0, 0, mixer.window, 0))[:, :, : ids.shape[1]]
        linear = (fq * older).sum(-1) * (1 - share)
        parts.append((window / (window + linear)).mean((0, 1)))
    return torch.stack(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--students", default="", help="saved hedgehog_swa models, comma-separated folders")
    parser.add_argument("--variants", default="w64=hedgehog_swa:window=64")
    parser.add_argument("--text", default="persuasion")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    teacher, tokenizer = linearize.load_teacher(args.teacher, dtype=torch.float32)
    ids = token_windows(tokenizer, read_text_source(args.text), args.length, max_tokens=args.rows * args.length)
    models = {folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval() for folder in args.students.split(",") if folder}
    for label, mixer, options, share, _ in (parse_variant(v) for v in args.variants.split(",") if v):
        models[label] = build(teacher, mixer, options, share)
    edges = [e for e in (64, 256, 512, 1024, 2048, 4096, 8192) if e < args.length] + [args.length]
    rows = []
    for label, model in models.items():
        part = window_part(model, ids).mean(0)
        ranges = {f"{a}-{b}": round(part[a:b].mean().item(), 4) for a, b in zip(edges[:-1], edges[1:])}
        rows.append({"model": label, "window_part_by_position": ranges})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"text": args.text, "length": args.length, "rows": args.rows, "models": rows}, indent=1))


if __name__ == "__main__":
    main()
