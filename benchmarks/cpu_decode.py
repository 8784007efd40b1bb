"""CPU decode speed and memory at 512, 2K and 8K tokens of context: SmolLM2-135M-Instruct (the teacher) against
its pure-linear Hedgehog conversion, in one process with one copy of the weights.

The teacher is the converted model under teacher_mode: softmax attention on the same weights, with a key/value
cache in every layer, as the original model has. The student keeps a fixed-size recurrent state per layer.
Both prefill the same random tokens and then decode one token per step from their own cache. The Hedgehog
feature maps start at identity (undistilled), which changes nothing about speed or memory.

Run on an otherwise idle machine (decode is timed over 64 steps, which other work on the same cores easily
disturbs; --repeats 3 keeps the least disturbed of three runs). About 4 minutes per repeat on 2 idle cores, and
it writes the results file `linearize report` reads:

    python benchmarks/cpu_decode.py --repeats 3 --out runs/cpu_decode.json
    linearize report runs/cpu_decode.json --out runs/cpu_decode_report

"8K" is 8128 prompt tokens, so that the 64 decoded tokens end at the teacher's 8192-token limit. Memory figures on
CPU are resident-memory peaks above the memory held before the prefill (see linearize/evaluate/memory.py), so
they are approximate; the cache sizes are exact. Validate the script quickly with small sizes:

    python benchmarks/cpu_decode.py --lengths 128,256 --decode-tokens 8 --out /tmp/cpu_decode_small.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import linearize
from linearize.evaluate.speed import benchmark
from linearize.loaders import load_teacher

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8128", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded one per step after the prefill")
    parser.add_argument("--repeats", type=int, default=1, help="runs per length; the fastest is kept")
    parser.add_argument("--out", type=Path, default=Path("runs/cpu_decode.json"), help="results file for `linearize report`")
    args = parser.parse_args()

    teacher, _ = load_teacher("smollm2-135m")
    student = linearize.convert(teacher, "hedgehog", source="smollm2-135m")
    results = benchmark(
        student,
        lengths=[int(n) for n in args.lengths.split(",")],
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        device="cpu",
        name="smollm2-135m-hedgehog",
    )
    results.save(args.out)

    rows = {(r["model"], r["context"]): r for r in results.of("speed")}
    lengths = sorted({context for _, context in rows})
    teacher_name = "teacher of smollm2-135m-hedgehog"
    print(f"{'context':>8} {'teacher tok/s':>14} {'student tok/s':>14} {'speed s/t':>10} "
          f"{'teacher peak':>13} {'student peak':>13} {'teacher cache':>14} {'student cache':>14}")
    for context in lengths:
        t, s = rows[(teacher_name, context)], rows[("smollm2-135m-hedgehog", context)]
        print(
            f"{context:>8} {t['decode_tokens_per_s']:>14.1f} {s['decode_tokens_per_s']:>14.1f} "
            f"{s['decode_tokens_per_s'] / t['decode_tokens_per_s']:>10.2f} "
            f"{t['decode_peak_bytes'] / MIB:>10.1f} MiB {s['decode_peak_bytes'] / MIB:>10.1f} MiB "
            f"{t['cache_bytes'] / MIB:>10.1f} MiB {s['cache_bytes'] / MIB:>10.1f} MiB"
        )
    first, last = lengths[0], lengths[-1]
    for name in (teacher_name, "smollm2-135m-hedgehog"):
        a, b = rows[(name, first)], rows[(name, last)]
        print(
            f"{name}: from {first} to {last} tokens, decode speed x{b['decode_tokens_per_s'] / a['decode_tokens_per_s']:.2f}, "
            f"decode peak memory x{b['decode_peak_bytes'] / max(a['decode_peak_bytes'], 1):.2f}, cache x{b['cache_bytes'] / a['cache_bytes']:.2f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
