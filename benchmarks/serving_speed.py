"""Plain `generate()` of a teacher and its linearize students side by side, with transformers' dynamic cache and with
`cache_implementation="static"` (on CUDA transformers then compiles the decode step, CUDA graphs included).

Random weights at a given shape (default SmolLM2-135M's: 30 layers, 576 wide, 9 query / 3 KV heads of 64), or
saved students (`--students DIR,...`, with their teacher from `--teacher`). Random students are made per
`--mixers` entry, MIXER or MIXER:key=value:... (key=value@LAYERS: on those layers, e.g. keep=1536@6-7+14); "qwen3_5" is hybrid_qwen3_5's layout (every fourth layer
`qwen3_5_attention`, the rest `qwen3_5_gdn`), which is also measured exported (`linearize.export.build_native`),
and "hybrid_gdn" is hybrid_gdn's (every fourth layer the teacher's softmax, the rest `gated_deltanet`, window 64).
The teacher is the first student's own weights under `teacher_mode` (softmax everywhere).

Per model, cache and context, batch 1: prefill tokens/s (one eager forward; and the prompt over generate()'s first
token's time, which with `--prefill-chunk N` and a static cache is transformers' chunked prefill through its compiled
forward), greedy decode tokens/s through `model.generate()` (read
inside the call from each new token's time, the fastest of `--repeats` calls, and the median step), the peak memory,
and the memory-bandwidth floor (weights plus the state after the prompt, read once per token, at `--bandwidth`
bytes/s; 4.8e12 is the H200's HBM3e). The warm-up runs at the timed calls' prompt, so kernels compile outside the
timing; `--fresh-lengths` times each call (and the trace) at a prompt length not used before (`fresh_prompt_lengths`).
`--kept-teacher` adds the teacher converted with every layer kept ("teacher_kept": its own logits through a converted
model's forward, whose eager decode step takes SDPA's flash before cuDNN, `linearize.hf.attention.decode_attention`),
so that one run tells what that backend order buys apart from what the students' linear layers buy.
Each row is a JSON line on stdout and in --out as it is measured (a run cut short keeps what it measured).

    python benchmarks/serving_speed.py --device cuda --lengths 2048,8192,32768 --out serving.jsonl \\
        --mixers gated_deltanet:window=64,hedgehog_swa:window=64,gla,qwen3_5
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import profile
from transformers import AutoConfig, AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

import linearize
from linearize.distillation.profiling import activities as profiled_activities, costliest
from linearize.export import build_native
from linearize.hf.cache import returned_cache

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=32768, rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, max_position_embeddings=4096),
}
CACHES = ("dynamic", "static")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_mixer(entry: str) -> tuple[str, dict, list[tuple[str, dict]]]:
    """"gla:window=64" -> ("gla", {"window": 64}, []); a key=value@LAYERS option is set on those layers after the
    conversion (`linearize.set_options`; a selection joined with +): "hedgehog_swa:keep=139:keep=1536@6-7+14" ->
    ("hedgehog_swa", {"keep": 139}, [("6-7+14", {"keep": 1536})])."""
    name, *options = entry.split(":")

    def value(text):
        return int(text) if text.isdigit() else text

    everywhere = {k: value(v) for k, v in (o.split("=", 1) for o in options if "@" not in o)}
    layered = []
    for option in (o for o in options if "@" in o):
        setting, layers = option.split("@", 1)
        key, text = setting.split("=", 1)
        layered.append((layers, {key: value(text)}))
    return name, everywhere, layered


def random_students(shape: str, entries: list[str], dtype) -> dict:
    config = AutoConfig.for_model("llama", **SHAPES[shape])
    students = {}
    for entry in entries:
        torch.manual_seed(0)  # one teacher's weights under every student
        teacher = AutoModelForCausalLM.from_config(config).to(dtype).eval()
        name, options, layered = parse_mixer(entry)
        if name == "qwen3_5":
            students[entry] = linearize.convert(teacher, "qwen3_5_gdn", keep_attention="every:4", keep_as="qwen3_5_attention")
        elif name == "hybrid_gdn":
            students[entry] = linearize.convert(teacher, "gated_deltanet", window=64, keep_attention="every:4")
        else:
            students[entry] = linearize.convert(teacher, name, **options)
        for layers, settings in layered:
            linearize.set_options(students[entry], layers=layers, **settings)
    return students


def floor_bytes(model, ids) -> int:
    """Bytes a batch-1 decode step must read at least: every weight but the input embedding table (one row is read),
    plus the state left after the prompt (its KV for softmax layers)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = returned_cache(out)
    if hasattr(cache, "state_bytes"):
        state = sum(cache.state_bytes())
    else:
        state = sum(t.numel() * t.element_size() for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t))
    return weights + state


