import copy, sys, torch
sys.path.insert(0, "benchmarks")
from cpu_decode import recipe_student
from linearize import load_teacher
from linearize.hf.cache import cache_keyword, returned_cache
from torch.profiler import profile, ProfilerActivity
teacher = load_teacher("smollm2-135m", dtype=torch.float32)[0].eval()
recipe = sys.argv[1]
model = teacher if recipe == "teacher" else recipe_student(copy.deepcopy(teacher), recipe).eval()
ids = torch.randint(0, 1000, (1, 2048))
with torch.inference_mode():
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
    kw = cache_keyword(model)
    for _ in range(3):
        out = model(token, **{kw: cache}, use_cache=True); cache = returned_cache(out)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(20):
            out = model(token, **{kw: cache}, use_cache=True); cache = returned_cache(out)
print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=30, max_shapes_column_width=70))
