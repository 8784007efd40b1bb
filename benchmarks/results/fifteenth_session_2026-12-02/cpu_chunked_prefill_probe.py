import sys, json
sys.path.insert(0, "/work/main/benchmarks")
from cpu_decode import recipe_student
from linearize import load_teacher
from linearize.evaluate.speed import benchmark
recipe, chunk = sys.argv[1], (int(sys.argv[2]) or None)
teacher, _ = load_teacher("smollm2-135m")
model = recipe_student(teacher, recipe).eval()
r = benchmark(model, name=recipe, lengths=[4096], batch_sizes=[2], decode_tokens=4, prefill_chunk=chunk, progress=False, teacher=True)
for row in r.of("speed"):
    print(json.dumps({k: row.get(k) for k in ("model", "context", "batch", "prefill_chunk", "prefill_tokens_per_s", "decode_tokens_per_s", "prefill_peak_bytes", "decode_peak_bytes", "cache_bytes", "memory_method")}))
