"""Prefill peak memory and where it comes from, generate() time, and a decode profile: teacher against every mixer family.

Random weights at the SmolLM2-135M shape (see BENCHMARKS.md, "Prefill memory and decode time, profiled").

- prefill: for each dtype, model, context and batch, one prefill as generate() and `linearize bench` run it
  (use_cache=True, logits_to_keep=1) after a short warm-up; its peak allocated memory above the weights
  (torch.cuda.max_memory_allocated), its time and the bytes of the cache it leaves.
- sites: at one context, batch 1, the allocator's history of one prefill (torch.cuda.memory._record_memory_history)
  is replayed to the moment of the peak, and the blocks alive then are summed by the line of linearize,
  transformers or fla code that allocated them.
- profile: a torch.profiler trace of a few batch-1 decode steps: wall time and GPU kernel time a step, kernel
  launches a step, and the operators that cost the most CPU time.
- generate: model.generate() at batch 1, 1 and 65 new tokens; their difference over 64 is the time a token.

`teacher_repeat_kv` is the teacher with transformers' SDPA call made to expand the kv heads itself instead of
passing enable_gqa=True (a diagnostic: in float32 no fused SDPA kernel takes enable_gqa, so SDPA falls back to
its math kernel, which materialises the T x T scores).

    python benchmarks/prefill_memory.py --label after --out /tmp/out                       # on a GPU
    python benchmarks/prefill_memory.py --arch tiny --contexts 256 --batches 1 --out /tmp/x  # anywhere (a check)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations import sdpa_attention

import linearize
from linearize.evaluate.memory import cache_bytes
from linearize.hf.cache import cache_keyword, returned_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the benchmark shapes)

# speed.py's shapes, with room for the longest context measured here.
ARCHS = {name: {**arch, "max_position_embeddings": 65536} for name, arch in speed.ARCHS.items()}

# name -> (mixer, convert options); None is the unconverted teacher.
MODELS = {
    "teacher": None,
    "teacher_repeat_kv": None,
    "hedgehog_swa_w64": ("hedgehog_swa", dict(window=64)),
    "lolcats_w256": ("hedgehog_swa", dict(window=256)),
    "gated_deltanet": ("gated_deltanet", {}),
    "gated_deltanet_w64": ("gated_deltanet", dict(window=64)),
    "gla": ("gla", {}),
    "mamba2": ("mamba2", {}),
    "hybrid_gdn": ("gated_deltanet", dict(window=64, keep_attention="spread:0.25")),
}
# Files whose lines name an allocation site (the innermost such frame of its stack).
SITE_MARKS = ("/linearize/", "/transformers/", "/fla/", "/benchmarks/")


def build(name: str, arch: str, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    config = LlamaConfig(**ARCHS[arch], attn_implementation="sdpa")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    recipe = MODELS[name]
    if recipe is not None:
        mixer, options = recipe
        model = linearize.convert(model, mixer, **options)
    model.generation_config.pad_token_id = 0
    return model


@contextmanager
def expanded_kv(enabled: bool):
    """transformers' SDPA call with the kv heads expanded by transformers instead of enable_gqa=True."""
    original = sdpa_attention.use_gqa_in_sdpa
    if enabled:
        sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_ids(model, batch: int, context: int, device, seed: int = 0):
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(seed)).to(device)


@torch.no_grad()
def prefill(model, batch: int, context: int, device) -> dict:
    """One prefill: seconds, peak bytes above what was allocated before it, and the cache's bytes."""
    ids = random_ids(model, batch, context, device)
    free(device)
    sync(device)
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync(device)
    except torch.OutOfMemoryError:
        free(device)
        return dict(out_of_memory=True)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    row = dict(seconds=seconds, peak_bytes=peak, cache_bytes=cache_bytes(returned_cache(out)), logits_shape=list(out.logits.shape))
    del out
    return row


def site(frames) -> str:
    for frame in frames:
        name = frame["filename"]
        if any(mark in name for mark in SITE_MARKS):
            short = name[name.rfind("/", 0, name.rfind("/")) + 1 :]
            return f"{short}:{frame['line']} {frame['name']}"
    return "other"


def live_at_peak(trace: list[dict], top: int) -> dict:
    """Replay allocator events: the peak of bytes allocated (since recording began) and what was alive then, by site."""
    live, now, peak, at = {}, 0, 0, -1
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            now += event["size"]
            if now > peak:
                peak, at = now, index
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            now -= live.pop(event["addr"])
    blocks = {}
    for event in trace[: at + 1]:
        if event["action"] == "alloc":
            blocks[event["addr"]] = event
        elif event["action"] in ("free_requested", "free_completed"):
            blocks.pop(event["addr"], None)
    sites = {}
    for event in blocks.values():
        entry = sites.setdefault(site(event["frames"]), dict(bytes=0, blocks=0, largest=0))
        entry["bytes"] += event["size"]
        entry["blocks"] += 1
        entry["largest"] = max(entry["largest"], event["size"])
    ranked = sorted(sites.items(), key=lambda item: -item[1]["bytes"])[:top]
    return dict(peak_bytes=peak, sites=[dict(site=name, **entry) for name, entry in ranked])


