"""Hedgehog's feature maps over a prefill in one Triton kernel (triton_features.py) against the PyTorch path of
`HedgehogFeatureMap`, on the CPU through Triton's interpreter: awkward lengths, feature widths below the head dimension
and none a power of two, strided inputs, float32, bfloat16 and float16; tiny hedgehog and hedgehog_swa models'
generation through it; and where it is left to PyTorch. test_kernels_compile.py compiles it for sm_90; test_gpu.py
checks it on CUDA."""

import pytest
import torch

import linearize
from linearize import LinearizeError
from linearize.hf import mixer_hedgehog, triton_features
from linearize.hf.mixer_hedgehog import HedgehogFeatureMap
from tests.conftest import REPO_ROOT
from tests.test_triton_step import assert_close, generation_through_a_prefill_kernel, kernel_calls, left_to_pytorch_when_off_or_float64
from tests.test_triton_window import needs_triton
from tests.tiny import random_ids, run_python, tiny_model

CASES = [  # length, heads, head dim, feature width, dtype
    (1, 2, 16, 16, torch.float32), (37, 3, 16, 12, torch.bfloat16), (70, 9, 24, 24, torch.float16), (130, 3, 8, 20, torch.float32),
]


@pytest.fixture
def fused(monkeypatch):
    """Feature maps take the kernel (CPU tensors through the interpreter); returns the list of the shapes it mapped."""
    return kernel_calls(monkeypatch, mixer_hedgehog, "feature_maps", lambda args, out: tuple(args[0].shape))


def trained_map(heads: int, dim: int, features: int, dtype: torch.dtype, seed: int) -> HedgehogFeatureMap:
    """A feature map away from its identity start, in `dtype`, with no gradients (as served)."""
    generator = torch.Generator().manual_seed(seed)
    feature_map = HedgehogFeatureMap(heads, dim, features)
    with torch.no_grad():
        feature_map.weight.add_(torch.randn(feature_map.weight.shape, generator=generator))
        feature_map.bias.add_(torch.randn(feature_map.bias.shape, generator=generator))
    return feature_map.to(dtype).requires_grad_(False)


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("length,heads,dim,features,dtype", CASES)
def test_the_kernel_equals_the_pytorch_path(fused, monkeypatch, length, heads, dim, features, dtype):
    """x as a projection leaves it ((B, T, H, D) seen as (B, H, T, D): strided) through the kernel equals the PyTorch
    path's map, in float32, where the lengths are no multiple of the kernel's block and the widths no power of two."""
    feature_map = trained_map(heads, dim, features, dtype, length)
    x = torch.randn(2, length, heads, dim, generator=torch.Generator().manual_seed(1)).to(dtype).transpose(1, 2) * 3
    with torch.no_grad():
        got = feature_map(x)
        assert fused == [(2, heads, length, dim)]
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
        expected = feature_map(x)
    assert len(fused) == 1
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape == (2, heads, length, 2 * features)
    # float32 both ways, but not the same exp: torch's vectorised one differs by the CPU's instruction set (a 2-core AMD
    # EPYC with AVX2 put the float16 case 2.0e-6 apart, AVX-512 machines under 1e-6); a wrong map is off by its size.
    assert_close(got, expected, "feature map", 5e-6)


