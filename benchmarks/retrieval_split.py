"""Where a retrieval miss happens: in choosing to answer, or in remembering the answer.

A retrieval probe (`linearize.evaluate.longcontext`) scores 1 when the first number a model generates greedily is
the hidden one. A miss can mean two things: the model never starts a number ("The pass key is" -> " the pass key.")
or it starts one and copies it wrong. This scores each probe of `--kind` three ways for the teacher and each
student, on the same prompts:

- greedy: the probe's own score (the model's own cache, as `linearize eval` asks);
- opening: the log-probability of the answer's first token after the prompt (for SmolLM2's tokenizer, the space
  before the digits: the choice to answer with a number);
- copied: with the answer's tokens fed in (teacher forcing), whether every token after the first is the model's most
  likely next token, and the log-probability of those tokens: the memory of the number itself.

`--restore-each` then scores the first student again with each converted layer alone computing softmax attention
from its own weights (`teacher_mode` for one mixer, as `keep_attention: auto`'s `restore` scorer does), teacher-forced
only: which converted layers the opening and the copy depend on.

`--restore 6,8` scores every student with those converted layers computing softmax attention throughout (a hybrid
that keeps them too, before any training for it).

`--window-only 6` scores every student with those converted layers' linear branch switched off (a window mixer's
share of the window set to 1, so the layer is its sliding-window softmax alone): whether what a layer gets wrong
beyond the training length comes from the keys that have left its window.

    python benchmarks/retrieval_split.py --students runs/hybrid_long --lengths 2048,4096 --trials 3 --out split.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean

import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.evaluate.longcontext import KINDS, answer, answer_of
from linearize.hf.mixers import mixers_in
from quality import DEPTHS, retrieval_probes  # benchmarks/, first on the path when run as a script


WINDOW_ONLY = 30.0  # a window mixer's share logit: sigmoid(30) leaves its linear branch a weight of 1e-13


def layer_set(parser: argparse.ArgumentParser, option: str, value: str) -> set[int]:
    """The layer indices of a comma-separated option, or a one-line error naming the form it takes."""
    if not all(i.strip().isdigit() for i in value.split(",") if i.strip()):
        parser.error(f"{option} takes layer indices separated by commas, e.g. 6,8; got {value!r}")
    return {int(i) for i in value.split(",") if i.strip()}


@torch.no_grad()
def split(model, tokenizer, probe, greedy: bool = True) -> dict:
    """The probe scored greedily (unless `greedy` is off), and its answer's opening and remainder under teacher forcing."""
    tokens = tokenizer(" " + probe.answer, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    ids = torch.tensor([probe.prompt_ids + tokens], device=device)
    logits = model(ids, use_cache=False, logits_to_keep=len(tokens) + 1).logits[0, :-1].float().log_softmax(-1)
    target = torch.tensor(tokens, device=device)
    logprobs = logits[torch.arange(len(tokens), device=device), target]
    return {
        "greedy": greedy and answer_of(answer(model, tokenizer, probe)) == probe.answer,
        "opening": logprobs[0].item(),
        "copied": bool((logits[1:].argmax(-1) == target[1:]).all()),
        "rest": logprobs[1:].sum().item(),
    }


def summary(rows: list[dict]) -> dict:
    return {
        "greedy": sum(r["greedy"] for r in rows),
        "copied": sum(r["copied"] for r in rows),
        "probes": len(rows),
        "opening_logprob": round(mean(r["opening"] for r in rows), 3),
        "rest_logprob": round(mean(r["rest"] for r in rows), 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--students", default="", help="saved students, comma-separated folders")
    parser.add_argument("--kind", default="passkey", choices=KINDS)
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--trials", type=int, default=3, help="prompts per length and depth (depths 0.1, 0.5, 0.9; 9: quality.py's 27)")
    parser.add_argument("--restore", default="", help="converted layers every student computes as softmax attention, e.g. 6,8")
    parser.add_argument("--window-only", default="", help="converted window layers whose linear branch every student switches off, e.g. 6")
    parser.add_argument("--restore-each", action="store_true", help="the first student again with each converted layer restored in turn")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folders = [f for f in args.students.split(",") if f]
    if args.restore_each and not folders:
        parser.error("--restore-each restores the layers of a student: pass one with --students")
    if missing := [f for f in folders if not (Path(f) / "config.json").is_file()]:
        parser.error(f"--students: no saved model in {', '.join(missing)}; pass folders that `linearize run` or `save_pretrained` wrote")
    restore, window_only = (layer_set(parser, name, value) for name, value in (("--restore", args.restore), ("--window-only", args.window_only)))

    teacher, tokenizer = linearize.load_teacher(args.teacher, dtype=torch.float32)
    models = {"teacher": teacher} | {f: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32) for f in folders}
    for folder in folders:
        mixers = {m.layer_idx: m for m in mixers_in(models[folder])}
        for option, layers in (("--restore", restore), ("--window-only", window_only)):
            if unknown := sorted(layers - set(mixers)):
                parser.error(f"{option}: {folder} converts no layer {unknown}; its converted layers are {sorted(mixers)}")
        for i in restore:
            mixers[i].teacher = True
        if lacking := sorted(i for i in window_only if not hasattr(mixers[i], "window_logit")):
            parser.error(f"--window-only: layers {lacking} of {folder} have no window and linear branch to split; pass layers of a window mixer such as hedgehog_swa")
        for i in window_only:
            mixers[i].window_logit.data.fill_(WINDOW_ONLY)
    rows = []

    def save() -> None:  # after every model, so that a run cut short keeps what it scored
        Path(args.out).write_text(json.dumps({"teacher": args.teacher, "trials": args.trials, "rows": rows}, indent=1))

    for length in [int(n) for n in args.lengths.split(",")]:
        probes = retrieval_probes(tokenizer, args.kind, length, args.trials)  # quality.py's, with as many trials
        for name, model in models.items():
            model.to(args.device).eval()
            started = time.time()
            scored = [split(model, tokenizer, p) | {"depth": p.depth} for p in probes]
            row = {"model": name, "kind": args.kind, "length": length, **summary(scored), "seconds": round(time.time() - started, 1)}
            if name != "teacher" and restore:
                row["restored"] = sorted(restore)
            if name != "teacher" and window_only:
                row["window_only"] = sorted(window_only)
            row["by_depth"] = {f"{d:g}": summary([s for s in scored if s["depth"] == d]) for d in DEPTHS}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "by_depth"}), flush=True)
            model.cpu()
            save()
        if args.restore_each:
            student = models[folders[0]].to(args.device)
            for mixer in mixers_in(student):
                if mixer.layer_idx in restore:
                    continue
                mixer.teacher = True
                scored = [split(student, tokenizer, p, greedy=False) for p in probes]
                mixer.teacher = False
                rows.append({"model": folders[0], "restored": sorted(restore | {mixer.layer_idx}), "kind": args.kind, "length": length, **summary(scored)})
                print(json.dumps(rows[-1]), flush=True)
            student.cpu()
            save()


if __name__ == "__main__":
    main()
