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


def test_every_part_is_timed_at_every_length(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # as when run as a script: it imports serving_speed
    spec = importlib.util.spec_from_file_location("prefill_parts", REPO_ROOT / "benchmarks" / "prefill_parts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "parts.jsonl"
    argv = ["prefill_parts.py", "--device", "cpu", "--dtype", "float32", "--lengths", "24,40", "--window", "8", "--repeats", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["length"], r["part"]) for r in rows} == {(n, part) for n in (24, 40) for part in PARTS}
    assert len(rows) == 2 * len(PARTS)  # --variants needs fla on CUDA: not here
    assert all(r["host_ms"] > 0 and r["device_ms"] == r["host_ms"] and r["device"] == "cpu" for r in rows)