@pytest.mark.core
@needs_triton
def test_the_custom_op_computes_what_the_eager_launch_does():
    feature_map = trained_map(3, 16, 12, torch.bfloat16, 0)
    x = torch.randn(2, 3, 20, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    weight, bias = feature_map.weight, feature_map.bias
    assert torch.equal(triton_features.OP(x, weight, bias), triton_features.feature_maps(x, weight, bias))


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("mixer,options", [("hedgehog", {}), ("hedgehog_swa", {"window": 4, "linear_rope": False})])
def test_generation_through_the_kernel_equals_uncached_and_the_pytorch_path(fused, monkeypatch, mixer, options):
    """A tiny two-layer model, left-padded batch: the prompt's feature maps through the kernel (q's and k's in each
    layer), then cached greedy generation, give the PyTorch path's logits and uncached generation's tokens."""
    model = linearize.convert(tiny_model(dtype=torch.float32, num_hidden_layers=2), mixer, **options).requires_grad_(False)
    first = generation_through_a_prefill_kernel(model, fused, monkeypatch)
    assert first[:4] == [(2, 4, 7, 16), (2, 2, 7, 16)] * 2  # each layer's prompt: q's heads, then k's


@pytest.mark.core
@needs_triton
def test_the_feature_map_is_left_to_pytorch_where_it_cannot_run(fused, monkeypatch):
    """Under LINEARIZE_KERNELS=torch or LINEARIZE_FUSED_STEP=off, in float64, or with gradients on (training: autograd
    through the PyTorch path), a prefill maps its features in PyTorch; the problems say so in one line."""
    model = linearize.convert(tiny_model(dtype=torch.float32), "hedgehog")
    ids = random_ids(1, 5)
    left_to_pytorch_when_off_or_float64(monkeypatch, model, ids, fused)
    maps = 2 * model.config.text_config.num_hidden_layers
    assert len(fused) == maps
    model(ids)  # gradients on
    assert len(fused) == maps
    x, weight, bias = torch.zeros(1, 2, 5, 8), torch.zeros(2, 8, 8, requires_grad=True), torch.zeros(2, 1, 8)
    assert triton_features.feature_map_problem(x, weight, bias).startswith("gradients are on")
    with torch.no_grad():
        assert "got torch.float64, torch.float32" in triton_features.feature_map_problem(x.double(), weight, bias)
        assert "up to 128" in triton_features.feature_map_problem(torch.zeros(1, 2, 5, 160), weight, bias)
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "auto")
        assert "runs on CUDA tensors" in triton_features.feature_map_problem(x, weight, bias)
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "yes")
        with pytest.raises(LinearizeError, match="LINEARIZE_FUSED_STEP='yes' is not one of auto, on, off; unset it") as info:
            triton_features.feature_map_problem(x, weight, bias)
    assert "\n" not in str(info.value)


@pytest.mark.core
@needs_triton
def test_every_kernel_module_registers_ops_of_its_own_names():
    """Each custom op of linearize's kernels has a name of its own: two modules' launch functions of one name
    (triton_conv's and triton_features' `_launch`) once registered one op, and the later module's launch took the
    other's calls."""
    from linearize.hf import triton_conv, triton_rope, triton_step, triton_window

    ops = [
        *triton_step.OPS.values(), triton_window.OP, triton_window.TRAIN_OP, triton_window.BACKWARD_OP, triton_window.PREFIX_OP,
        triton_conv.OP, triton_features.OP, triton_rope.OP,
    ]
    names = [op._name for op in ops]
    assert len(set(names)) == len(names), names


@needs_triton
def test_the_suites_setup_runs_the_kernels_in_the_interpreter_in_one_process(monkeypatch):
    """conftest switches Triton's interpreter on before anything imports Triton (inductor's config does; Triton's own
    jitted helpers, as the softmax's reductions call them, are interpreted only if it was on when Triton was imported):
    in a fresh process without TRITON_INTERPRET, as `pytest -p no:xdist` starts, the kernel runs after conftest, its
    helpers' calls through conftest's shortcut (`_interpret_device_calls_without_patching`), and equals PyTorch."""
    code = (
        "import os, torch; import tests.conftest; from linearize.hf import triton_features\n"
        "os.environ['LINEARIZE_FUSED_STEP'] = 'on'\n"
        "x, weight, bias = torch.randn(1, 2, 5, 8), torch.randn(2, 8, 4), torch.randn(2, 1, 4)\n"
        "assert triton_features.feature_map_problem(x, weight, bias) is None\n"
        "y = x @ weight + bias\n"
        "expected = torch.cat((y.softmax(-1), (-y).softmax(-1)), -1)\n"
        "torch.testing.assert_close(triton_features.feature_maps(x, weight, bias), expected)\n"
    )
    monkeypatch.delenv("TRITON_INTERPRET")
    run_python(code, cwd=REPO_ROOT, hide_linearize=False)