@torch.no_grad()
def allocation_sites(model, context: int, device, top: int = 8) -> dict:
    if device.type != "cuda":
        return {}
    ids = random_ids(model, 1, context, device)
    free(device)
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    try:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync(device)
        snapshot = torch.cuda.memory._snapshot()
    except torch.OutOfMemoryError:
        return dict(out_of_memory=True)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    del out
    return live_at_peak(snapshot["device_traces"][0], top)


@torch.no_grad()
def decode_profile(model, context: int, steps: int, device) -> dict:
    """Wall and GPU time a decode step at batch 1, kernel launches a step, and the costliest operators."""
    ids = random_ids(model, 1, context, device)
    keyword = cache_keyword(model)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)

    def step(token, cache):
        out = model(input_ids=token, **{keyword: cache}, use_cache=True)
        return out.logits[:, -1:].argmax(-1), returned_cache(out)

    for _ in range(3):
        token, cache = step(token, cache)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        token, cache = step(token, cache)
    sync(device)
    wall = (time.perf_counter() - start) / steps
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            token, cache = step(token, cache)
        sync(device)
    events = prof.key_averages()
    launch_names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    launches = sum(e.count for e in events if e.key in launch_names)
    gpu = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync"))
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:15]
    return dict(
        context=context,
        wall_ms=wall * 1e3,
        gpu_ms=gpu / steps / 1e3,
        launches_per_step=launches / steps,
        copies_or_syncs_per_step=syncs / steps,
        aten_calls_per_step=sum(e.count for e in events if e.key.startswith("aten::")) / steps,
        top_ops=[dict(op=e.key, calls=e.count / steps, self_cpu_us=e.self_cpu_time_total / steps) for e in ops],
        table=events.table(sort_by="self_cpu_time_total", row_limit=30),
    )


@torch.no_grad()
def generate_time(model, context: int, device, new_tokens: int = 64) -> dict:
    ids = random_ids(model, 1, context, device)
    mask = torch.ones_like(ids)
    times = {}
    for count in (1, new_tokens + 1):
        sync(device)
        start = time.perf_counter()
        try:
            model.generate(ids, attention_mask=mask, do_sample=False, min_new_tokens=count, max_new_tokens=count)
        except torch.OutOfMemoryError:
            free(device)
            return dict(context=context, out_of_memory=True)
        sync(device)
        times[count] = time.perf_counter() - start
    per_token = (times[new_tokens + 1] - times[1]) / new_tokens
    return dict(context=context, prefill_and_first_s=times[1], ms_per_token=per_token * 1e3, tokens_per_s=1 / per_token)


class Log:
    """Rows appended to OUT/<label>.jsonl as they come, so a run cut short keeps what it measured."""

    def __init__(self, out: Path, label: str, budget_s: float):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"{label}.jsonl"
        self.label = label
        self.deadline = time.monotonic() + budget_s

    def time_left(self) -> bool:
        return time.monotonic() < self.deadline

    def add(self, **row):
        row = dict(label=self.label, **row)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        shown = {k: v for k, v in row.items() if k not in ("table", "sites", "top_ops")}
        print(json.dumps(shown), flush=True)
        if "sites" in row:
            for entry in row["sites"]:
                print(f"    {entry['bytes'] / 2**30:8.3f} GiB  {entry['blocks']:5d} blocks  {entry['site']}", flush=True)
        if "top_ops" in row:
            for entry in row["top_ops"][:8]:
                print(f"    {entry['self_cpu_us']:9.0f} us  {entry['calls']:6.1f} calls  {entry['op']}", flush=True)


