"""Which layers of the teacher retrieve: each layer's strongest retrieval head, as `convert.selection.heads` scores it.

A retrieval head, where an answer is due, attends to the place in the context that states the answer (its needle).
This scores every head of the teacher on the selection's retrieval tasks (passkey, needle and multi-key needle of the
training pool, filled with held-out text) and ranks the layers by their strongest head, in two ways:
- `all`: averaged over every position that predicts an answer token (what `convert.selection.heads` uses);
- `first`: only the position that predicts the answer's first token, where the model decides to start a number,
  and per kind of task.

    python benchmarks/retrieval_heads.py --text corpus/heldout/persuasion.txt --tasks 12 --seq-len 2048 --keep 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import linearize
from linearize import load_teacher
from linearize.distillation.selection import SELECTION_KINDS, retrieval_heads, retrieval_windows


def ranked(heads: dict[int, list[float]], keep: int) -> dict:
    """The layers by their strongest head, best first, with that head and its score; and the `keep` best, sorted."""
    order = sorted(heads, key=lambda layer: max(heads[layer]), reverse=True)
    rows = [{"layer": layer, "head": max(range(len(heads[layer])), key=heads[layer].__getitem__), "score": max(heads[layer])} for layer in order]
    return {"kept": sorted(order[:keep]), "layers": rows}


def rankings(model, tasks: torch.Tensor, answers: torch.Tensor, keep: int) -> dict:
    """`ranked` over every answer position of all `tasks` ("all"), and over each answer's first position only, per
    kind of task ("first_passkey", ...; the tasks are the kinds in turn, as `retrieval_windows` makes them)."""
    first = torch.zeros_like(answers)
    first[torch.arange(len(answers)), answers.int().argmax(-1)] = True
    results = {"all": ranked(retrieval_heads(model, tasks, answers), keep)}
    for kind in SELECTION_KINDS:
        rows = [i for i in range(len(tasks)) if SELECTION_KINDS[i % len(SELECTION_KINDS)] == kind]
        if rows:
            results[f"first_{kind}"] = ranked(retrieval_heads(model, tasks[rows], first[rows]), keep)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--text", required=True, help="a plain-text file the tasks are filled from")
    parser.add_argument("--tasks", type=int, default=12, help="retrieval tasks (the three kinds in turn)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--keep", type=int, default=8, help="layers a selection keeps")
    parser.add_argument("--out", default="retrieval_heads.json")
    args = parser.parse_args()
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32)
    ids = tokenizer(Path(args.text).read_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < args.tasks * args.seq_len:
        raise SystemExit(f"--text holds {len(ids):,} tokens, fewer than --tasks x --seq-len; give a longer text or fewer tasks")
    filler = torch.tensor(ids[: args.tasks * args.seq_len]).view(args.tasks, args.seq_len)
    model = linearize.convert(teacher, "gated_deltanet")  # only its teacher_mode runs: the mixer does not matter
    tasks, answers = retrieval_windows(tokenizer, filler, args.tasks, "heads")
    results = {"teacher": args.teacher, "text": args.text, "tasks": args.tasks, "seq_len": args.seq_len}
    results |= rankings(model, tasks, answers, args.keep)
    for name, ranking in results.items():
        if isinstance(ranking, dict):
            print(f"{name}: layers {ranking['kept']}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
