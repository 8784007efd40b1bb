"""cProfile of 30 batch-1 decode steps at 2K after 3 warm-up steps, one model (the teacher or a recipe's student,
converted as `benchmarks/cpu_decode.py` converts it): where a CPU decode step's Python and ATen time goes, by
function (internal time, then cumulative), and who reads the environment.

    python decode_profile.py lolcats
    python decode_profile.py teacher
    python decode_profile.py lolcats_keep 64     # 64 steps (the fortieth session): one block of kept-key decisions
"""

import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from cpu_decode import recipe_student  # noqa: E402
from linearize import load_teacher  # noqa: E402
from linearize.hf.cache import cache_keyword, returned_cache  # noqa: E402

name = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 30
teacher, _ = load_teacher("smollm2-135m")
model = (teacher if name == "teacher" else recipe_student(teacher, name)).eval()
ids = torch.randint(0, 49152, (1, 2048), generator=torch.Generator().manual_seed(0))
keyword = cache_keyword(model)
with torch.no_grad():
    out = model(ids, use_cache=True)
    cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
    for _ in range(3):
        cache = returned_cache(model(token, **{keyword: cache}, use_cache=True))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        cache = returned_cache(model(token, **{keyword: cache}, use_cache=True))
    profiler.disable()
stats = pstats.Stats(profiler)
stats.sort_stats("tottime").print_stats(35)
stats.print_callers("__getitem__")
stats.sort_stats("cumtime").print_stats(45)
