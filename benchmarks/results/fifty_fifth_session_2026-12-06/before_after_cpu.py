"""CPU (two cores), batch 1, float32, no grad: the working tree's code beside REV's (default c664cf1, the fifty-fifth
session's start), both in one process in turns (REV's package loaded as `linearize_before`; two processes in turns gave
the opposite sign, likely the idle one's OpenMP workers spinning beside the timed one). (1) One call of each changed op at a student's shape,
2,048 tokens: `kept_window_linear` (`lolcats_keep`: 9 query heads on 3 kv heads, D 64, F 128, window 256, 128 kept keys,
blocks of 64), `chunk_window_linear` (`lolcats`: the same heads, window 256; REV's on repeated kv heads, as its mixer
called it) and `chunk_gla` (`liger`: 9 heads, K 64, V 64). (2) Whole 2K prefills (last position's logits, a fresh
cache) of the GGUF teacher and of each recipe's student converted by either package.
python benchmarks/results/fifty_fifth_session_2026-12-06/before_after_cpu.py [--rev REV] [--recipes lolcats,...] [--blocks N]"""
import argparse, re, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))


def package_at(rev: str) -> None:
    """linearize/ as it was at `rev`, importable as linearize_before."""
    folder = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "linearize"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "linearize").rename(folder / "linearize_before")
    for path in (folder / "linearize_before").rglob("*.py"):
        path.write_text(re.sub(r"\b(from|import) linearize\b", r"\1 linearize_before", path.read_text()))
    sys.path.insert(0, str(folder))


def turns(runs: dict, blocks: int) -> dict[str, list[float]]:
    times = {name: [] for name in runs}
    for _ in range(blocks):
        for name, run in runs.items():
            begin = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - begin) * 1e3)
    return times


def show(times: dict[str, list[float]], base: str) -> None:
    for name, t in times.items():
        ratio = "" if name == base else f"  {base} / it {statistics.median(a / b for a, b in zip(times[base], t)):.3f}"
        print(f"  {name:28s} median {statistics.median(t):8.1f} ms{ratio}  {[round(x) for x in t]}")


def ops(blocks: int) -> None:
    import torch
    import linearize_before.hf.ops_gated as old_gated, linearize_before.hf.ops_kept as old_kept, linearize_before.hf.ops_window as old_window
    from linearize.hf import ops_gated, ops_kept, ops_window

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    t = 2048
    q, k, v = r(1, 9, t, 64), r(1, 3, t, 64), r(1, 3, t, 64)
    fq, fk = torch.softmax(r(1, 9, t, 128), -1), torch.softmax(r(1, 3, t, 128), -1)
    share = torch.sigmoid(r(9))
    weights = dict(scaling=0.125, sm_weight=share, ln_weight=1 - share)
    kept = dict(window=256, keep=128, block=64, **weights)
    rep = lambda x: x.repeat_interleave(3, dim=1)  # noqa: E731
    gq, gk, gv, gate = r(1, 9, t, 64), r(1, 9, t, 64), r(1, 9, t, 64), torch.nn.functional.logsigmoid(r(1, 9, t, 64)) / 16
    cases = {
        "kept_window_linear": (lambda: old_kept.kept_window_linear(q, k, v, fq, fk, **kept)[0],
                               lambda: ops_kept.kept_window_linear(q, k, v, fq, fk, **kept)[0]),
        "chunk_window_linear": (lambda: old_window.chunk_window_linear(q, rep(k), rep(v), fq, rep(fk), window=256, **weights)[0],
                                lambda: ops_window.chunk_window_linear(q, k, v, fq, fk, window=256, **weights)[0]),
        "chunk_gla": (lambda: old_gated.chunk_gla(gq, gk, gv, gate)[0], lambda: ops_gated.chunk_gla(gq, gk, gv, gate)[0]),
    }
    with torch.no_grad():
        for name, (before, after) in cases.items():
            print(f"{name}: outputs equal: {torch.equal(before(), after())}")
            show(turns({"before": before, "after": after}, blocks), "before")


def prefills(recipes: list[str], blocks: int) -> None:
    import torch
    import linearize_before
    from cpu_decode import recipe_student
    from linearize import load_teacher

    ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
    models = {"teacher": load_teacher("smollm2-135m")[0]}
    for recipe in recipes:
        models[recipe] = recipe_student(load_teacher("smollm2-135m")[0], recipe)
        models[f"{recipe}@before"] = recipe_student(load_teacher("smollm2-135m")[0], recipe, package=linearize_before)
    with torch.no_grad():
        for recipe in recipes:
            a, b = (models[name](ids, logits_to_keep=1).logits for name in (recipe, f"{recipe}@before"))
            print(f"{recipe}: max |logits after - before| {(a - b).abs().max().item():.2e} of {a.abs().max().item():.1f}")
        runs = {name: (lambda m=model: m(ids, use_cache=True, logits_to_keep=1)) for name, model in models.items()}
        for run in runs.values():
            run()
        show(turns(runs, blocks), "teacher")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="c664cf1")
    parser.add_argument("--recipes", default="lolcats,lolcats_keep,hybrid_long,liger")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--skip-ops", action="store_true")
    args = parser.parse_args()
    package_at(args.rev)
    if not args.skip_ops:
        ops(args.blocks * 2)
    if args.recipes:
        prefills(args.recipes.split(","), args.blocks)
