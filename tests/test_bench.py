"""`linearize bench` on tiny random models: the largest batch that fits, prefill and decode peaks apart, the decode
path `--compile` picks, and the report's figures of them. CPU; the CUDA paths themselves are the `gpu` test at the end."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext

import matplotlib.image
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import linearize
from linearize import cli
from linearize.evaluate import speed
from linearize.evaluate.results import ModelEntry, Results, load_results
from linearize.evaluate.scored import scored_models
from linearize.evaluate.speed import benchmark, fastest_path, largest_batch
from linearize.hf.errors import LinearizeError
from linearize.hf.mixers import mixers_in
from linearize.report import write_report
from tests.conftest import wide_console
from tests.tiny import tiny_model, tiny_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEACHER, STUDENT = "teacher of tiny", "tiny"


def tiny_student(**convert):
    model = tiny_model("llama", dtype=torch.float32, vocab_size=128, max_position_embeddings=2048)
    return linearize.convert(model, "hedgehog", **convert)


@pytest.fixture
def student():
    return tiny_student()


def as_teacher(model) -> bool:
    """Whether `model` is running as its own teacher (inside teacher_mode) right now."""
    return mixers_in(model)[0].teacher


def out_of_memory_above(monkeypatch, limit, teacher_only: bool = False) -> list[tuple[bool, int]]:
    """Make every measurement of a batch above `limit` run out of memory (only the teacher view's with
    `teacher_only`), as a GPU would; return the (teacher view, batch) of every measurement tried."""
    tried = []
    real = speed.measure

    def measure(model, context, batch, *args, **kwargs):
        tried.append((as_teacher(model), batch))
        if batch > limit and (as_teacher(model) or not teacher_only):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, context, batch, *args, **kwargs)

    monkeypatch.setattr(speed, "measure", measure)
    return tried


@pytest.mark.parametrize(
    "start, cap, fits_up_to, bisect, batch, limited_by, tried",
    [
        (1, 16, 100, True, 16, "cap", [1, 2, 4, 8, 16]),
        (1, 12, 100, True, 12, "cap", [1, 2, 4, 8, 12]),  # the cap itself is tried, not only powers of two
        (1, 64, 5, True, 5, "memory", [1, 2, 4, 8, 6, 5]),
        (1, 64, 5, False, 4, "memory", [1, 2, 4, 8]),
        (8, 64, 3, True, 3, "memory", [8, 4, 2, 3]),  # the start does not fit: halve, then bisect
        (4, 2, 100, True, 2, "cap", [2]),  # a cap below the start
    ],
)
def test_largest_batch_search(start, cap, fits_up_to, bisect, batch, limited_by, tried):
    attempts = []

    def attempt(b):
        attempts.append(b)
        return {"batch": b, "out_of_memory": True} if b > fits_up_to else {"batch": b, "decode_tokens_per_s": 10.0 * b}

    row = largest_batch(attempt, start, cap, bisect)
    assert (row["batch"], row["limited_by"], row["largest_batch"]) == (batch, limited_by, True)
    assert row["decode_tokens_per_s"] == 10.0 * batch and attempts == tried


def test_largest_batch_when_nothing_fits_is_the_out_of_memory_row_of_batch_one():
    row = largest_batch(lambda b: {"batch": b, "out_of_memory": True}, 4, 64)
    assert row == {"batch": 1, "out_of_memory": True, "largest_batch": True}


def test_max_batch_picks_the_cap_for_teacher_and_student_when_nothing_runs_out_of_memory(student):
    results = benchmark(student, name=STUDENT, lengths=[16, 48], decode_tokens=2, max_batch=4, progress=False)
    rows = results.of("speed")
    grid = [r for r in rows if not r.get("largest_batch")]
    largest = {(r["model"], r["context"]): r for r in rows if r.get("largest_batch")}
    assert sorted((r["model"], r["context"], r["batch"]) for r in grid) == [(TEACHER, 16, 1), (TEACHER, 48, 1), (STUDENT, 16, 1), (STUDENT, 48, 1)]
    assert set(largest) == {(m, c) for m in (TEACHER, STUDENT) for c in (16, 48)}
    for row in largest.values():
        assert row["batch"] == 4 and row["limited_by"] == "cap" and row["decode_tokens_per_s"] > 0 and row["decode_path"] == "eager"
    # The teacher's keys and values grow with batch and context; the student's state only with batch.
    assert largest[(TEACHER, 48)]["cache_bytes"] > largest[(TEACHER, 16)]["cache_bytes"]
    assert largest[(STUDENT, 48)]["cache_bytes"] == largest[(STUDENT, 16)]["cache_bytes"] == 4 * next(
        r["cache_bytes"] for r in grid if r["model"] == STUDENT
    )
    assert results.settings | {"max_batch": 4, "bisect": True, "compile": False} == results.settings


def test_max_batch_stops_where_memory_runs_out_and_frees_it_between_attempts(student, monkeypatch):
    tried = out_of_memory_above(monkeypatch, 5, teacher_only=True)
    freed = []
    monkeypatch.setattr(speed, "free_memory", lambda device: freed.append(device.type))
    results = benchmark(student, name=STUDENT, lengths=[16], decode_tokens=1, max_batch=16, progress=False)
    (teacher,) = [r for r in results.of("speed", TEACHER) if r.get("largest_batch")]
    (ours,) = [r for r in results.of("speed", STUDENT) if r.get("largest_batch")]
    assert (teacher["batch"], teacher["limited_by"], ours["batch"], ours["limited_by"]) == (5, "memory", 16, "cap")
    # After the warm-up and the batch-1 row, which the search takes rather than measure again.
    assert [b for view, b in tried if view][2:] == [2, 4, 8, 6, 5]
    # Memory is handed back after every attempt (the teacher's 6, the student's 5), and once more after each
    # out-of-memory one.
    assert len(freed) == 6 + 5 + 2 and set(freed) == {"cpu"}


def test_an_out_of_memory_row_at_a_batch_asked_for(student, monkeypatch):
    out_of_memory_above(monkeypatch, 1)
    results = benchmark(student, name=STUDENT, lengths=[16], batch_sizes=[1, 2], decode_tokens=1, teacher=False, progress=False)
    by_batch = {r["batch"]: r for r in results.of("speed")}
    assert by_batch[2] == {"model": STUDENT, "kind": "speed", "context": 16, "batch": 2, "decode_tokens": 1, "decode_path": "eager",
                           "prefill_chunk": None, "out_of_memory": True}
    assert by_batch[1]["decode_tokens_per_s"] > 0


def test_prefill_and_decode_peaks_are_recorded_apart(student, monkeypatch):
    class Meter:
        """Peaks that say which phase they were read in: the prefill's before `restart_peak`, the decode's after."""

        method = "test meter"

        def start(self):
            self.phase = "prefill"

        def restart_peak(self):
            self.phase = "decode"

        def peak(self):
            return {"prefill": 1000, "decode": 2000}[self.phase]

    monkeypatch.setattr(speed, "meter_for", lambda device: Meter())
    results = benchmark(student, lengths=[16], decode_tokens=2, max_batch=2, progress=False)
    for row in results.of("speed"):
        assert (row["prefill_peak_bytes"], row["decode_peak_bytes"], row["memory_method"]) == (1000, 2000, "test meter")


def test_real_peaks_on_this_machine(student):
    """Without a stand-in meter: both peaks are bytes (or None where the kernel's counters cannot be read)."""
    for row in benchmark(student, lengths=[64], decode_tokens=2, progress=False).of("speed"):
        for field in ("prefill_peak_bytes", "decode_peak_bytes"):
            assert row[field] is None or (isinstance(row[field], int) and row[field] >= 0)


def test_compile_decodes_through_torch_compile_on_a_cpu_and_records_it(student, monkeypatch):
    """On a CPU GraphDecoder refuses, so both views decode through torch.compile of the model (stood in here by a
    wrapper that counts the calls it serves: compiling for real takes minutes on two cores). The compiled forward
    serves the decode steps, two untimed warm-up steps among them, and never the prefill."""
    compiled = []

    def fake_compile(model, mode):
        assert mode == "default"

        def forward(**inputs):
            compiled.append(inputs["input_ids"].shape[1])
            return model(**inputs)

        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    results = benchmark(student, name=STUDENT, lengths=[16, 32], decode_tokens=3, compile=True, progress=False)
    rows = {(r["model"], r["context"]): r for r in results.of("speed")}
    assert {r["decode_path"] for r in rows.values()} == {"torch.compile"} and results.settings["compile"] is True
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows.values())
    # Per view: warm-up (2 warm + 2 timed steps), then per context 2 warm + 3 timed steps, all one token long.
    assert len(compiled) == 2 * (4 + 2 * 5) and set(compiled) == {1}
    assert rows[(TEACHER, 32)]["cache_bytes"] / rows[(TEACHER, 16)]["cache_bytes"] == pytest.approx((32 + 5) / (16 + 5))


