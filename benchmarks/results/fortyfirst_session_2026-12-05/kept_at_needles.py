"""Which needles of RULER's multi-key prompts a kept-key student holds exact when it answers: after the prompt's
prefill, each layer's kept keys and window matched to their positions, counted per needle (the asked one and the
three distractors), per kv head: its five digit tokens, and after the slash the six tokens before them (the place's name
and " is:"), which the question's name must find. CPU."""
import random, re, sys
import torch
import linearize
from transformers import AutoModelForCausalLM, AutoTokenizer
from linearize.evaluate.longcontext import make_probe, answer
from linearize.hf import mixer_hedgehog

folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
captured = []
original = mixer_hedgehog.kept_window_linear

def capture(q, k, v, fq, fk, **kwargs):
    out, state = original(q, k, v, fq, fk, **kwargs)
    captured.append((k, state))
    return out, state

mixer_hedgehog.kept_window_linear = capture
rng = random.Random(0)
for depth in (0.1, 0.5, 0.9):
    probe = make_probe(tokenizer, "multikey", 2048, depth, rng)
    pieces = [tokenizer.decode([t]) for t in probe.prompt_ids]
    text_at = []  # (start token, number) of every 5-digit run
    run = []
    for i, p in enumerate(pieces + [" "]):
        if p.strip().isdigit() and len(p.strip()) == 1 and p == p.strip():
            run.append(i)
        else:
            if len(run) == 5:
                text_at.append((run, "".join(pieces[j] for j in run)))
            run = []
    captured.clear()
    with torch.no_grad():
        said = answer(model, tokenizer, probe)
    k0, state0 = captured[0]
    length = k0.shape[2]
    keep = 128
    print(f"depth {depth}: answer {probe.answer}, said {said!r}; needles:", [(n, r[0]) for r, n in text_at])
    for layer, (k, state) in enumerate(captured[: model.config.text_config.num_hidden_layers]):
        rows = state["k"][0]  # (Hkv, rows, D)
        held = []
        for j in range(rows.shape[0]):
            kept = rows[j, :keep][state["err"][0, j] > float("-inf")]
            match = (kept[:, None, :] == k[0, j][None, :, :]).all(-1)  # (kept, T)
            positions = set(match.nonzero()[:, 1].tolist())
            held.append(positions)
        cells = []
        for r, number in text_at:
            mark = "A" if number == probe.answer else "d"
            # the needle's five digits, then the six tokens before them (its place's name and " is:")
            named = range(r[0] - 6, r[0])
            cells.append(mark + "".join(str(sum(p in h for p in r)) for h in held) + "/" + "".join(str(sum(p in h for p in named)) for h in held))
        if layer % 3 == 0:
            print(f"  layer {layer:2d}: " + "  ".join(cells))