def write_costliest(averages, device, path: Path, rows: int = 30) -> None:
    """`path` gets the `rows` costliest of a profile's `averages` by self CPU time, and on CUDA by GPU time too."""
    path.write_text(costliest(averages, device, rows))


@torch.no_grad()
def traced(model, settings: dict, new_tokens: int, device, path: Path) -> dict:
    """Where a decode step's time goes: generate() under torch.profiler, with the timed call's tokens and with one, the
    difference per token of the GPU kernels run, their milliseconds and the CUDA-graph launches, and the longer call's
    wall milliseconds per decode step (the profiler's overhead included; read between its tokens, `StepClock`, so the
    two calls' prefills do not enter it); and the one-token call itself, which is the prefill as generate() runs it
    (chunked and compiled where the settings say so) and one token: its wall milliseconds and GPU kernels
    ("first_token"), whether the GPU or the host bounds that prefill. `path` gets the longer call's costliest ops by
    self CPU time and by GPU time."""
    activities = profiled_activities(device)
    calls = {}
    for tokens in (1, new_tokens + 1):
        clock = StepClock(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            model.generate(**{**settings, "max_new_tokens": tokens, "min_new_tokens": tokens}, stopping_criteria=StoppingCriteriaList([clock]))
            wall = time.perf_counter() - start
        events = prof.events()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        calls[tokens] = {"kernels": len(kernels), "kernel_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
                         "graph_launches": sum(e.name == "cudaGraphLaunch" for e in events), "wall_ms": wall * 1e3}
    write_costliest(prof.key_averages(), device, path)
    cost = {f"{key}_per_token": (calls[new_tokens + 1][key] - calls[1][key]) / new_tokens for key in calls[1] if key != "wall_ms"}
    return {"wall_ms_per_token": 1e3 * (clock.times[-1] - clock.times[0]) / new_tokens, **cost, "first_token": calls[1]}


@torch.no_grad()
def traced_prefill(model, ids: torch.Tensor, device, path: Path) -> dict:
    """Where a prefill's time goes: one uncached forward over `ids` (one position's logits, as timed) under
    torch.profiler: wall and GPU kernel milliseconds, kernels run, and `path` gets its costliest ops by self CPU time and
    by GPU time, each grouped by the last 5 Python frames that called it (which mixer, which line)."""
    with profile(activities=profiled_activities(device), with_stack=True) as prof:
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync(device)
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    write_costliest(prof.key_averages(group_by_stack_n=5), device, path)
    return {"wall_ms": wall * 1e3, "kernels": len(kernels), "kernel_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3}


class StepClock(StoppingCriteria):
    """Never stops generate(); notes the time after each new token, the device synchronised first (generate() waits
    for every step's token anyway, to check for finished sequences). times[0] follows the prefill and the first
    token; each later gap is one decode step, so the decode rate is read inside one call, with no prefill in it."""

    def __init__(self, device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)


def fresh_prompt_lengths(context: int, new_tokens: int, repeats: int) -> list[int]:
    """Prompt lengths for `repeats` timed calls whose key lengths neither the warm-up (a `context`-token prompt) nor
    another timed call reached: SDPA's cuDNN backend builds a graph for every new key length and keeps it, so calls at
    the warm-up's own lengths time cached graphs, which a user's new prompt length does not find. Steps of 16
    positions keep Triton's specialisation of a length that 16 divides."""
    stride = 16 * -(-(new_tokens + 2) // 16)
    return [context + stride * (i + 1) for i in range(repeats)]


# The most warm-up generate() calls before the timed ones (`measure`).
WARMUPS = 5


@torch.no_grad()
def measure(
    model, context: int, new_tokens: int, cache: str, device, bandwidth: float, trace: Path | None = None, repeats: int = 3,
    fresh: bool = False, prefill_chunk: int | None = None,
) -> dict:
    # the timed calls' prompt lengths, then the trace's
    *prompts, traced_prompt = fresh_prompt_lengths(context, new_tokens, repeats + 1) if fresh else [context] * (repeats + 1)
    vocab = model.config.get_text_config().vocab_size
    longest = torch.randint(0, vocab, (1, traced_prompt), generator=torch.Generator().manual_seed(0)).to(device)
    ids = longest[:, :context]
    settings = dict(input_ids=ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False)
    if cache == "static":
        settings["cache_implementation"] = "static"
    if prefill_chunk:
        settings["prefill_chunk_size"] = prefill_chunk
    # Warm-up first, at the context's prompt (the timed calls' own unless fresh): kernels compile (Triton, fla) on their first call at each shape,
    # and a static cache's decode step compiles (and records its CUDA graphs) on its first calls: their time is
    # warmup_seconds, compilation included. At least two generate() calls with a static cache, one without, and more
    # until one compiles and records nothing (at most WARMUPS): after two, the teacher's compiled chunked prefill still
    # recorded a CUDA graph in a timed call, whose first token took 57.2 ms against 21.7 ms in a run without (H100,
    # sixty-third session).
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    for call in range(WARMUPS):
        counts = compile_counts()
        model.generate(**settings)
        if call + 1 >= (2 if cache == "static" else 1) and compile_counts() == counts:
            break
    sync(device)
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - start
    before = compile_counts()
    calls = []
    for prompt in prompts:
        clock = StepClock(device)
        start = time.perf_counter()
        model.generate(**settings | {"input_ids": longest[:, :prompt]}, stopping_criteria=StoppingCriteriaList([clock]))
        calls.append((clock.times[-1] - start, clock.times[0] - start, clock.times))
    # the call whose decode was fastest (the least disturbed by other work)
    index = min(range(len(calls)), key=lambda i: calls[i][0] - calls[i][1])
    total, first, times = calls[index]
    during = {name: count - before[name] for name, count in compile_counts().items()}
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    floor = floor_bytes(model, ids)
    row = {"context": context, "cache": cache, "prefill_tokens_per_s": context / prefill,
           "decode_tokens_per_s": new_tokens / max(total - first, 1e-9),
           "decode_step_ms_median": 1e3 * statistics.median(later - before for before, later in zip(times, times[1:])),
           "generate_seconds": total, "first_token_seconds": first, "prefill_chunk": prefill_chunk,
           "generate_prefill_tokens_per_s": prompts[index] / first, "warmup_seconds": warmup, "repeats": repeats,
           "peak_bytes": peak, "timed_call": during, "timed_prompt_lengths": prompts,
           "floor_bytes_per_token": floor, "floor_tokens_per_s": bandwidth / floor}
    if trace is not None:
        row["trace"] = traced(model, settings | {"input_ids": longest[:, :traced_prompt]}, new_tokens, device, trace)
        row["prefill_trace"] = traced_prefill(model, ids, device, trace.with_name(f"{trace.stem}-prefill.txt"))
    return row


def count_recordings() -> None:
    """Count, beside torch's own inductor counters, the CUDA graphs that torch.compile's CUDA-graph trees record (each
    recording runs the step under capture)."""
    from torch._inductor import cudagraph_trees

    record = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counted(self, *args, **kwargs):
        counters["inductor"]["cudagraph_recordings"] += 1
        return record(self, *args, **kwargs)

    cudagraph_trees.CUDAGraphTreeManager.record_function = counted


def name_skipped_mutations() -> None:
    """Where torch.compile skips CUDA graphs for a graph that mutates an input without a static address, print each
    such input's shape and dtype (TORCH_LOGS=cudagraphs prints one stack trace only). Both of inductor's checks are
    wrapped: at compile time (`check_for_mutation_ignore_cuda_graph_managed_tensor`, the graph's placeholders) and at
    a CUDA-graph tree's recording (`cudagraph_trees.check_for_mutation`, the real inputs)."""
    from torch._inductor import cudagraph_trees, cudagraph_utils

    def report(described: list[str]) -> None:
        for line in described:
            print(f"cudagraphs skipped: input {line} is mutated without a static address", file=sys.stderr, flush=True)

    at_compile = cudagraph_utils.check_for_mutation_ignore_cuda_graph_managed_tensor

    def compiled(gm, mutated_inputs, mutated_input_idxs, static_input_idxs):
        reason = at_compile(gm, mutated_inputs, mutated_input_idxs, static_input_idxs)
        if reason is not None:
            nodes = [node for node in gm.graph.nodes if node.op == "placeholder"]
            values = {index: nodes[index].meta.get("val") for index in set(mutated_input_idxs) - set(static_input_idxs)}
            report([f"{index} ({nodes[index].name}, {tuple(getattr(v, 'shape', ()))}, {getattr(v, 'dtype', None)})" for index, v in sorted(values.items())])
        return reason

    at_recording = cudagraph_trees.check_for_mutation

    def recorded(func, inputs, is_cuda_graph_recorded_tensor):
        reason = at_recording(func, inputs, is_cuda_graph_recorded_tensor)
        if reason is not None:
            indices = [i for i in func.mutated_input_idxs if i not in func.static_input_idxs and not is_cuda_graph_recorded_tensor(inputs[i])]
            report([f"{i} ({tuple(inputs[i].shape)}, {inputs[i].dtype})" for i in indices])
        return reason

    cudagraph_utils.check_for_mutation_ignore_cuda_graph_managed_tensor = compiled
    cudagraph_trees.check_for_mutation = recorded


def compile_counts() -> dict[str, int]:
    """What compiling did so far: graphs traced, graph breaks, CUDA graphs recorded and skipped (the timed call should
    add none of these)."""
    return {"graphs_traced": counters["stats"]["unique_graphs"], "graph_breaks": counters["graph_break"].total(),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"], "cudagraph_recordings": counters["inductor"]["cudagraph_recordings"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--mixers", default="qwen3_5", help="random students, MIXER or MIXER:key=value:..., comma-separated")
    parser.add_argument("--students", default="", help="saved students (folders), comma-separated, instead of --mixers")
    parser.add_argument("--teacher", default=None, help="the saved students' teacher (id, folder or .gguf); default: the "
                        "first student under teacher_mode")
    parser.add_argument("--caches", default=",".join(CACHES), help="dynamic, static or both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="2048,16384")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate() calls per row; the fastest decode is kept")
    parser.add_argument("--fresh-lengths", action="store_true", help="time each generate() at a prompt length that "
                        "neither the warm-up nor another timed call used (dynamic cache only), as a user's new prompt "
                        "meets SDPA's cuDNN graphs unbuilt; the prefill is still timed at the context")
    parser.add_argument("--kept-teacher", action="store_true", help="also time --teacher converted with every layer kept "
                        "(\"teacher_kept\"): the teacher's logits under a converted model's decode backends")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="generate() prefills in chunks of N tokens "
                        "(transformers' prefill_chunk_size; with a static cache on CUDA it runs them through its compiled "
                        "forward): generate_prefill_tokens_per_s is the prompt over the first token's time")
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="memory bandwidth in bytes/s for the floor")
    parser.add_argument("--out", default=None)
    parser.add_argument("--trace", default=None, help="folder: after each timed generate(), profile it (torch.profiler) and "
                        "add per token the wall and GPU kernel milliseconds and the kernels run to the row (\"trace\"), "
                        "the costliest ops into FOLDER/MODEL-CONTEXT-CACHE.txt; and one prefill (\"prefill_trace\", "
                        "its costliest ops with their modules into FOLDER/MODEL-CONTEXT-CACHE-prefill.txt)")
    parser.add_argument("--profile", default=None, help="cProfile the whole run into this file (pstats) and print its 40 "
                        "costliest calls, also when `timeout` stops the run (SIGTERM): where a slow compile spends its time")
    args = parser.parse_args()
    if not args.profile:
        return run(args)
    profiler = cProfile.Profile()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(124))
    profiler.enable()
    try:
        run(args)
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(40)