def test_fastest_path_is_the_cuda_graph_only_for_a_converted_models_own_view(student, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, mode: model)
    teacher_view, student_view = scored_models(student, need_tokenizer=False)
    hybrid_teacher, hybrid = scored_models(tiny_student(keep_attention=[0]), need_tokenizer=False)
    # On a CPU GraphDecoder refuses every model; where it accepts (CUDA), it still refuses kept softmax layers.
    assert {fastest_path(item).name for item in (teacher_view, student_view, hybrid)} == {"torch.compile"}

    class Accepting:
        def __init__(self, model, warmup_steps):
            if any(entry.is_attention for entry in model.config.plan):
                raise LinearizeError("kept softmax layers")

    monkeypatch.setattr(speed, "GraphDecoder", Accepting)
    names = [fastest_path(item).name for item in (teacher_view, student_view, hybrid_teacher, hybrid)]
    assert names == ["torch.compile", "cuda_graph", "torch.compile", "torch.compile"]


def test_bad_max_batch_is_one_line_before_loading(tmp_path):
    with pytest.raises(LinearizeError, match="largest batch to try must be at least 1, got 0; pass e.g. --max-batch 512"):
        benchmark(str(tmp_path / "not-loaded"), max_batch=0, progress=False)
    with pytest.raises(LinearizeError, match="prefill chunk must be at least 1 token, got 0; pass e.g. --prefill-chunk 4096"):
        benchmark(str(tmp_path / "not-loaded"), prefill_chunk=0, progress=False)
    with pytest.raises(LinearizeError, match=r"unknown SDPA backend\(s\) \['fast'\]: name some of flash, efficient, cudnn, math"):
        benchmark(str(tmp_path / "not-loaded"), sdpa_backends=["flash", "fast"], progress=False)


