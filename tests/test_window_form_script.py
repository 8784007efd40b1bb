"""benchmarks/window_form.py: the working tree's chunked window form timed beside another revision's, in one run."""

import json

from tests.tiny import benchmark_script, run_as_script, run_main


def test_both_versions_are_timed_and_compared(tmp_path):
    out = tmp_path / "window_form.json"
    done = run_main(benchmark_script("window_form"), "--against", "HEAD", "--batch", "1", "--length", "40", "--window", "8", "--rounds", "1", "--repeats", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["ms"]) == {"then", "now"} and all(row["calls"] == 2 and row["min"] > 0 for row in result["ms"].values())
    assert result["now_over_then"]["min"] == round(result["ms"]["now"]["min"] / result["ms"]["then"]["min"], 3)


def test_an_unknown_revision_is_one_line_naming_the_fix(tmp_path):
    done = run_as_script("window_form", "--against", "no-such-revision", "--out", str(tmp_path / "x.json"))
    assert done.returncode != 0 and "pass a commit of this repository" in done.stderr and len(done.stderr.strip().splitlines()) == 1
