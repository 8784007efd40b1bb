"""CPU decode speed and memory at 512, 2K and 8K tokens of context: SmolLM2-135M-Instruct (the teacher) against
the students of shipped recipes (`--recipes`, default lolcats_linear's pure-linear Hedgehog), each converted as
its recipe converts (an `auto:N` selection, which needs training, is replaced by keeping every (1/N)-th layer:
the same number of softmax layers, which is what speed depends on), one student at a time.

The teacher is the converted model under teacher_mode: softmax attention on the same weights, with a key/value
cache in every layer, as the original model has. The students keep fixed-size states (and the kept layers'
KV). Both prefill the same random tokens and then decode one token per step from their own cache. The new
parameters start untrained, which changes nothing about speed or memory.

Run on an otherwise idle machine (decode is timed over 64 steps, which other work on the same cores easily
disturbs; --repeats 3 keeps the least disturbed of three runs, and --rounds 3 measures student and teacher in
turn three times, so that a drift of the machine's speed reaches both). About 4 minutes per repeat on 2 idle
cores, and it writes the results file `linearize report` reads:

    python benchmarks/cpu_decode.py --repeats 3 --out runs/cpu_decode.json
    linearize report runs/cpu_decode.json --out runs/cpu_decode_report

"8K" is 8128 prompt tokens, so that the 64 decoded tokens end at the teacher's 8192-token limit. Memory figures on
CPU are resident-memory peaks above the memory held before the prefill (see linearize/evaluate/memory.py), so
they are approximate; the cache sizes are exact. Validate the script quickly with small sizes:

    python benchmarks/cpu_decode.py --lengths 128,256 --decode-tokens 8 --out /tmp/cpu_decode_small.json
    python benchmarks/cpu_decode.py --lengths 2048 --recipes lolcats,lolcats_linear,liger,mamba_in_llama,hybrid_gdn,hybrid_qwen3_5
    python benchmarks/cpu_decode.py --lengths 2048 --recipes lolcats --rounds 3 --threads 1   # one core's figures
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import linearize
from linearize.evaluate.results import Results
from linearize.evaluate.speed import benchmark
from linearize.config import load_recipe
from linearize.loaders import load_teacher

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8128", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded one per step after the prefill")
    parser.add_argument("--repeats", type=int, default=1, help="runs per length; the fastest is kept")
    parser.add_argument("--out", type=Path, default=Path("runs/cpu_decode.json"), help="results file for `linearize report`")
    parser.add_argument("--recipes", default="lolcats_linear", help="shipped recipes whose students are measured, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="student-then-teacher rounds per recipe; each model keeps its fastest")
    parser.add_argument("--original-teacher", action="store_true", help="also time, in every round, the teacher as "
                        "transformers runs it (the unconverted model with its own cache), and print the student's ratio to it")
    parser.add_argument("--threads", type=int, default=0, help="torch's intra-op threads (0: torch's default, the cores)")
    args = parser.parse_args()
    if args.threads < 0:
        parser.error(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = None
    for recipe in args.recipes.split(","):
        teacher, _ = load_teacher("smollm2-135m")
        name = f"smollm2-135m-{recipe}"
        student = recipe_student(teacher, recipe)
        rounds = []
        original = load_teacher("smollm2-135m")[0] if args.original_teacher else None
        settings = dict(lengths=[int(n) for n in args.lengths.split(",")], decode_tokens=args.decode_tokens, repeats=args.repeats, device="cpu")
        for _ in range(args.rounds):
            rounds.append(benchmark(student, name=name, **settings))
            if original is not None:
                rounds[-1].extend(benchmark(original, teacher=False, name=f"{ORIGINAL} of {name}", **settings))
            print(f"{name} round {len(rounds)}: " + ratios(rounds[-1], name), flush=True)
        measured = fastest(rounds)
        if results is None:
            results = measured
        else:
            results.extend(measured)
        results.save(args.out)
        table(measured, name)
    print(f"wrote {args.out}")


def recipe_student(teacher, recipe: str, package=linearize):
    """`teacher` converted as `recipe` converts it, an `auto:N` selection replaced by every (1/N)-th layer, by `package`'s
    `convert` (another copy of linearize, e.g. an earlier revision's, for a before-and-after run)."""
    convert = load_recipe(recipe).convert
    keep = convert.keep_attention
    if isinstance(keep, str) and keep.startswith("auto:"):
        share = float(keep.removeprefix("auto:"))
        keep = f"every:{round(1 / share)}" if share < 1 else f"every:{round(teacher.config.num_hidden_layers / share)}"
    return package.convert(teacher, convert.mixer, keep_attention=keep, hybrid=convert.hybrid, mixer_options=convert.mixer_options,
                             keep_as=convert.keep_as, source="smollm2-135m", **convert.options)


ORIGINAL = "transformers teacher"  # the unconverted teacher, with transformers' own cache (--original-teacher)


def ratios(results: Results, name: str) -> str:
    """The student's decode rate over each teacher's measured beside it, per context."""
    rows = {(r["model"], r["context"]): r["decode_tokens_per_s"] for r in results.of("speed")}
    parts = []
    for label, teacher in (("student / teacher", f"teacher of {name}"), (f"student / {ORIGINAL}", f"{ORIGINAL} of {name}")):
        if any(model == teacher for model, _ in rows):
            parts.append(label + " " + ", ".join(f"{context}: {rows[(name, context)] / rows[(teacher, context)]:.2f}"
                                                 for model, context in rows if model == name))
    return "; ".join(parts)


def fastest(rounds: list[Results]) -> Results:
    """The first round's results with each model's speed row at each context from the round it decoded fastest in:
    alternating rounds spread a machine's drift over both models, and the fastest run is the least disturbed."""
    best: dict = {}
    for row in (row for results in rounds for row in results.of("speed")):
        key = (row["model"], row["context"], row.get("batch"))
        if key not in best or row["decode_tokens_per_s"] > best[key]["decode_tokens_per_s"]:
            best[key] = row
    first = rounds[0]
    return Results(models=first.models, records=[r for r in first.records if r["kind"] != "speed"] + list(best.values()),
                   settings={**first.settings, "rounds": len(rounds)}, environment=first.environment)


def table(results, name: str) -> None:
    rows = {(r["model"], r["context"]): r for r in results.of("speed")}
    lengths = sorted({context for _, context in rows})
    teacher_name = f"teacher of {name}"
    print(f"{name}\n{'context':>8} {'teacher tok/s':>14} {'student tok/s':>14} {'speed s/t':>10} "
          f"{'teacher peak':>13} {'student peak':>13} {'teacher cache':>14} {'student cache':>14}")
    for context in lengths:
        t, s = rows[(teacher_name, context)], rows[(name, context)]
        print(
            f"{context:>8} {t['decode_tokens_per_s']:>14.1f} {s['decode_tokens_per_s']:>14.1f} "
            f"{s['decode_tokens_per_s'] / t['decode_tokens_per_s']:>10.2f} "
            f"{t['decode_peak_bytes'] / MIB:>10.1f} MiB {s['decode_peak_bytes'] / MIB:>10.1f} MiB "
            f"{t['cache_bytes'] / MIB:>10.1f} MiB {s['cache_bytes'] / MIB:>10.1f} MiB"
        )
        if (original := rows.get((f"{ORIGINAL} of {name}", context))) is not None:
            print(f"{'':>8} {ORIGINAL}: {original['decode_tokens_per_s']:.1f} tok/s, student / it "
                  f"{s['decode_tokens_per_s'] / original['decode_tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