class SdpaOps(TorchDispatchMode):
    """The SDPA kernels that ran: the CPU's fused one, or the math path's softmax."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("_scaled_dot_product_flash_attention_for_cpu", "_safe_softmax"):
            self.seen.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_sdpa_backends_order_every_models_attention_and_are_recorded(student):
    """The teacher view's softmax layers take the CPU's fused SDPA by torch's own choice, and the math path when
    sdpa_backends names it alone, in prefill and decode; the settings say which was asked."""
    runs = {}
    for backends in (None, ["math"]):
        with SdpaOps() as ops:
            results = benchmark(student, lengths=[20], decode_tokens=2, sdpa_backends=backends, name=STUDENT, progress=False)
        runs[None if backends is None else tuple(backends)] = ops.seen, results.settings["sdpa_backends"]
    assert runs == {None: ({"_scaled_dot_product_flash_attention_for_cpu"}, None), ("math",): ({"_safe_softmax"}, ["math"])}


def test_every_views_eager_decode_runs_under_decode_attention(student, monkeypatch):
    """The teacher view and the student decode their steps under the SDPA order converted models use in generate()
    (on CUDA: flash and efficient before cuDNN); the settings record that order on CUDA only."""
    steps = []
    monkeypatch.setattr(speed, "decode_attention", lambda device, length: steps.append((str(device), length)) or nullcontext())
    results = benchmark(student, lengths=[20], decode_tokens=2, name=STUDENT, progress=False)
    # per view: the warm-up's untimed step and its 2 steps, then the measured untimed step and 2 steps, one loop each
    assert steps == [("cpu", 1)] * 8
    assert results.settings["decode_sdpa"] is None
    assert speed.decode_sdpa_names(None) == ["flash", "efficient", "cudnn", "math"]
    assert speed.decode_sdpa_names(speed.sdpa_order(["math", "cudnn"])) == ["cudnn", "math"]


def test_a_chunked_prefill_goes_through_the_cache_chunk_by_chunk(student):
    """With prefill_chunk, each view's 20-token prompts go in as 8 + 8 + 4 tokens through one cache, which then holds
    what a one-shot prefill leaves (the same bytes); every row and the settings record the chunk."""
    calls = []
    student.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    chunked = benchmark(student, lengths=[20], batch_sizes=[2], decode_tokens=2, prefill_chunk=8, name=STUDENT, progress=False)
    # per view: the warm-up (a 16-token prefill, an untimed step, 2 steps), then the measured prefill in chunks, an
    # untimed step and 2 timed ones
    assert calls == [16, 1, 1, 1, 8, 8, 4, 1, 1, 1] * 2
    whole = benchmark(student, lengths=[20], batch_sizes=[2], decode_tokens=2, name=STUDENT, progress=False)
    assert chunked.settings["prefill_chunk"] == 8 and whole.settings["prefill_chunk"] is None
    rows = {(r["model"], r["prefill_chunk"]): r for r in chunked.of("speed") + whole.of("speed")}
    assert len(rows) == 4
    for model in (TEACHER, STUDENT):
        assert rows[(model, 8)]["cache_bytes"] == rows[(model, None)]["cache_bytes"] > 0


def bench_results() -> Results:
    """A teacher whose largest batch halves as its cache grows, and a student capped at 64 at every context."""
    results = Results(environment={"device": "cuda"}, settings={"max_batch": 64})
    results.add_model(ModelEntry(TEACHER, "teacher", source="tiny", via="teacher_mode"))
    results.add_model(ModelEntry(STUDENT, "student", source="tiny", teacher=TEACHER, mixers={"hedgehog": 3}))
    common = dict(decode_tokens=32, cache_bytes=1000, memory_method="cuda.max_memory_allocated")
    for context, teacher_batch in ((1024, 32), (4096, 8), (16384, 0)):
        for model, path, batch, decode in ((TEACHER, "torch.compile", teacher_batch, 100.0 * teacher_batch), (STUDENT, "cuda_graph", 64, 6400.0)):
            single = 100.0 * 1024 / context if model == TEACHER else 100.0
            figures = dict(prefill_tokens_per_s=50_000.0, decode_tokens_per_s=single, prefill_peak_bytes=context * 3 * 2**20,
                           decode_peak_bytes=context * 2**20)
            results.add(model, "speed", context=context, batch=1, decode_path=path, **common, **figures)
            if batch:
                limit = "cap" if model == STUDENT else "memory"
                results.add(model, "speed", context=context, batch=batch, decode_path=path, largest_batch=True, limited_by=limit,
                            **common, **figures | {"decode_tokens_per_s": decode})
            else:
                results.add(model, "speed", context=context, batch=1, decode_tokens=32, decode_path=path, out_of_memory=True, largest_batch=True)
    return results


def test_report_draws_the_largest_batch_and_both_peaks(tmp_path):
    report = write_report([bench_results().save(tmp_path / "bench.json")], tmp_path / "report")
    text = report.read_text()
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(numbers["figures"]) == {"speed", "memory", "largest_batch"}
    for name in numbers["figures"].values():
        assert f"]({name})" in text
        image = matplotlib.image.imread(tmp_path / "report" / name)
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG_SIGNATURE and image.shape[0] > 100 and image.shape[1] > 100
    assert "## Decode throughput at the largest batch" in text and "up to 64" in text
    assert "| teacher of tiny | 4096 | 8 | memory | torch.compile | 800.0 | 50,000 | 12.00 GiB | 4.00 GiB |" in text
    assert "| teacher of tiny | 16384 | none fits | – |" in text
    assert "| tiny | 16384 | 64 | cap | cuda_graph | 6,400 |" in text
    assert "| tiny | 4096 | 64 | 8 | 8.00 |" in text  # 6400 tok/s at batch 64 against the teacher's 800 at batch 8
    largest = numbers["speed"]["largest_batch"]
    assert largest[TEACHER]["batch"] == [32, 8, None] and largest[STUDENT]["limited_by"] == ["cap"] * 3
    # The batch-1 rows stay a series of their own: the largest-batch rows are not mixed into them.
    assert numbers["speed"]["series"][TEACHER]["1"]["context"] == [1024, 4096, 16384]
    assert numbers["speed"]["series"][TEACHER]["1"]["decode_path"] == ["torch.compile"] * 3


def test_a_report_of_an_older_bench_file_has_no_largest_batch_section(tmp_path):
    old = bench_results()
    old.records = [{k: v for k, v in r.items() if k != "decode_path"} for r in old.records if not r.get("largest_batch")]
    text = write_report([old], tmp_path).read_text()
    assert "largest batch" not in text.lower() and "| eager |" in text
    assert not (tmp_path / "largest_batch.png").exists()


def test_bench_command_with_max_batch_and_compile(student, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny"
    student.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # bench feeds random ids, but a folder loads with its tokenizer
    monkeypatch.setattr(torch, "compile", lambda model, mode: model)  # compiling for real takes minutes here

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["linearize", "bench", str(folder), *map(str, args)])
        wide_console(monkeypatch)
        with pytest.raises(SystemExit) as done:
            cli.main()
        return done.value.code, capsys.readouterr()

    out = tmp_path / "bench.json"
    code, printed = run("--lengths", "16", "--decode-tokens", "2", "--max-batch", "2", "--no-bisect", "--compile", "--prefill-chunk", "6", "--out", out)
    assert code in (0, None), printed.err
    results = load_results(out)
    assert results.settings["max_batch"] == 2 and results.settings["bisect"] is False and results.settings["prefill_chunk"] == 6
    assert {r["prefill_chunk"] for r in results.of("speed")} == {6}
    assert sorted((r["model"], r["batch"], bool(r.get("largest_batch")), r["decode_path"]) for r in results.of("speed")) == [
        ("teacher of tiny", 1, False, "torch.compile"), ("teacher of tiny", 2, True, "torch.compile"),
        ("tiny", 1, False, "torch.compile"), ("tiny", 2, True, "torch.compile"),
    ]
    assert "batch 2 (largest, cap) @ 16: prefill / torch.compile decode tok/s" in printed.out
    code, printed = run("--max-batch", "0")
    assert code == 2 and printed.err.strip().splitlines()[-1] == (
        "error: the largest batch to try must be at least 1, got 0; pass e.g. --max-batch 512"
    )
    code, printed = run("--prefill-chunk", "0")
    assert code == 2 and printed.err.strip().splitlines()[-1] == (
        "error: a prefill chunk must be at least 1 token, got 0; pass e.g. --prefill-chunk 4096"
    )
    code, printed = run("--sdpa", "flash,fused")
    assert code == 2 and printed.err.strip().splitlines()[-1] == (
        "error: unknown SDPA backend(s) ['fused']: name some of flash, efficient, cudnn, math by priority, e.g. --sdpa flash,efficient,math"
    )


def test_bench_keeps_the_models_measured_before_one_that_fails(student, tmp_path, monkeypatch, capsys):
    """The results file is written after each model: a later model that fails (here a folder that does not exist; on
    a GPU, a crashed kernel) leaves the earlier ones' rows in it."""
    folder = tmp_path / "tiny"
    student.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "bench.json"
    args = [str(folder), str(tmp_path / "missing"), "--lengths", "16", "--decode-tokens", "2", "--no-teacher", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["linearize", "bench", *args])
    wide_console(monkeypatch)
    with pytest.raises(SystemExit) as done:
        cli.main()
    printed = capsys.readouterr()
    assert done.value.code == 2 and "missing" in printed.err.strip().splitlines()[-1], printed.err
    assert [(r["model"], r["context"]) for r in load_results(out).of("speed")] == [("tiny", 16)]

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_paths_on_cuda():
    """The real fast paths: GraphDecoder's replayed step for the student, torch.compile for its teacher view and for
    a hybrid that keeps a softmax layer; and the largest-batch search with real allocations."""
    student = tiny_student().to("cuda")
    results = benchmark(student, name=STUDENT, device="cuda", lengths=[64, 256], decode_tokens=8, compile=True, max_batch=8, progress=False)
    paths = {r["model"]: r["decode_path"] for r in results.of("speed")}
    assert paths == {TEACHER: "torch.compile", STUDENT: "cuda_graph"}
    for row in results.of("speed"):
        assert row["decode_tokens_per_s"] > 0 and row["prefill_peak_bytes"] > 0 and row["decode_peak_bytes"] >= row["cache_bytes"] > 0
    hybrid = benchmark(tiny_student(keep_attention=[0]).to("cuda"), device="cuda", lengths=[64], decode_tokens=4, compile=True, teacher=False,
                       progress=False)
    assert {r["decode_path"] for r in hybrid.of("speed")} == {"torch.compile"}
