"""benchmarks/serving_speed.py's trace: a decode step's cost per token from two profiled generate() calls; its timed calls
at prompt lengths the warm-up did not reach (`--fresh-lengths`)."""

import json
from pathlib import Path

import pytest
import torch

import linearize
from tests.tiny import benchmark_script, tiny_model, tiny_tokenizer

serving_speed = benchmark_script("serving_speed")


def test_a_traced_decode_reports_its_cost_per_token_and_its_costliest_ops(tmp_path):
    model = linearize.convert(tiny_model(), "gated_deltanet", window=4).eval()
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    settings = dict(input_ids=ids, do_sample=False, cache_implementation="static")
    cost = serving_speed.traced(model, settings, 3, torch.device("cpu"), tmp_path / "trace.txt")
    assert set(cost) == {"wall_ms_per_token", "kernels_per_token", "kernel_ms_per_token", "graph_launches_per_token", "first_token"}
    assert cost["wall_ms_per_token"] > 0 and cost["kernels_per_token"] == 0  # no GPU here: no kernels
    assert cost["first_token"]["wall_ms"] > 0 and cost["first_token"]["kernels"] == 0
    table = (tmp_path / "trace.txt").read_text()
    assert "Self CPU" in table and "aten::" in table


def profiler_records_stacks() -> bool:
    """Whether torch.profiler groups ops by their Python callers here, as the traced prefill's table does."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        torch.ones(64, 64).add(1)
    return any(Path(__file__).name in event.name for event in prof.events())


def test_a_traced_prefill_reports_its_time_and_its_costliest_ops_by_caller(tmp_path):
    if not profiler_records_stacks():  # seen with torch 2.11's CUDA build on a machine without a GPU
        pytest.skip("this torch build's profiler records no Python stacks on this machine")
    model = linearize.convert(tiny_model(), "gated_deltanet", window=4).eval()
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    cost = serving_speed.traced_prefill(model, ids, torch.device("cpu"), tmp_path / "prefill.txt")
    assert set(cost) == {"wall_ms", "kernels", "kernel_ms"}
    assert cost["wall_ms"] > 0 and cost["kernels"] == 0  # no GPU here: no kernels
    table = (tmp_path / "prefill.txt").read_text()
    assert "Self CPU" in table and "aten::" in table and "mixer_gated_deltanet.py" in table


def test_a_cuda_graph_skip_names_the_inputs_behind_it(monkeypatch, capsys):
    """Both of inductor's checks print each input a graph writes without a static address, with its shape and dtype."""
    from torch._inductor import cudagraph_trees, cudagraph_utils

    monkeypatch.setattr(cudagraph_utils, "check_for_mutation_ignore_cuda_graph_managed_tensor", cudagraph_utils.check_for_mutation_ignore_cuda_graph_managed_tensor)
    monkeypatch.setattr(cudagraph_trees, "check_for_mutation", cudagraph_trees.check_for_mutation)
    serving_speed.name_skipped_mutations()

    def step(state, mask):
        state.add_(1)
        return mask * 2

    graph = torch.fx.symbolic_trace(step)
    for node, value in zip(graph.graph.find_nodes(op="placeholder"), (torch.zeros(2, 3), torch.zeros(4, dtype=torch.bool))):
        node.meta["val"] = value
    assert cudagraph_utils.check_for_mutation_ignore_cuda_graph_managed_tensor(graph, {"state"}, [0], [1]) is not None
    assert cudagraph_utils.check_for_mutation_ignore_cuda_graph_managed_tensor(graph, {"state"}, [0], [0, 1]) is None

    class Recorded:  # what a CUDA-graph tree checks: the inputs it writes, those that are static, their placeholders
        mutated_input_idxs, static_input_idxs = [0, 1], [0]
        placeholders = cudagraph_utils.get_placeholder_info(graph.graph)

    assert cudagraph_trees.check_for_mutation(Recorded, [torch.zeros(2, 3), torch.zeros(5, dtype=torch.bool)], lambda t: False) is not None
    printed = capsys.readouterr().err.splitlines()
    assert printed == [
        "cudagraphs skipped: input 0 (state, (2, 3), torch.float32) is mutated without a static address",
        "cudagraphs skipped: input 1 ((5,), torch.bool) is mutated without a static address",
    ]