def emit(row: dict, device: torch.device, out) -> None:
    """One JSON line, with the device's name, on stdout and in `out` (an open file, or None), flushed as it is measured."""
    line = json.dumps({**row, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    print(line, flush=True)
    if out:
        out.write(line + "\n")
        out.flush()


def run(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        count_recordings()
        name_skipped_mutations()
    caches = args.caches.split(",")
    if not set(caches) <= set(CACHES):
        raise SystemExit(f"--caches takes {' or '.join(CACHES)}, got {args.caches!r}")
    if args.fresh_lengths and caches != ["dynamic"]:
        raise SystemExit("--fresh-lengths needs --caches dynamic: a static cache sized to each new length compiles again")
    if args.kept_teacher and not args.teacher:
        raise SystemExit("--kept-teacher needs --teacher: the teacher to convert with every layer kept")
    if args.students:
        models = {path: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval() for path in args.students.split(",")}
    else:
        models = random_students(args.shape, args.mixers.split(","), dtype)
    models = {name: model.to(device) for name, model in models.items()}
    if "qwen3_5" in models:
        models["native_qwen3_5"] = build_native(models["qwen3_5"])
    first = next(iter(models.values()))
    teacher = linearize.load_teacher(args.teacher, dtype=dtype)[0].to(device).eval() if args.teacher else None
    # A second copy: convert changes the model it is given.
    kept = linearize.convert(linearize.load_teacher(args.teacher, dtype=dtype)[0], "attention").to(device).eval() if args.kept_teacher else None
    out = open(args.out, "a") if args.out else None
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)

    def trace(name: str, context: int, cache: str) -> Path | None:
        return Path(args.trace) / f"{Path(name).name.replace(':', '_').replace('=', '')}-{context}-{cache}.txt" if args.trace else None

    for context in (int(n) for n in args.lengths.split(",")):
        for cache in caches:

            def timed(model, name: str) -> dict:
                return measure(model, context, args.new_tokens, cache, device, args.bandwidth, trace(name, context, cache), args.repeats,
                               args.fresh_lengths, args.prefill_chunk)

            def emitted(name: str, row: dict) -> None:  # as soon as measured: a run cut short keeps every model it finished
                emit({"model": name, "shape": None if args.students else args.shape, "dtype": args.dtype, **row}, device, out)

            # The teacher first: a run cut short keeps the baseline of every student it measured.
            if teacher is not None:
                emitted("teacher", timed(teacher, "teacher"))
            else:
                with linearize.teacher_mode(first):
                    emitted("teacher", timed(first, "teacher"))
            if kept is not None:
                emitted("teacher_kept", timed(kept, "teacher_kept"))
            for name, model in models.items():
                emitted(name, timed(model, name))


if __name__ == "__main__":
    main()
