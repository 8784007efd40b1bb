import sys, torch
sys.path.insert(0, "/work/main/benchmarks")
from cpu_decode import recipe_student
from linearize import load_teacher
name, kind = sys.argv[1], sys.argv[2]
teacher, _ = load_teacher("smollm2-135m")
model = (teacher if name == "teacher" else recipe_student(teacher, name)).eval()
ids = torch.randint(0, 1000, (1, 2048))
with torch.no_grad():
    out = model(ids, use_cache=True)
    c = out.past_key_values; tok = ids[:, :1]
    for _ in range(3): c = model(tok, past_key_values=c, use_cache=True).past_key_values
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(10): c = model(tok, past_key_values=c, use_cache=True).past_key_values
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
