"""Which keys a `lolcats_keep` student keeps when a multi-key needle prompt ends: for each RULER-style multi-key
prompt (the eval's, seed 0, depths 0.1 / 0.5 / 0.9, TRIALS each), the student served with KEEP kept keys prefills it
once; each converted layer's kept keys are matched to their positions (by their values, which the state keeps as the
layer computed them), and the asked needle's line (its place name and its five digits) and the distractors' lines are
counted among them, per layer and kv head. Then whether the student answers (greedy, as the eval asks). Float32, CPU:

    STUDENT=/tmp/kb/student python kept_needles.py LENGTH KEEP [TRIALS]
"""
import json
import os
import random
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.evaluate.longcontext import answer, answer_of, make_probe
from linearize.hf.cache import returned_cache
from linearize.hf.mixer_hedgehog import HedgehogSWAMixer

STUDENT = os.environ.get("STUDENT", "/tmp/kb/student")
torch.set_num_threads(2)
length, keep = int(sys.argv[1]), int(sys.argv[2])
trials = int(sys.argv[3]) if len(sys.argv) > 3 else 3
tok = AutoTokenizer.from_pretrained(STUDENT)
rng = random.Random(0)
probes = [make_probe(tok, "multikey", length, d, rng) for d in (0.1, 0.5, 0.9) for _ in range(9)]
probes = [p for i, p in enumerate(probes) if i % 9 < trials]
student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
linearize.set_options(student, keep=keep)
values = {}
original = HedgehogSWAMixer.mix_kept


def recording(self, q, k, v, position_embeddings, padding_mask, state):
    if q.shape[2] > 1:
        values[self.layer_idx] = v.detach()
    return original(self, q, k, v, position_embeddings, padding_mask, state)


HedgehogSWAMixer.mix_kept = recording
digit_ids = {str(d): tok(str(d), add_special_tokens=False)["input_ids"] for d in range(10)}


def lines(ids: list[int], probe) -> list[tuple[int, int, bool]]:
    """(start, end, asked) of every needle line: from 'The special magic number' to its number's last digit."""
    text_ids = ids
    head = tok(" The special magic number for", add_special_tokens=False)["input_ids"][1:]
    found = []
    for start in range(len(text_ids) - len(head)):
        if text_ids[start : start + len(head)] == head:
            end = start + len(head)
            while end < len(text_ids) and not tok.decode(text_ids[end : end + 1]).strip().isdigit():
                end += 1
            number = ""
            while end < len(text_ids) and tok.decode(text_ids[end : end + 1]).strip().isdigit():
                number += tok.decode(text_ids[end : end + 1]).strip()
                end += 1
            if number:
                found.append((start, end, number == probe.answer))
    return found


rows = []
for probe in probes:
    values.clear()
    ids = torch.tensor([probe.prompt_ids])
    with torch.no_grad():
        cache = returned_cache(student(ids, use_cache=True, logits_to_keep=1))
    spans = lines(probe.prompt_ids, probe)
    asked = [s for s in spans if s[2]]
    per_layer = {}
    for layer_idx, v in sorted(values.items()):
        state = cache.layers[layer_idx].tensors
        kept_v, real = state["v"][0, :, :keep], state["err"][0] > float("-inf")  # (Hkv, N, D), (Hkv, N)
        heads = []
        for head in range(kept_v.shape[0]):
            rows_v = kept_v[head][real[head]]
            distance = torch.cdist(rows_v, v[0, head])  # (kept, T)
            positions = set(distance.argmin(-1).tolist())
            asked_kept = sum(1 for s, e, a in spans if a for p in range(s, e) if p in positions)
            others_kept = sum(1 for s, e, a in spans if not a for p in range(s, e) if p in positions)
            heads.append((asked_kept, others_kept))
        per_layer[layer_idx] = heads
    said = answer(student, tok, probe)
    row = {
        "length": probe.length, "depth": probe.depth, "keep": keep, "hit": answer_of(said) == probe.answer,
        "asked_line_tokens": sum(e - s for s, e, _ in asked), "other_line_tokens": sum(e - s for s, e, a in spans if not a),
        "lines": len(spans), "kept_asked_by_layer": {i: [h[0] for h in heads] for i, heads in per_layer.items()},
        "kept_others_by_layer": {i: [h[1] for h in heads] for i, heads in per_layer.items()},
    }
    total_asked = sum(sum(h) for h in row["kept_asked_by_layer"].values())
    total_others = sum(sum(h) for h in row["kept_others_by_layer"].values())
    print(json.dumps({k: row[k] for k in ("length", "depth", "keep", "hit", "asked_line_tokens", "other_line_tokens", "lines")}
                     | {"kept_asked_total": total_asked, "kept_others_total": total_others,
                        "heads": sum(len(h) for h in per_layer.values())}), flush=True)
    rows.append(row)
json.dump(rows, open(f"kept_needles_{length}_{keep}.json", "w"))
