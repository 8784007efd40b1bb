"""benchmarks/prefill_parts.py: one converted layer's prefill timed part by part, beside the teacher's attention."""

import importlib.util
import json
import sys

from tests.conftest import REPO_ROOT

PARTS = {
    "projections", "short convolution", "L2 norm of q and k", "kv-head repeat", "gates",
    "gated delta rule (torch.float32 inputs to fla, as called)", "window and mix", "mixer, whole", "attention module, converted",
    "attention module, teacher",
}


def run_script(tmp_path, monkeypatch, *arguments: str) -> list[dict]:
    """The script's rows for `arguments` on the CPU in float32, one repeat, run as its main()."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # as when run as a script: it imports serving_speed
    spec = importlib.util.spec_from_file_location("prefill_parts", REPO_ROOT / "benchmarks" / "prefill_parts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "parts.jsonl"
    argv = ["prefill_parts.py", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--out", str(out), *arguments]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_every_part_is_timed_at_every_length(tmp_path, monkeypatch):
    rows = run_script(tmp_path, monkeypatch, "--lengths", "24,40", "--window", "8")
    assert {(r["length"], r["part"]) for r in rows} == {(n, part) for n in (24, 40) for part in PARTS}
    assert len(rows) == 2 * len(PARTS)  # --variants needs fla on CUDA: not here
    assert all(r["host_ms"] > 0 and r["device_ms"] == r["host_ms"] and r["device"] == "cpu" for r in rows)


def test_a_mixer_without_parts_or_a_window_is_timed_whole(tmp_path, monkeypatch):
    """bamba_mamba2 (no window option, no part-by-part timing): its mixer and module beside the teacher's."""
    rows = run_script(tmp_path, monkeypatch, "--mixer", "bamba_mamba2", "--lengths", "24")
    assert [r["part"] for r in rows] == ["mixer, whole, no cache", "attention module, converted, with a cache", "attention module, teacher"]
    assert all(r["length"] == 24 and r["host_ms"] > 0 for r in rows)
