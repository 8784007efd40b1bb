"""Quality on the real teacher: every recipe distilled on an offline corpus, teacher and students scored alike.

For each recipe: `linearize run` with the corpus from `benchmarks/gather_corpus.py` (its manifest.json names the
sources, the held-out documents of each, and the genre held out whole), then, on the saved student and on the same
original teacher: perplexity of the first 60K tokens of every held-out text in 512-token and in 2048-token windows
(`--ppl-contexts`: 8192 too where asked), KL(teacher || student) and top-1 next-token agreement on Persuasion,
passkey retrieval at 512, 2K and 8K tokens, and the lm-eval suite `local` (the multiple-choice task
austen_next_sentence, acc_norm). Stage times and tokens/s come from the run itself. It writes quality.json
(every figure: a recipe's row as soon as it has trained, then after each measure) and, after every recipe,
results.json (the `linearize eval` format) and report/ (`linearize report`). `--report-only` redraws the last
two from an existing quality.json, and `--merge` draws them from chosen rows of several runs (one per recipe).
`--ruler` adds RULER's multi-key needle, key-value retrieval and variable tracking beside passkey (3 depths x
`--trials` prompts per length: 9 trials give 27 per length, a standard error under 0.1); `--kinds passkey,multikey`
asks some of them. A miss is kept with what the model said (`passkey_2048_misses`, the first three per depth). `--resume` continues a
call cut short by a time limit: finished rows stay, an interrupted recipe run continues from its checkpoints, and
a trained but unscored student is scored. `--teacher-scores OTHER/quality.json` takes the teacher's figures from an
earlier run with the same settings instead of measuring them again.

    python benchmarks/gather_corpus.py --out corpus
    python benchmarks/quality.py --teacher smollm2-135m --corpus corpus --tokens 2000000,8000000 --batch-size 32 --compile \
        --out results/quality lolcats:convert.options.window=128
    python benchmarks/quality.py --report-only --out results/quality

`--suite none` skips lm-eval (which the GPU machine gets as wheels in .whl/, see benchmarks/h100_session.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.config import load_recipe
from linearize.distillation.resume import RUN_FILE
from linearize.evaluate.longcontext import RULER_KINDS, ask, make_probe
from linearize.evaluate.perplexity import agreement, perplexity
from linearize.evaluate.results import ModelEntry, Results
from linearize.evaluate.scoring import evaluate
from linearize.evaluate.suites import task_specs
from linearize.pipeline import run
from linearize.record import RunRecord
from linearize.run import checkpoint_folder
from linearize.report import write_report
from linearize.textdata import read_text_source, token_windows
from passkey_probe import window_shares  # benchmarks/, first on the path when run as a script

RECIPES = ("lolcats", "lolcats_linear", "liger", "mamba_in_llama", "hybrid_gdn")


HELDOUT_NAMES = {"python-docs": "docs"}  # the names earlier runs' quality.json used
DEPTHS = (0.1, 0.5, 0.9)
AGREEMENT_WINDOWS = 32  # of 512 tokens of Persuasion: 16,384 tokens


def retrieval_probes(tokenizer, kind: str, length: int, trials: int) -> list:
    """`trials` prompts of `kind` at each of DEPTHS, `length` tokens long: the same for every model and run."""
    # Passkey keeps the seed of the runs before RULER was added, so its figures compare across BENCHMARKS.md.
    rng = random.Random(length if kind == "passkey" else f"{kind}-{length}")
    return [make_probe(tokenizer, kind, length, depth, rng) for depth in DEPTHS for _ in range(trials)]


@torch.no_grad()
def retrieval(model, tokenizer, kind: str, length: int, trials: int) -> tuple[dict[str, float], dict[str, list]]:
    """Exact-match accuracy of `kind` (passkey, or RULER's multikey, kv and vt) per depth, and per depth the first
    misses with what the model said (keys are the depths as text, for JSON); the prompts depend only on the kind and
    length, so teacher and student answer the same ones."""
    cells = ask(model, tokenizer, retrieval_probes(tokenizer, kind, length, trials))
    return {f"{depth:g}": cells[(length, depth)].value for depth in DEPTHS}, {f"{depth:g}": cells[(length, depth)].misses for depth in DEPTHS}


def earlier_teacher(path: Path) -> dict:
    """The teacher's figures in another run's quality.json (the first row's, which every row shares)."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--teacher-scores {path}: {error}; give the quality.json of an earlier run") from None
    if not rows or not rows[0].get("teacher"):
        raise SystemExit(f"--teacher-scores {path}: no teacher figures in it; give the quality.json of a run that scored its teacher")
    return rows[0]["teacher"]


def heldout_windows(tokenizer, folder: Path, contexts: list[int], max_tokens: int) -> dict[str, torch.LongTensor]:
    """Every held-out text in `folder` (the corpus's manifest names the one of a genre absent from training) cut into
    windows of each context, keyed "persuasion" at 512 and "persuasion_2048" elsewhere: the recipes train at 512, where
    lolcats' 256-token softmax window covers half of every window; at 2048 and beyond the linear part carries most of
    the context."""
    heldout = {}
    for path in sorted(folder.glob("*.txt")):
        name = HELDOUT_NAMES.get(path.stem, path.stem)
        text = read_text_source(str(path))
        for context in contexts:
            heldout[name if context == 512 else f"{name}_{context}"] = token_windows(tokenizer, text, context, max_tokens=max_tokens)
    return heldout


def tasks(model, tokenizer, suite: str, limit: int | None = None) -> dict:
    """The lm-eval suite's figures: "tasks" holds the records as `linearize eval` writes them (for as_results), and
    TASK_METRIC and TASK_METRIC_stderr repeat each metric flat, for reading quality.json."""
    records = [
        {k: v for k, v in r.items() if k not in ("model", "kind")}
        for r in evaluate(model, tokenizer, suite=suite, limit=limit, teacher=False, progress=False).of("task")
    ]
    out = {"tasks": records}
    for r in records:
        out[f"{r['task']}_{r['metric']}"] = r["value"]
        out[f"{r['task']}_{r['metric']}_stderr"] = r["stderr"]
    return out


def score(
    model, tokenizer, heldout: dict[str, torch.LongTensor], lengths: list[int], kinds: list[str], trials: int, suite: str | None,
    task_limit: int | None, into: dict, save,
) -> None:
    """Score `model` into `into`, calling `save` after each measure, so a run stopped by a time limit keeps the
    figures it got; a measure already in `into` (from such a run, under --resume) is not taken again."""
    model.eval()
    # 8 windows of 512 per batch, 4 of 2048: the float32 logits over SmolLM2's 49K vocabulary are the peak.
    for name, windows in heldout.items():
        if f"ppl_{name}" not in into:
            into[f"ppl_{name}"] = perplexity(model, windows.to(model.device), batch_size=max(1, min(8, 8192 // windows.shape[1])))
            save()
    for kind in kinds:
        for n in lengths:
            if f"{kind}_{n}_by_depth" not in into:
                by_depth, misses = retrieval(model, tokenizer, kind, n, trials)
                into[f"{kind}_{n}"] = sum(by_depth.values()) / len(by_depth)
                into[f"{kind}_{n}_by_depth"] = by_depth
                into[f"{kind}_{n}_misses"] = misses
                save()
    if suite and "tasks" not in into:
        into |= tasks(model, tokenizer, suite, task_limit)
        save()


def training_row(name: str, result: RunRecord, model, teacher_scores: dict, seconds: float) -> dict:
    """A recipe's row of quality.json once it has trained (plain JSON: the run's stage reports as dicts); `seconds`
    is what `linearize run` took: conversion, stages and its own perplexity."""
    names = model.config.mixer_names()
    return {
        "recipe": name,
        "mixers": sorted(set(names)),
        "mixer_counts": dict(Counter(names)),
        "attention_layers": [i for i, m in enumerate(names) if m == "attention"],
        "teacher": teacher_scores,
        "teacher_via": "original",
        "student": {},
        "converted_ppl_persuasion": result.converted.perplexity,
        "window_shares": window_shares(model),  # hedgehog_swa's learned balance, per layer (retrieval depends on it)
        "selection": result.selection,
        "stages": [dataclasses.asdict(stage) for stage in result.stages],
        "pipeline_seconds": seconds,
    }


def text_and_context(key: str) -> tuple[str, int]:
    """("persuasion", 2048) for ppl_persuasion_2048; a key without a context (ppl_persuasion) is the 512-token figure."""
    text, _, context = key.removeprefix("ppl_").rpartition("_")
    return (text, int(context)) if text and context.isdigit() else (key.removeprefix("ppl_"), 512)


def as_results(summary: list[dict], eval_tokens: int) -> Results:
    """The figures of quality.json as a results file for `linearize report`, KL, top-1 agreement and stage times included.

    Passkey goes in only where the run kept it per depth (runs before that kept only the mean per length); tasks and
    2048-token perplexity only where the run measured them.
    """
    results = Results(settings={"source": "benchmarks/quality.py", "eval_tokens": eval_tokens, "seq_len": 512})
    results.add_model(ModelEntry(name="teacher", role="teacher", via=summary[0].get("teacher_via", "teacher_mode") if summary else "original"))
    for row in summary:
        results.add_model(ModelEntry(name=row["recipe"], role="student", teacher="teacher", mixers=row.get("mixer_counts", {})))
    first = summary[0]["teacher"] if summary else {}
    for model, scores in [("teacher", first)] + [(row["recipe"], row["student"]) for row in summary]:
        for key, value in scores.items():
            if key.startswith("ppl_"):
                text, context = text_and_context(key)
                results.add(model, "perplexity", data=text, context=context, stride=context, value=value, tokens=eval_tokens)
            elif key.endswith("_by_depth"):
                kind, length = key.split("_")[:2]
                misses = scores.get(f"{kind}_{length}_misses", {})
                for depth, accuracy in value.items():
                    results.add(model, kind, length=int(length), depth=float(depth), value=accuracy, misses=misses.get(depth, []))
        for record in scores.get("tasks", []):
            results.add(model, "task", **record)
    for row in summary:
        if "kl_per_token" in row:
            tokens = row.get("agreement_tokens", AGREEMENT_WINDOWS * 512)
            results.add(row["recipe"], "agreement", teacher="teacher", data="persuasion", context=512, kl=row["kl_per_token"], top1=row["top1_agreement"], tokens=tokens)
        for stage in row.get("stages", []):
            results.add(row["recipe"], "training", stage=stage["stage"], stage_kind=stage["kind"], tokens=stage["tokens"], seconds=stage["seconds"],
                        tokens_per_s=stage["tokens"] / stage["seconds"] if stage["seconds"] else None)
    return results


def publish(summary: list[dict], out: Path, eval_tokens: int) -> None:
    as_results(summary, eval_tokens).save(out / "results.json")
    write_report([out / "results.json"], out / "report")


def merged_rows(entries: list[str]) -> list[dict]:
    """The rows named FILE:RECIPE (each the last row of that recipe in FILE), with the first row's teacher figures.

    Runs on the same teacher score it identically (it is scored deterministically in every run), so one teacher
    column serves rows from several runs; a row whose teacher figures differ from the first's is refused.
    """
    rows = []
    for entry in entries:
        path, _, recipe = entry.rpartition(":")
        found = path and Path(path).is_file()
        matching = [row for row in json.loads(Path(path).read_text()) if row["recipe"] == recipe] if found else []
        if not matching:
            raise SystemExit(f"--merge: no row for {recipe!r} in {path!r}; give FILE:RECIPE with a recipe that FILE holds")
        rows.append(dict(matching[-1]))
    teacher = rows[0]["teacher"]
    for row in rows[1:]:
        shared = set(row["teacher"]) & set(teacher)
        if any(row["teacher"][key] != teacher[key] for key in shared if key.startswith("ppl_")):
            raise SystemExit(f"--merge: {row['recipe']}'s teacher perplexities differ from the first row's; merge runs of one teacher")
        row["teacher"] = teacher
    return rows


def overrides_for(recipe: str, overrides: list[str]) -> list[str]:
    """The command line's overrides that apply to `recipe`: plain key=value ones, and RECIPE:key=value ones for it."""
    chosen = []
    for override in overrides:
        key = override.split("=", 1)[0]
        if ":" not in key:
            chosen.append(override)
        elif key.split(":", 1)[0] == recipe:
            chosen.append(override.split(":", 1)[1])
    return chosen


def train_or_resume(recipe, folder: Path, resume: bool, log) -> RunRecord:
    """`linearize run` of `recipe` into `folder`, from the start; with `resume`, a folder that holds a trained student
    is read back instead (its run record), and one whose run was interrupted continues from its checkpoints."""
    if resume and (folder / "config.json").is_file() and (record := RunRecord.read(folder)) is not None:
        log(f"trained in an earlier run: {folder}")
        return record
    interrupted = resume and (checkpoint_folder(folder) / RUN_FILE).is_file()
    return run(recipe, out=folder, overwrite=not interrupted, resume=interrupted, log=log)


def quality_recipe(name: str, args, corpus: Path, budgets: list[int]):
    """The recipe as shipped, on the corpus (Persuasion held out) and its own training windows, with `budgets`' tokens
    a stage and `args`' batch size, compile switch and overrides; scored in 512-token windows."""
    overrides = [f"teacher={args.teacher}", f"data.train={corpus / 'train'}", f"data.heldout={corpus / 'heldout' / 'persuasion.txt'}",
                 "data.streaming=false", f"eval.perplexity_tokens={args.eval_tokens}", "eval.seq_len=512"]
    for i in range(len(load_recipe(name, overrides).stages)):
        overrides.append(f"stages.{i}.tokens={budgets[min(i, len(budgets) - 1)]}")
        if args.batch_size:
            overrides.append(f"stages.{i}.batch_size={args.batch_size}")
        if args.compile:
            overrides.append(f"stages.{i}.compile=true")
    return load_recipe(name, overrides + overrides_for(name, args.overrides))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default="corpus")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--tokens", default="2000000", help="token budget of every stage, or one per stage (2000000,8000000)")
    parser.add_argument("--batch-size", type=int, default=0, help="windows per step in every stage (0: the recipe's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every stage")
    parser.add_argument("--passkey-lengths", default="512,2048,8000")
    parser.add_argument("--trials", type=int, default=2, help="retrieval prompts per length and depth (3 depths)")
    parser.add_argument("--kinds", default="passkey", help="retrieval tasks asked at --passkey-lengths: passkey and RULER's "
                        "multikey, kv, vt")
    parser.add_argument("--ruler", action="store_true", help="all four: --kinds passkey,multikey,kv,vt")
    parser.add_argument("--teacher-scores", default="", help="another run's quality.json: the teacher's figures it holds are "
                        "not measured again (same teacher, corpus, code and settings: the prompts are seeded)")
    parser.add_argument("--resume", action="store_true", help="keep --out's finished rows, continue an interrupted recipe run "
                        "from its checkpoints, and score a trained student that was not scored")
    parser.add_argument("--ppl-contexts", default="512,2048", help="perplexity of every held-out text in windows of each "
                        "length (8192 is SmolLM2's context)")
    parser.add_argument("--eval-tokens", type=int, default=61440, help="held-out tokens scored (the first 60K of each text)")
    parser.add_argument("--suite", default="local", help="lm-eval suite scored on teacher and students (eval/suites.yaml), or none")
    parser.add_argument("--task-limit", type=int, default=0, help="questions per lm-eval task (0: all; a CPU smoke run wants a few)")
    parser.add_argument("--out", default="results/quality")
    parser.add_argument("--report-only", action="store_true", help="redraw results.json and report/ from --out's quality.json")
    parser.add_argument("--merge", default="", help="FILE:RECIPE,...: write --out's quality.json from these rows of other runs' "
                        "quality.json (the teacher's figures from the first row), then draw the report")
    parser.add_argument("overrides", nargs="*", help="extra key=value recipe overrides for every recipe, or RECIPE:key=value for one")
    args = parser.parse_args()
    corpus, out = Path(args.corpus), Path(args.out)
    if args.merge:
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(merged_rows(args.merge.split(",")), indent=1))
    if args.report_only or args.merge:
        publish(json.loads((out / "quality.json").read_text()), out, args.eval_tokens)
        return
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(n) for n in args.passkey_lengths.split(",")]
    kinds = ["passkey", *RULER_KINDS] if args.ruler else args.kinds.split(",")
    if unknown := sorted(set(kinds) - {"passkey", *RULER_KINDS}):
        parser.error(f"--kinds: unknown {', '.join(unknown)}; use some of passkey, {', '.join(RULER_KINDS)}")
    suite = None if args.suite == "none" else args.suite
    if suite:
        from linearize.evaluate.harness import run_tasks  # noqa: F401  (a missing lm-eval fails here, before any training)

        task_specs((), suite)  # an unknown suite too
    # --resume keeps the rows that were scored to the end, and the figures of a row cut short while scoring (its
    # student's and the teacher's): scoring goes on from the first measure that it lacks.
    rows = json.loads((out / "quality.json").read_text()) if args.resume and (out / "quality.json").is_file() else []
    summary = [row for row in rows if "seconds" in row]
    unfinished = {row["recipe"]: row for row in rows if "seconds" not in row}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher_model, tokenizer = linearize.load_teacher(args.teacher, dtype=torch.float32)
    teacher_model = teacher_model.to(device).eval()
    heldout = heldout_windows(tokenizer, corpus / "heldout", [int(n) for n in args.ppl_contexts.split(",")], args.eval_tokens)
    budgets = [int(t) for t in args.tokens.split(",")]
    # Every row shares it: the original teacher, scored once, in the first recipe's turn (or in the turns it took).
    teacher_scores: dict = summary[0]["teacher"] if summary else next(iter(unfinished.values()), {}).get("teacher", {})
    if args.teacher_scores:
        teacher_scores |= {k: v for k, v in earlier_teacher(Path(args.teacher_scores)).items() if k not in teacher_scores}

    def save() -> None:  # unfinished rows stay on record until their recipe's turn
        waiting = [row for name, row in unfinished.items() if all(r["recipe"] != name for r in summary)]
        (out / "quality.json").write_text(json.dumps(summary + waiting, indent=1))

    for name in args.recipes.split(","):
        if any(row["recipe"] == name for row in summary):
            print(f"[{name}] scored in an earlier run of {out}: kept", flush=True)
            continue
        # Each recipe's compiled layers would otherwise add to the same code objects' caches, and past torch's
        # recompile limit the later recipes would silently run eager.
        torch._dynamo.reset()
        started = time.time()
        recipe = quality_recipe(name, args, corpus, budgets)
        result = train_or_resume(recipe, out / name, args.resume, log=lambda m: print(f"[{name}] {m}", flush=True))
        model = AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).to(device)
        # The row goes to quality.json as soon as training ends, and grows measure by measure.
        row = training_row(name, result, model, teacher_scores, time.time() - started)
        previous = unfinished.get(name, {})
        row |= {key: previous[key] for key in ("student", "pipeline_seconds") if key in previous}
        summary.append(row)
        save()
        if "kl_per_token" not in previous:
            # Against the original teacher, not the student's teacher_mode: LoRA KD merges into the teacher's projections.
            row["kl_per_token"], row["top1_agreement"], row["agreement_tokens"] = agreement(
                lambda batch: teacher_model(batch, use_cache=False).logits, lambda batch: model(batch, use_cache=False).logits,
                heldout["persuasion"][:AGREEMENT_WINDOWS].to(device),
            )
        else:
            row |= {key: previous[key] for key in ("kl_per_token", "top1_agreement", "agreement_tokens")}
        save()
        # The student first: the teacher's figures are the same in every run, so a run cut short loses the least.
        score(model, tokenizer, heldout, lengths, kinds, args.trials, suite, args.task_limit or None, row["student"], save)
        score(teacher_model, tokenizer, heldout, lengths, kinds, args.trials, suite, args.task_limit or None, teacher_scores, save)
        row["seconds"] = time.time() - started
        save()
        publish(summary, out, args.eval_tokens)
        print(json.dumps({k: row[k] for k in ("recipe", "student", "kl_per_token", "top1_agreement", "seconds")}), flush=True)


if __name__ == "__main__":
    main()
