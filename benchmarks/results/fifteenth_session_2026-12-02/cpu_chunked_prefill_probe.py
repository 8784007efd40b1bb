"""`benchmark()` of the real teacher converted as RECIPE (untrained), 4,096 tokens, batch 2, on the CPU, prefilled in
one call (CHUNK 0) or CHUNK tokens at a time: `python cpu_chunked_prefill_probe.py lolcats 512`."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for cpu_decode
from cpu_decode import recipe_student  # noqa: E402
from linearize import load_teacher  # noqa: E402
from linearize.evaluate.speed import benchmark  # noqa: E402

recipe, chunk = sys.argv[1], (int(sys.argv[2]) or None)
teacher, _ = load_teacher("smollm2-135m")
model = recipe_student(teacher, recipe).eval()
r = benchmark(model, name=recipe, lengths=[4096], batch_sizes=[2], decode_tokens=4, prefill_chunk=chunk, progress=False, teacher=True)
for row in r.of("speed"):
    print(json.dumps({k: row.get(k) for k in ("model", "context", "batch", "prefill_chunk", "prefill_tokens_per_s", "decode_tokens_per_s", "prefill_peak_bytes", "decode_peak_bytes", "cache_bytes", "memory_method")}))
