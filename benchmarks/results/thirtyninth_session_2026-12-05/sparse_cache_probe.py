"""Probe (issue 16): would a small exact cache of the keys the linear state recalls worst give an all-converted
`hedgehog_swa` student retrieval beyond its window? Inference only, no training: a key leaving the window is kept
(scored by the window's softmax, sharing its normaliser) instead of folded into the linear state when its value is
among the N worst recalled so far; the one it evicts is folded then.

The recall error of key s, per kv head: || v_s - sum_{j<s} (fk_s . fk_j) v_j / sum_{j<s} (fk_s . fk_j) ||^2, against
every key that left before it (cached or folded: the decode step would read it as S + the cache's share). Computed
here in the quadratic form, every (query, key) weight at once, for one forward over prompt + answer; a trial hits when
every answer token is the model's argmax at its place (teacher forcing: the same as greedy decoding's first tokens).
With N = 0 the form is `hedgehog_swa` itself: the probe checks it against the model's own forward first.

    python sparse_cache_probe.py STUDENT_DIR --sizes 0,32,128 --lengths 2048 --trials 2
    python sparse_cache_probe.py STUDENT_DIR --sizes 128 --lengths 2048 --trials 1 --criterion random
    python sparse_cache_probe.py STUDENT_DIR --sizes 0,128 --lengths 2048 --ppl-text persuasion --ppl-windows 3
    python sparse_cache_probe.py STUDENT_DIR --device cuda --teacher /tmp/smollm2.gguf --sizes 0,128,512 --lengths 2048,4096,8192 --trials 3
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import time

import torch

from linearize import LinearizedForCausalLM, load_teacher
from linearize.evaluate.longcontext import make_probe
from linearize.hf.attention import apply_rotary, repeat_heads
from linearize.hf.mixer_hedgehog import HedgehogSWAMixer
from linearize.textdata import read_text_source

SIZE = {"n": 0, "criterion": "error", "layers": None, "block": 0}
ORIGINAL_MIX = HedgehogSWAMixer.mix


def memberships(err: torch.Tensor, window: int, size: int) -> torch.Tensor:
    """(Hkv, T, T) bool: key s is in the cache of kv head h at query t, the greedy keep-the-N-worst policy."""
    hkv, length = err.shape
    held = torch.zeros(hkv, length, length, dtype=torch.bool)
    if size == 0:
        return held.to(err.device)
    for h in range(hkv):
        heap, enter = [], {}
        errors = err[h].tolist()
        for s in range(0, length - window):
            t = s + window  # the query at which key s leaves the window
            if len(heap) < size:
                heapq.heappush(heap, (errors[s], s))
                enter[s] = t
            elif errors[s] > heap[0][0]:
                _, out = heapq.heapreplace(heap, (errors[s], s))
                held[h, enter.pop(out) : t, out] = True
                enter[s] = t
        for s, t in enter.items():
            held[h, t:, s] = True
    return held.to(err.device)


def decided_at(length: int, window: int, block: int) -> torch.Tensor:
    """(T,) the query at which each key leaves the softmax: one token policy, key s at s + window; with `block`, a
    block's keys together, when its last one leaves the window (until then the block stays in the softmax)."""
    s = torch.arange(length)
    return s + window if block == 0 else (s // block + 1) * block - 1 + window


def block_memberships(err: torch.Tensor, decided: torch.Tensor, size: int) -> torch.Tensor:
    """(Hkv, T, T) bool as `memberships`, with keys decided a block at a time: at each decision the cache becomes the
    N largest errors among itself and the block."""
    hkv, length = err.shape
    held = torch.zeros(hkv, length, length, dtype=torch.bool)
    times = sorted({int(t) for t in decided if t < length})
    blocks = {t: [int(s) for s in torch.nonzero(decided == t).flatten()] for t in times}
    for h in range(hkv):
        errors = err[h].tolist()
        cache: dict[int, int] = {}  # key -> the query from which it is held
        for t in times:
            pool = sorted(list(cache) + blocks[t], key=lambda s: -errors[s])[:size]
            for s in list(cache):
                if s not in pool:
                    held[h, cache.pop(s) : t, s] = True
            for s in pool:
                cache.setdefault(s, t)
        for s, t in cache.items():
            held[h, t:, s] = True
    return held.to(err.device)


def reference_mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state):
    if state is not None or q.shape[2] == 1 or padding_mask is not None:
        return ORIGINAL_MIX(self, hidden_states, q, k, v, position_embeddings, padding_mask, state)
    raw_q, raw_k = q, k
    q, k = apply_rotary(q, k, position_embeddings)
    fq, fk = (self.feature_q(q), self.feature_k(k)) if self.options.linear_rope else (self.feature_q(raw_q), self.feature_k(raw_k))
    groups, window, length = self.spec.groups, self.window, q.shape[2]
    q, k, v, fq, fk = (x[0].float() for x in (q, k, v, fq, fk))  # batch 1
    share = torch.sigmoid(self.window_logit.float())[:, None, None]
    t = torch.arange(length, device=q.device)
    in_window = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    left = t[None, :] <= t[:, None] - window
    # Recall errors against every earlier key (per kv head).
    gram = (fk @ fk.mT) * (t[None, :] < t[:, None])
    pred = (gram @ v) / gram.sum(-1, keepdim=True).clamp_min(1e-30)
    err = ((v - pred) ** 2).sum(-1)
    err[:, 0] = float("inf")
    if SIZE["criterion"] == "relative":  # the error as a share of the value's own size
        err = err / (v**2).sum(-1).clamp_min(1e-30)
    if SIZE["criterion"] == "random":  # the control: N keys kept at random, by the same greedy policy
        err = torch.rand(err.shape, generator=torch.Generator().manual_seed(length)).to(err.device)
    size = SIZE["n"] if SIZE["layers"] is None or self.layer_idx in SIZE["layers"] else 0
    if SIZE["block"]:
        decided = decided_at(length, window, SIZE["block"]).to(q.device)
        in_window = (t[None, :] <= t[:, None]) & (t[:, None] < decided[None, :])
        left = t[:, None] >= decided[None, :]
        held = block_memberships(err.cpu(), decided.cpu(), size).to(q.device)
    else:
        held = memberships(err, window, size)
    held = repeat_heads(held[None], groups)[0]
    soft = in_window[None] | held
    folded = left[None] & ~held
    scores = (q @ repeat_heads(k[None], groups)[0].mT) * self.spec.scaling
    scores = scores.masked_fill(~soft, float("-inf"))
    a = torch.exp(scores - scores.amax(-1, keepdim=True)) * share
    lin = (fq @ repeat_heads(fk[None], groups)[0].mT) * folded * (1 - share)
    w = a + lin
    out = (w @ repeat_heads(v[None], groups)[0]) / w.sum(-1, keepdim=True)
    return out[None].to(hidden_states.dtype)


