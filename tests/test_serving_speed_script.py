"""benchmarks/serving_speed.py's trace: a decode step's cost per token from two profiled generate() calls."""

import importlib.util

import torch

import linearize
from tests.conftest import REPO_ROOT
from tests.tiny import tiny_model

_SPEC = importlib.util.spec_from_file_location("serving_speed", REPO_ROOT / "benchmarks" / "serving_speed.py")
serving_speed = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(serving_speed)


def test_a_traced_decode_reports_its_cost_per_token_and_its_costliest_ops(tmp_path):
    model = linearize.convert(tiny_model(), "gated_deltanet", window=4).eval()
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    settings = dict(input_ids=ids, do_sample=False, cache_implementation="static")
    cost = serving_speed.traced(model, settings, 3, torch.device("cpu"), tmp_path / "trace.txt")
    assert set(cost) == {"wall_ms_per_token", "kernels_per_token", "kernel_ms_per_token", "graph_launches_per_token"}
    assert cost["wall_ms_per_token"] > 0 and cost["kernels_per_token"] == 0  # no GPU here: no kernels
    table = (tmp_path / "trace.txt").read_text()
    assert "Self CPU" in table and "aten::" in table


def test_a_traced_prefill_reports_its_time_and_its_costliest_ops_by_caller(tmp_path):
    model = linearize.convert(tiny_model(), "gated_deltanet", window=4).eval()
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    cost = serving_speed.traced_prefill(model, ids, torch.device("cpu"), tmp_path / "prefill.txt")
    assert set(cost) == {"wall_ms", "kernels", "kernel_ms"}
    assert cost["wall_ms"] > 0 and cost["kernels"] == 0  # no GPU here: no kernels
    table = (tmp_path / "prefill.txt").read_text()
    assert "Self CPU" in table and "aten::" in table and "mixer_gated_deltanet.py" in table