def summarise(out: Path) -> None:
    """Print the prefill peaks (GiB above the weights) of every label side by side, then the other sections briefly."""
    rows = [json.loads(line) for path in sorted(out.glob("*.jsonl")) for line in path.read_text().splitlines()]
    labels = sorted({r["label"] for r in rows}, reverse=True)
    peaks = {}
    for r in rows:
        if r["section"] == "prefill":
            value = "OOM" if r.get("out_of_memory") else f"{(r['peak_bytes'] or 0) / 2**30:.2f}/{r['seconds']:.2f}s"
            peaks.setdefault((r["dtype"], r["model"], r["batch"], r["context"]), {})[r["label"]] = value
    print("prefill peak GiB above the weights / seconds:", " | ".join(labels))
    for key, values in peaks.items():
        print(*key, *(values.get(label, "-") for label in labels), sep="  ")
    for r in rows:
        if r["section"] == "sites" and "sites" in r:
            top = "; ".join(f"{e['bytes'] / 2**30:.2f} {e['site']}" for e in r["sites"][:4])
            print(f"sites {r['label']} {r['dtype']} {r['model']} peak {r['peak_bytes'] / 2**30:.2f}: {top}")
        elif r["section"] == "profile":
            print(f"profile {r['dtype']} {r['model']} {r['view']}: {r['wall_ms']:.1f} ms wall, {r['gpu_ms']:.2f} ms GPU, "
                  f"{r['launches_per_step']:.0f} launches, {r['aten_calls_per_step']:.0f} aten calls a step")
        elif r["section"] == "generate":
            shown = "OOM" if r.get("out_of_memory") else f"{r['ms_per_token']:.1f} ms/token, first {r['prefill_and_first_s']:.2f}s"
            print(f"generate {r['dtype']} {r['model']} {r['context']}: {shown}")


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", help="tag for this code version (before / after)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--summarise", action="store_true", help="print the tables of the rows under --out, measure nothing")
    parser.add_argument("--arch", default="smollm2-135m", choices=sorted(ARCHS))
    parser.add_argument("--sections", default="prefill,sites,profile,generate")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--large-batch-contexts", default="4096,32768", help="contexts measured at batches above 1")
    parser.add_argument("--sites-context", type=int, default=32768)
    parser.add_argument("--sites-models", default="", help="default: --models (float32: teacher, teacher_repeat_kv, hybrid_gdn)")
    parser.add_argument("--profile-models", default="teacher,lolcats_w256,hybrid_gdn,gated_deltanet")
    parser.add_argument("--profile-context", type=int, default=2048)
    parser.add_argument("--profile-dtypes", default="bfloat16,float32")
    parser.add_argument("--generate-models", default="teacher,lolcats_w256,hedgehog_swa_w64,gated_deltanet,gated_deltanet_w64,gla,mamba2,hybrid_gdn")
    parser.add_argument("--generate-contexts", default="2048,32768")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting new measurements after this")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.out)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = Log(args.out, args.label, args.budget_s)
    sections = args.sections.split(",")
    models = args.models.split(",")
    log.add(section="environment", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
            transformers=__import__("transformers").__version__, linearize=linearize.__file__, kernels=linearize.hf.kernel_dispatch.FLA_VERSION)
    for dtype_name in args.dtypes.split(",") if {"prefill", "sites"} & set(sections) else []:
        dtype = getattr(torch, dtype_name)
        sites_models = args.sites_models.split(",") if args.sites_models else (
            models if dtype == torch.bfloat16 else ["teacher", "teacher_repeat_kv", "hybrid_gdn"]
        )
        for name in models:
            if name == "teacher_repeat_kv" and dtype != torch.float32 or not log.time_left():
                continue
            model = build(name, args.arch, dtype, device)
            with expanded_kv(name == "teacher_repeat_kv"):
                prefill(model, 1, 256, device)  # warm-up: kernels compile and autotune here
                if "prefill" in sections:
                    for batch in ints(args.batches):
                        for context in ints(args.contexts):
                            if batch > 1 and context not in ints(args.large_batch_contexts) or not log.time_left():
                                continue
                            log.add(section="prefill", model=name, dtype=dtype_name, batch=batch, context=context, **prefill(model, batch, context, device))
                if "sites" in sections and name in sites_models and log.time_left():
                    log.add(section="sites", model=name, dtype=dtype_name, context=args.sites_context, **allocation_sites(model, args.sites_context, device))
            del model
            free(device)
    if "profile" in sections:
        for dtype_name in args.profile_dtypes.split(","):
            for name in args.profile_models.split(","):
                if not log.time_left():
                    break
                model = build(name, args.arch, getattr(torch, dtype_name), device)
                views = {"model": nullcontext()} if name == "teacher" else {"model": nullcontext(), "teacher_mode": linearize.teacher_mode(model)}
                for view, mode in views.items():
                    with mode:
                        log.add(section="profile", model=name, view=view, dtype=dtype_name, **decode_profile(model, args.profile_context, 8, device))
                del model
                free(device)
    if "generate" in sections:
        for name in args.generate_models.split(","):
            if not log.time_left():
                break
            model = build(name, args.arch, torch.bfloat16, device)
            generate_time(model, 64, device, new_tokens=4)  # warm-up
            for context in ints(args.generate_contexts):
                if log.time_left():
                    log.add(section="generate", model=name, dtype="bfloat16", **generate_time(model, context, device))
            del model
            free(device)


if __name__ == "__main__":
    main()