@torch.no_grad()
def score(model, ids: list[int], answer_ids: list[int]) -> tuple[int, float, list[int]]:
    x = torch.tensor([ids + answer_ids], device=model.device)
    logits = model(x, use_cache=False).logits[0, len(ids) - 1 : -1]
    right = logits.argmax(-1).cpu() == torch.tensor(answer_ids)
    return int(bool(right.all())), float(right.float().mean()), right.int().tolist()


@torch.no_grad()
def late_nll(model, ids: list[int]) -> float:
    """Mean negative log-likelihood of the second half of a window's tokens (where context beyond the window counts)."""
    x = torch.tensor([ids], device=model.device)
    logits = model(x, use_cache=False).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
    return float(nll[len(ids) // 2 - 1 :].mean())


def perplexities(teacher, student, tokenizer, args) -> None:
    """Perplexity of the second half of --ppl-windows windows of --lengths[0] tokens of --ppl-text, each size beside the
    teacher."""
    length = int(args.lengths.split(",")[0])
    ids = tokenizer(read_text_source(args.ppl_text)[20000:], add_special_tokens=False)["input_ids"]
    windows = [ids[i * length : (i + 1) * length] for i in range(args.ppl_windows)]
    teacher_nll = sum(late_nll(teacher, w) for w in windows) / len(windows)
    print(f"teacher: perplexity {torch.tensor(teacher_nll).exp():.3f} over the second halves of {len(windows)} windows of {length}", flush=True)
    for size in map(int, args.sizes.split(",")):
        SIZE["n"] = size
        nll = sum(late_nll(student, w) for w in windows) / len(windows)
        print(f"cache_{size}: perplexity {torch.tensor(nll).exp():.3f}, {torch.tensor(nll - teacher_nll).exp():.4f}x the teacher's", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("student")
    parser.add_argument("--sizes", default="0,32,128")
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--ppl-text", default=None, help="a packaged text or a file: perplexity instead of passkeys")
    parser.add_argument("--ppl-windows", type=int, default=3)
    parser.add_argument("--layers", default=None, help="comma-separated layers that keep keys (default: all)")
    parser.add_argument("--block", type=int, default=0, help="decide which keys to keep a block of this many at a time "
                        "(0: each key as it leaves the window); a block stays in the softmax until its last key leaves")
    parser.add_argument("--device", default="cpu", help="e.g. cuda: the quadratic form at 8K holds a few 2.4 GB tensors")
    parser.add_argument("--teacher", default="smollm2-135m", help="the teacher: id, folder or .gguf")
    parser.add_argument("--criterion", default="error", choices=("error", "relative", "random"), help="which keys the cache keeps")
    args = parser.parse_args()
    torch.manual_seed(0)
    SIZE["criterion"] = args.criterion
    SIZE["block"] = args.block
    SIZE["layers"] = None if args.layers is None else {int(i) for i in args.layers.split(",")}
    teacher, tokenizer = load_teacher(args.teacher)
    teacher.to(args.device).eval()
    student = LinearizedForCausalLM.from_pretrained(args.student).to(args.device).eval()
    HedgehogSWAMixer.mix = reference_mix
    # The reference form at N = 0 against the model's own forward.
    check = torch.randint(0, 49152, (1, 700), generator=torch.Generator().manual_seed(1)).to(args.device)
    with torch.no_grad():
        mine = student(check, use_cache=False).logits
        HedgehogSWAMixer.mix = ORIGINAL_MIX
        theirs = student(check, use_cache=False).logits
        HedgehogSWAMixer.mix = reference_mix
    print(f"reference at N = 0 against the model's forward: max |logit difference| {float((mine - theirs).abs().max()):.2e}", flush=True)
    if args.ppl_text:
        perplexities(teacher, student, tokenizer, args)
        return
    rows = []
    rng = random.Random(0)
    probes = [make_probe(tokenizer, "passkey", n, float(d), rng) for n in map(int, args.lengths.split(","))
              for d in args.depths.split(",") for _ in range(args.trials)]
    for probe in probes:
        answer_ids = tokenizer(" " + probe.answer, add_special_tokens=False)["input_ids"]
        row = {"length": probe.requested, "depth": probe.depth, "answer": probe.answer}
        row["teacher"] = score(teacher, probe.prompt_ids, answer_ids)
        for size in map(int, args.sizes.split(",")):
            SIZE["n"] = size
            begin = time.time()
            row[f"cache_{size}"] = score(student, probe.prompt_ids, answer_ids)
        print(json.dumps(row), f"({time.time() - begin:.0f} s a forward)", flush=True)
        rows.append(row)
    for key in [k for k in rows[0] if k == "teacher" or k.startswith("cache_")]:
        for n in sorted({r["length"] for r in rows}):
            hits = [r[key][0] for r in rows if r["length"] == n]
            digits = [r[key][1] for r in rows if r["length"] == n]
            print(f"{key} at {n}: {sum(hits)}/{len(hits)} passkeys, {sum(digits) / len(digits):.2f} of answer tokens")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
