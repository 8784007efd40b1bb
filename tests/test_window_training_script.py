"""benchmarks/window_training.py: hedgehog_swa's training forward and backward in each form, checked against float32."""

import json

from tests.tiny import benchmark_script, run_main

SCRIPT = benchmark_script("window_training")


def test_every_form_is_timed_and_checked_against_float32(tmp_path):
    out = tmp_path / "window_training.json"
    done = run_main(SCRIPT, "--device", "cpu", "--arch", "tiny", "--batch", "2", "--length", "37", "--window", "8",
                    "--forms", "torch:4,torch:16", "--compile", "off", "--repeats", "1", "--warmup", "0", "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [row["form"] for row in result["rows"]] == ["torch:4", "torch:16"]
    for row in result["rows"]:
        assert set(row["differences"]) == {"out", "d_q", "d_k", "d_v", "d_fq", "d_fk", "d_share"}
        # bf16 autocast against float32: a few bf16 roundings, not a wrong form.
        assert 0 < row["max_difference"] < 5e-2, row
        assert row["ms"] > 0


def test_a_bad_form_is_one_line_naming_the_forms(tmp_path):
    done = run_main(SCRIPT, "--device", "cpu", "--forms", "torch:x", "--out", tmp_path / "x.json")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "--forms takes torch:C (C a positive chunk length) or kernel, got 'torch:x'"