def test_the_decode_rate_is_read_inside_generate_from_each_tokens_time(monkeypatch):
    """measure() reads the decode rate from the times of the new tokens inside each timed generate(), so the prefill
    and the first token are not in it, and keeps the fastest of `repeats` calls; the static cache keeps its size (no
    new compile). Nothing runs with autograd on. On a clock that each prefill moves 1 s and each decode step 10 ms
    (20 ms in the second timed call), 3 new tokens decode at exactly 100 tokens/s."""
    model = linearize.convert(tiny_model(dtype=torch.float32), "gated_deltanet", window=4).eval()
    steps, grad, clock = [], [], [0.0]
    forward = model.forward

    def timed(*args, **kwargs):
        steps.append(kwargs["input_ids"].shape[1])
        grad.append(torch.is_grad_enabled())
        slow = steps.count(24) == 5  # the second timed generate()
        clock[0] += 1.0 if steps[-1] > 1 else (0.02 if slow else 0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", timed)
    monkeypatch.setattr(serving_speed.time, "perf_counter", lambda: clock[0])
    row = serving_speed.measure(model, 24, 3, "static", torch.device("cpu"), 1e9, repeats=3)
    # warm-up: one uncached prefill and two generate() calls; then the timed prefill, three timed generate() calls, and
    # the prefill whose state the floor counts
    assert steps == [24] + [24, 1, 1, 1] * 2 + [24] + [24, 1, 1, 1] * 3 + [24]
    assert row["decode_tokens_per_s"] == pytest.approx(100.0)
    assert row["decode_step_ms_median"] == pytest.approx(10.0)
    assert row["first_token_seconds"] == pytest.approx(1.0) and row["generate_seconds"] == pytest.approx(1.03)
    assert not any(grad)  # an uncached prefill with autograd on would keep every activation (its peak memory, its time)


def test_a_chunked_prefill_is_timed_inside_generate(monkeypatch):
    """With `--prefill-chunk` every generate() prefills in chunks (transformers' prefill_chunk_size) and the row reads
    the prompt over the first token's time: on a clock that each chunk moves 1 s, a 24-token prompt in chunks of 10,
    10 and 4 comes in at 8 tokens/s; the eager prefill is still one forward."""
    model = linearize.convert(tiny_model(dtype=torch.float32), "gated_deltanet", window=4).eval()
    steps, clock = [], [0.0]
    forward = model.forward

    def timed(*args, **kwargs):
        steps.append(kwargs["input_ids"].shape[1])
        clock[0] += 1.0 if steps[-1] > 1 else 0.01
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", timed)
    monkeypatch.setattr(serving_speed.time, "perf_counter", lambda: clock[0])
    row = serving_speed.measure(model, 24, 3, "static", torch.device("cpu"), 1e9, repeats=1, prefill_chunk=10)
    assert steps == [24] + [10, 10, 4, 1, 1, 1] * 2 + [24] + [10, 10, 4, 1, 1, 1] + [24]
    assert row["prefill_chunk"] == 10 and row["first_token_seconds"] == pytest.approx(3.0)
    assert row["generate_prefill_tokens_per_s"] == pytest.approx(8.0) and row["prefill_tokens_per_s"] == pytest.approx(24.0)


def test_fresh_lengths_time_every_call_at_key_lengths_not_reached_before(tmp_path):
    """cuDNN keeps a graph per key length: with fresh lengths no timed generate() (nor the trace) decodes at a key
    length that the warm-up or an earlier call reached; without, every call repeats the warm-up's prompt."""
    model = linearize.convert(tiny_model(), "gated_deltanet", window=4).eval()
    prompts = []
    generate = model.generate
    model.generate = lambda **settings: prompts.append(settings["input_ids"].shape[1]) or generate(**settings)
    new_tokens = 3
    row = serving_speed.measure(model, 24, new_tokens, "dynamic", torch.device("cpu"), 4.8e12, tmp_path / "t.txt", repeats=2, fresh=True)
    assert prompts[0] == 24 and row["timed_prompt_lengths"] == prompts[1:3] == [40, 56] and prompts[3:] == [72, 72]
    reached = set()
    for prompt in prompts[:3] + prompts[4:]:  # the warm-up, the timed calls, the trace's longer call
        keys = set(range(prompt, prompt + new_tokens + 2))
        assert not keys & reached and prompt % 16 == 24 % 16
        reached |= keys
    prompts.clear()
    row = serving_speed.measure(model, 24, new_tokens, "dynamic", torch.device("cpu"), 4.8e12, repeats=2)
    assert prompts == [24, 24, 24] and row["timed_prompt_lengths"] == [24, 24]


def test_fresh_lengths_refuse_a_static_cache(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["serving_speed.py", "--device", "cpu", "--shape", "tiny", "--mixers", "gla", "--fresh-lengths"])
    with pytest.raises(SystemExit, match="--fresh-lengths needs --caches dynamic"):
        serving_speed.main()


def test_the_kept_teacher_is_timed_beside_the_teacher_with_the_teachers_logits(tmp_path, monkeypatch):
    """--kept-teacher adds the teacher converted with every layer kept: a linearize model whose logits are the
    teacher's, timed after it, so one run separates the decode backends' share of a speed-up from the mixers'."""
    teacher = tiny_model(dtype=torch.float32)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    linearize.convert(tiny_model(dtype=torch.float32), "gated_deltanet", window=4).save_pretrained(tmp_path / "student")
    timed = {}

    def measure(model, context, *args):
        timed[model] = context
        return {"decode_tokens_per_s": 1.0}

    monkeypatch.setattr(serving_speed, "measure", measure)
    monkeypatch.setattr("sys.argv", [
        "serving_speed.py", "--device", "cpu", "--dtype", "float32", "--students", str(tmp_path / "student"), "--teacher",
        str(tmp_path / "teacher"), "--kept-teacher", "--caches", "dynamic", "--lengths", "24", "--out", str(tmp_path / "rows.jsonl"),
    ])
    serving_speed.main()
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [row["model"] for row in rows] == ["teacher", "teacher_kept", str(tmp_path / "student")]
    plain, kept, student = timed
    assert type(plain).__name__ == "LlamaForCausalLM" and type(kept).__name__ == "LinearizedForCausalLM"
    assert set(kept.config.plan.mixer_names()) == {"attention"}
    ids = torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, teacher(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_kept_teacher_needs_a_teacher(monkeypatch):
    monkeypatch.setattr("sys.argv", ["serving_speed.py", "--device", "cpu", "--shape", "tiny", "--mixers", "gla", "--kept-teacher"])
    with pytest.raises(SystemExit, match="--kept-teacher needs --teacher"):
        serving_speed.main()


def test_warm_up_goes_on_until_a_call_compiles_and_records_nothing(monkeypatch):
    """A static cache warms up with two generate() calls at least, and more while a call still compiles or records a CUDA
    graph (here the second and third record one): the timed calls then add none; at most WARMUPS warm-up calls."""
    model = linearize.convert(tiny_model(dtype=torch.float32), "gated_deltanet", window=4).eval()
    generates = []
    generate = model.generate

    def counted(*args, **kwargs):
        generates.append(kwargs["input_ids"].shape[1])
        if len(generates) in (2, 3):
            serving_speed.counters["inductor"]["cudagraph_recordings"] += 1
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    serving_speed.counters.clear()
    row = serving_speed.measure(model, 24, 3, "static", torch.device("cpu"), 1e9, repeats=2)
    assert len(generates) == 4 + 2 and row["timed_call"]["cudagraph_recordings"] == 0
    generates.clear()
    serving_speed.counters.clear()
    monkeypatch.setattr(serving_speed, "WARMUPS", 2)
    row = serving_speed.measure(model, 24, 3, "static", torch.device("cpu"), 1e9, repeats=2)
    assert len(generates) == 2 + 2 and row["timed_call"]["cudagraph_recordings"] == 1
