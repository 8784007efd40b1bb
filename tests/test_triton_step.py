"""The fused decode steps of `gated_deltanet`, `qwen3_5_gdn`, `gla`, `mamba2`, `hedgehog` and `hedgehog_swa`
(triton_step.py) against the PyTorch decode path, on the CPU through Triton's interpreter: outputs and next states step
by step, the custom ops against the eager launches, and a whole model's cached generation (test_kernels_compile.py
compiles every kernel for a GPU). Skipped where Triton is not installed (it is in the `dev` extra). A compiled step is
traced through the ops' fake implementations (test_fused_step_traces.py); test_gpu.py compiles one on CUDA. The
interpreter is slow (about 0.1 s a program of a step), so the cases are few and small."""

import copy
import dataclasses
import importlib

import pytest
import torch

import linearize
from linearize import LinearizeError
from linearize.hf import triton_step
from linearize.hf.cache import MixerState
from linearize.hf.mixers import mixers_in
from tests.tiny import left_padded, random_ids, tiny_model

# The interpreter computes sigmoid with numpy's exp, which warns where it overflows to the right limit. In the `core`
# subset: the GPU machines run torch 2.11, the oldest declared version.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

needs_triton = pytest.mark.skipif(
    triton_step.TRITON_PROBLEM is not None or not triton_step.INTERPRETED,
    reason=f"runs Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, which conftest sets where there is no CUDA; on a "
    f"GPU, test_gpu.py checks the kernels): {triton_step.TRITON_PROBLEM or 'not interpreted'}",
)

# The mixers with a fused step; each calls `triton_step.<name>_step`, imported into its mixer's module, and so does
# hedgehog_swa with kept keys (a variant, `VARIANTS`).
MIXERS = sorted(triton_step.OPS)
STEPS = {**{name: f"{name}_step" for name in MIXERS}, "hedgehog_swa+keep": "hedgehog_swa_step"}


def mixer_module(name: str):
    """The module of mixer `name` (or of a variant's mixer, `VARIANTS`), which imports its step function."""
    return importlib.import_module(linearize.MIXERS[name.split("+")[0]].__module__)


def force_fused_step(monkeypatch) -> list:
    """The mixers take their decode steps through the fused step (on CPU tensors too, interpreted); returns the list
    of the fused calls' output shapes."""
    calls = []
    for name, step_name in STEPS.items():

        def counted(*args, function=getattr(triton_step, step_name)):
            out = function(*args)
            calls.append(out.shape)
            return out

        monkeypatch.setattr(mixer_module(name), step_name, counted)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "on")
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    return calls


@pytest.fixture
def fused(monkeypatch):
    return force_fused_step(monkeypatch)


# name: (family, config overrides, mixer options; a mixer takes those it has). SmolLM2's heads (9 query, 3 kv,
# head_dim 64); an awkward shape (head_dim 20, 3 query heads per kv head, window 5, 3 taps: nothing a power of two);
# gemma2 for the softcap (its sliding window, 6, narrows the window); GPT-NeoX for partial RoPE (4 of 16 dims) and one
# query head per kv head; no window at all. gla's gates decay faster than its default's (gate_normalizer 16).
SHAPES = {
    "smollm2": ("llama", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3), dict(window=8, gate_normalizer=4.0)),
    "awkward": (
        "llama", dict(hidden_size=60, num_attention_heads=6, num_key_value_heads=2, head_dim=20),
        dict(conv_size=3, window=5, gate_normalizer=2.0),
    ),
    "softcap": ("gemma2", {}, dict(window=8)),
    "partial_rope": ("gpt_neox", {}, dict(conv_size=2, window=4, gate_normalizer=4.0)),
    "no_window": ("llama", {}, dict(window=0, gate_normalizer=4.0)),
}


# A case named MIXER+VARIANT runs MIXER with these options besides the shape's: hedgehog_swa's decay, its feature
# maps reading q and k before RoPE, and its kept keys.
VARIANTS = {
    "hedgehog_swa+decay": {"decay": 0.9},
    "hedgehog_swa+linear_rope": {"linear_rope": False},
    "hedgehog_swa+keep": {"keep": 3, "keep_block": 4},
}


def randomised_mixer(mixer: str, shape: str, dtype: torch.dtype):
    """(model, first layer's mixer) whose new parameters are their start plus noise, so the convolution, gates, skip and
    share all matter and differ by head. A gate's projection of the hidden states (about 10 in size here) adds about 1
    to its input, so the gates stay near their start's range (mamba2's dt near 0.001, where softplus needs log1p).
    `mixer` may name a variant (`VARIANTS`)."""
    family, overrides, options = SHAPES[shape]
    name = mixer.split("+")[0]
    takes = {field.name for field in dataclasses.fields(linearize.MIXERS[name].Options)}
    options = {k: v for k, v in options.items() if k in takes} | VARIANTS.get(mixer, {})
    model = linearize.convert(tiny_model(family, dtype=dtype, **overrides), name, **options)
    layer = mixers_in(model)[0]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("attn."):
                scale = 0.1 / p.shape[1] ** 0.5 if name.endswith("_proj.weight") else 0.5
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model, layer


def kernel_calls(monkeypatch, module, name: str, record) -> list:
    """linearize's kernels switched on (CPU tensors through the interpreter) and `module.name` counted: returns the list
    of `record(args, output)` of its calls."""
    calls, function = [], getattr(module, name)

    def counted(*args, **kwargs):
        out = function(*args, **kwargs)
        calls.append(record(args, out))
        return out

    monkeypatch.setattr(module, name, counted)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "on")
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    return calls


def generation_through_a_prefill_kernel(model, fused: list, monkeypatch) -> list:
    """A left-padded batch's cached greedy generation with a prefill kernel on (its calls counted in `fused`, as
    `kernel_calls` gives them) equals uncached generation's tokens and, the kernel off, the PyTorch path's logits, which
    call the kernel no more; returns the calls of the first generation."""
    ids, mask = left_padded(random_ids(2, 7), [2, 0])
    settings = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )
    generated = model.generate(**settings)
    first = list(fused)
    assert torch.equal(generated.sequences, model.generate(**settings, use_cache=False).sequences)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    calls = len(fused)
    assert_close(torch.stack(generated.logits), torch.stack(model.generate(**settings).logits), "logits", 1e-5)
    assert len(fused) == calls
    return first


def with_each_switch_off(monkeypatch, call) -> None:
    """`call()` under LINEARIZE_KERNELS=torch, then under LINEARIZE_FUSED_STEP=off; LINEARIZE_FUSED_STEP=on after."""
    for name, value in (("LINEARIZE_KERNELS", "torch"), ("LINEARIZE_FUSED_STEP", "off")):
        monkeypatch.setenv(name, value)
        call()
        monkeypatch.delenv(name)
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "on")


def left_to_pytorch_when_off_or_float64(monkeypatch, model, ids, calls: list) -> None:
    """Without gradients, `model(ids)` under each switch off and in float64 makes no kernel call (`calls` stays empty);
    then one call in float32, with the kernels on."""
    with torch.no_grad():
        with_each_switch_off(monkeypatch, lambda: model(ids))
        model.double()(ids)
        assert calls == []
        model.float()(ids)


def window_option(mixer: str, window: int) -> dict:
    """{"window": window} for a mixer that takes one; {} for one without (qwen3_5_gdn)."""
    takes = {field.name for field in dataclasses.fields(linearize.MIXERS[mixer].Options)}
    return {"window": window} if "window" in takes else {}


def rotary(model):
    """The teacher's rotary embedding module."""
    return model.model.get_decoder().rotary_emb


def step(mixer, hidden, position_embeddings, mask, state, start: int, end: int):
    """The mixer's heads for tokens start..end, continuing `state` (which then counts them, as a model's forward does)."""
    cos, sin = position_embeddings
    piece = hidden[:, start:end]
    q, k, v = mixer.project(piece)
    with torch.no_grad():
        out = mixer.mix(piece, q, k, v, (cos[:, start:end], sin[:, start:end]), None if mask is None else mask[:, start:end], state)
    state.advance(end - start)
    return out


def assert_close(actual, expected, what, tol):
    if tol == 0:  # bit for bit (and infinities, as kept keys' errors hold, where they are)
        assert torch.equal(actual, expected), f"{what}: not equal"
        return
    actual, expected = actual.float(), expected.float()
    finite = expected.isfinite()
    assert torch.equal(actual.isfinite(), finite) and torch.equal(actual[~finite], expected[~finite]), f"{what}: infinities differ"
    actual, expected = actual[finite], expected[finite]
    scale = expected.abs().max().clamp_min(1e-6) if expected.numel() else 1.0
    error = ((actual - expected).abs().max() / scale).item() if expected.numel() else 0.0
    assert error <= tol, f"{what}: max difference {error:.2e} of the largest value"


# Differences relative to the largest value, per state tensor and for the heads. The caches (inputs and rotated keys,
# rounded where the PyTorch path rounds) are equal; hedgehog_swa's feature-mapped keys (fk, float32 from the same rotated
# keys) differ by float32 rounding. Both paths round the window's heads to the dtype before the mix
# and the output after it: in bfloat16 a float32 difference that flips a rounding is an ulp of the window (up to twice
# the output's largest value) and one of the output. Such flips are rare: `unequal` is the share of the heads' elements
# that may differ at all (a rounding left out shows in far more).
TOLERANCE = {
    torch.float32: dict(heads=2e-5, unequal=1.0, recurrent=2e-5, S=2e-5, ssm=2e-5, conv=0, k=0, v=0, mask=0, z=2e-5, fk=2e-5, err=0, at=0),
    torch.bfloat16: dict(heads=3e-2, unequal=0.01, recurrent=1e-4, S=1e-4, ssm=1e-4, conv=0, k=0, v=0, mask=0, z=2e-5, fk=2e-5, err=0, at=0),
}
# Each mixer on each shape, in one dtype, batch size and prefill each, so that every mixer meets both dtypes, both batch
# sizes and both starts (the interpreter is slow: not every product). Batch 3 pads two rows (`assert_steps_match`).
FP32, BF16 = torch.float32, torch.bfloat16
SETTINGS = {
    "smollm2": (BF16, 1, 3),
    "awkward": (FP32, 3, 0),
    "softcap": (FP32, 3, 3),
    "partial_rope": (BF16, 1, 3),
    "no_window": (BF16, 3, 0),
}
# Every mixer on every shape but hedgehog_swa's with no window (it always has one); each variant on the two shapes that
# meet both dtypes, both batch sizes and both starts between them; kept keys from a fresh state too.
PAIRS = [(mixer, shape) for mixer in MIXERS for shape in SETTINGS if (mixer, shape) != ("hedgehog_swa", "no_window")]
PAIRS += [(variant, shape) for variant in VARIANTS for shape in ("softcap", "partial_rope")] + [("hedgehog_swa+keep", "awkward")]
CASES = [(mixer, shape, *SETTINGS[shape]) for mixer, shape in PAIRS]
# The oldest versions' run (-m core) takes the three shapes that meet both dtypes, both batch sizes and both starts;
# "smollm2" and "awkward" (40 s of interpreted steps on 2 cores) run on the newest versions only.
CORE_SHAPES = {"softcap", "partial_rope", "no_window"}


def assert_steps_match(monkeypatch, mixer, shape, dtype, batch, prefill, tolerance, device="cpu", fused=None):
    """From the same state, one fused decode step and one PyTorch decode step give the same heads and next state, at
    every step from the first (a fresh state, or one left by a prefill of `prefill` tokens) until the window has
    turned over. With batch 3, row 0 is left-padded by 2 tokens, which the prefill takes or the first steps decode, and
    row 2 has a pad at the second decode step, after real tokens, which must leave its state as it was. `fused`: the
    list the fused steps' calls are counted in, after the caller switched them on (default: `force_fused_step`'s)."""
    fused = force_fused_step(monkeypatch) if fused is None else fused
    monkeypatch.setattr(triton_step, "WINDOW_CHUNK", 128)  # hedgehog_swa's windows here in chunks of 2 to 8 rows
    model, layer = randomised_mixer(mixer, shape, dtype)
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    window = getattr(layer, "window", 0)
    block = getattr(layer.options, "keep_block", 0) if getattr(layer.options, "keep", 0) else 0
    # With kept keys, until the ring of window + block - 1 positions has turned over and two blocks are decided.
    total = max(window + 2, prefill + 3) + 2 * block
    hidden = (torch.randn(batch, total, model.config.text_config.hidden_size, generator=generator) * 10).to(device, dtype)
    mask = None
    real = torch.ones(batch, total, dtype=torch.bool, device=device)
    if batch > 1:
        real[0, :2] = False
        real[2, prefill + 1] = False
        mask = real
    positions = (real.long().cumsum(-1) - 1).clamp_min(0)
    position_embeddings = rotary(model)(hidden, positions)
    state = MixerState()
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    if prefill:
        step(layer, hidden, position_embeddings, mask, state, 0, prefill)
    for t in range(prefill, total):
        before = {name: tensor.clone() for name, tensor in state.tensors.items()}
        monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
        expected = step(layer, hidden, position_embeddings, mask, state, t, t + 1)
        monkeypatch.setenv("LINEARIZE_KERNELS", "auto")
        mine = MixerState()
        mine.write(before)
        mine.advance(t)
        out = step(layer, hidden, position_embeddings, mask, mine, t, t + 1)
        assert out.dtype == dtype
        assert_close(out, expected.to(dtype), f"heads at step {t}", tolerance["heads"])
        # Below float32's normal range (bamba's gate makes such values: SiLU of a very negative z) backends round
        # differently (numpy's interpreter keeps subnormals, a GPU may flush them): not rounding flips.
        normal = expected.abs() >= torch.finfo(torch.float32).tiny
        unequal = ((out != expected.to(dtype)) & normal).float().mean().item()
        assert unequal <= tolerance["unequal"], f"heads at step {t}: {unequal:.1%} of them differ"
        assert mine.tensors.keys() == state.tensors.keys()
        for name, tensor in state.tensors.items():
            assert mine.tensors[name].shape == tensor.shape and mine.tensors[name].dtype == tensor.dtype, name
            assert_close(mine.tensors[name], tensor, f"{name} at step {t}", tolerance[name])
    assert len(fused) == total - prefill


@needs_triton
@pytest.mark.parametrize(
    "mixer,shape,dtype,batch,prefill",
    [pytest.param(m, s, d, b, p, id=f"{m}-{s}-{str(d)[6:]}-B{b}-prefill{p}", marks=pytest.mark.core if s in CORE_SHAPES else ())
     for m, s, d, b, p in CASES],
)
def test_each_fused_step_equals_the_pytorch_step(monkeypatch, mixer, shape, dtype, batch, prefill):
    assert_steps_match(monkeypatch, mixer, shape, dtype, batch, prefill, TOLERANCE[dtype])


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("mixer", STEPS)
def test_the_fused_step_updates_the_state_in_place(fused, mixer):
    """After the first step, the state keeps its tensors (a static cache's addresses are the compiled step's)."""
    model, layer = randomised_mixer(mixer, "partial_rope", torch.float32)
    hidden = torch.randn(2, 2, model.config.text_config.hidden_size)
    position_embeddings = rotary(model)(hidden, torch.arange(2)[None].expand(2, -1))
    state = MixerState()
    step(layer, hidden, position_embeddings, None, state, 0, 1)
    kept = dict(state.tensors)
    step(layer, hidden, position_embeddings, None, state, 1, 2)
    assert all(state.tensors[name] is tensor for name, tensor in kept.items())
    assert len(fused) == 2


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("mixer", STEPS)
def test_the_custom_op_computes_what_the_eager_launch_does(fused, monkeypatch, mixer):
    """A compiled step calls the registered op (`OPS`), eager code launches the kernels itself: the same
    heads and states, bit for bit."""
    model, layer = randomised_mixer(mixer, "partial_rope", torch.float32)
    hidden = torch.randn(2, 4, model.config.text_config.hidden_size)
    position_embeddings = rotary(model)(hidden, torch.arange(4)[None].expand(2, -1))
    module, name = mixer_module(mixer), STEPS[mixer]
    results = []
    for step_function in (getattr(triton_step, name), triton_step.OPS[mixer.split("+")[0]]):
        monkeypatch.setattr(module, name, step_function)
        state = MixerState()
        outs = [step(layer, hidden, position_embeddings, None, state, t, t + 1) for t in range(4)]
        results.append((torch.cat(outs, dim=2), state.tensors))
    (out, tensors), (op_out, op_tensors) = results
    assert torch.equal(out, op_out)
    assert all(torch.equal(tensors[name], op_tensors[name]) for name in tensors)


# (mixer, window, prompt length): a prompt of window - 1 or window tokens leaves each layer's window mask a view of
# the model's padding mask, one tensor for every layer, which the fused step must not shift in place. hedgehog_swa's
# window 1 caches no key: the current one leaves the window into the state at once.
GENERATIONS = [(m, 4, 3) for m in MIXERS] + [("gated_deltanet", 4, 4), ("mamba2", 0, 5), ("hedgehog_swa", 1, 3)]


@needs_triton
@pytest.mark.parametrize(
    "mixer,window,prompt",
    # the oldest versions' run takes each mixer once (window 4, prompt 3); the other cases run on the newest only
    [pytest.param(m, w, p, id=f"{m}-window{w}-prompt{p}", marks=pytest.mark.core if (w, p) == (4, 3) else ()) for m, w, p in GENERATIONS],
)
def test_cached_generation_through_the_fused_step_equals_uncached(fused, monkeypatch, mixer, window, prompt):
    """A tiny two-layer model, left-padded batch: greedy generation through the fused step gives the PyTorch path's
    logits at each step and the tokens of uncached generation (no decode step)."""
    model = linearize.convert(tiny_model(dtype=torch.float32, num_hidden_layers=2), mixer, **window_option(mixer, window))
    ids, mask = left_padded(random_ids(2, prompt), [2, 0])
    settings = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )
    generated = model.generate(**settings)
    assert len(fused) == 2 * 5  # every layer's every decode step
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    assert_close(torch.stack(generated.logits), torch.stack(model.generate(**settings).logits), "logits", 1e-5)
    assert torch.equal(generated.sequences, model.generate(**settings, use_cache=False).sequences)


def kept_keys_generation():
    """Two layers with kept keys (window 4, 3 kept, blocks of 4) and the settings of a greedy generation from a
    left-padded 5-token prompt: 9 decode steps, those at 7 and 11 followed by a block's decision."""
    model = linearize.convert(tiny_model(dtype=torch.float32, num_hidden_layers=2), "hedgehog_swa", window=4, keep=3, keep_block=4)
    ids, mask = left_padded(random_ids(2, 5), [2, 0])
    settings = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )
    return model, settings


@pytest.mark.core
@needs_triton
def test_cached_generation_with_kept_keys_through_the_fused_step_equals_uncached(fused, monkeypatch):
    """As above with kept keys (`kept_keys_generation`): every decode step through the fused step in each layer."""
    model, settings = kept_keys_generation()
    generated = model.generate(**settings)
    assert len(fused) == 2 * 9
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    assert_close(torch.stack(generated.logits), torch.stack(model.generate(**settings).logits), "logits", 1e-5)
    assert torch.equal(generated.sequences, model.generate(**settings, use_cache=False).sequences)


@pytest.mark.core
@needs_triton
def test_a_compiled_static_cache_generation_with_kept_keys_through_the_fused_step(monkeypatch):
    """As above, with a static cache, compiled as generate() compiles it on CUDA (`fullgraph`, the graph run as traced):
    one graph for every step, each layer's step the custom op, the decisions after the steps at 7 and 11 outside the
    graph (`get_compiled_call`), and the logits of eager fused steps with a dynamic cache."""
    from tests.test_static_cache import compiled_anywhere

    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "on")
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    model, settings = kept_keys_generation()
    eager = model.generate(**settings)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append([str(node.target) for node in graph.graph.nodes if node.op == "call_function"])
        return graph.forward

    config = compiled_anywhere(fullgraph=True, backend=backend)
    torch._dynamo.reset()
    compiled = model.generate(**settings, cache_implementation="static", compile_config=config)
    assert len(graphs) == 1 and sum("hedgehog_swa" in target for target in graphs[0]) == 2
    assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), "logits", 1e-5)
    assert torch.equal(compiled.sequences, eager.sequences)


@pytest.mark.core
@needs_triton
@pytest.mark.parametrize("mixer", MIXERS)
def test_the_step_is_left_to_pytorch_where_it_cannot_run(fused, monkeypatch, mixer):
    """With gradients, with window dropout (training), under LINEARIZE_KERNELS=torch or LINEARIZE_FUSED_STEP=off, or
    in float64, decode steps take the PyTorch path; else the fused step."""
    model = linearize.convert(tiny_model(dtype=torch.float32), mixer, **window_option(mixer, 4))
    double = copy.deepcopy(model).double()
    ids = random_ids(1, 5)
    cache, double_cache = model.new_cache(), double.new_cache()
    model(ids, cache=cache, use_cache=True)
    model(ids[:, :1], cache=cache, use_cache=True)  # gradients on
    with torch.no_grad():
        with_each_switch_off(monkeypatch, lambda: model(ids[:, :1], cache=cache, use_cache=True))
        for layer in mixers_in(model):
            layer.window_dropout = 0.5
        model.train()
        model(ids[:, :1], cache=cache, use_cache=True)
        model.eval()
        double(ids, cache=double_cache, use_cache=True)
        double(ids[:, :1], cache=double_cache, use_cache=True)
        assert fused == []
        model(ids[:, :1], cache=cache, use_cache=True)
    assert len(fused) == 3


@pytest.mark.core
@needs_triton
def test_hedgehog_swa_with_more_features_than_a_head_has_dimensions_stays_on_pytorch(fused):
    model = linearize.convert(tiny_model(dtype=torch.float32), "hedgehog_swa", window=4, feature_dim=triton_step.MAX_HEAD_DIM + 1)
    ids = random_ids(1, 5)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)
    assert fused == []


@pytest.mark.core
def test_a_bad_switch_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "yes")
    with pytest.raises(LinearizeError, match="LINEARIZE_FUSED_STEP='yes' is not one of auto, on, off; unset it") as info:
        triton_step.switch()
    assert "\n" not in str(info.value)


@pytest.mark.core
def test_off_cuda_and_the_interpreter_the_device_is_read_before_the_switches(monkeypatch):
    # A decode step on the CPU asks a dozen times a layer whether a kernel runs: the answer costs no environment read.
    monkeypatch.setattr(triton_step, "INTERPRETED", False)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "yes")
    x = torch.zeros(1, 2, 1, 8)
    assert triton_step.fused_kernel_problem(x, "the fused RoPE").startswith("the fused RoPE runs on CUDA tensors")
    hidden = torch.zeros(1, 1, 16)
    assert "the fused step runs on CUDA tensors" in triton_step.fused_step_problem(hidden, x, x, x, None, 0, {}, ("S",))
    monkeypatch.setattr(triton_step, "INTERPRETED", True)
    with pytest.raises(LinearizeError, match="LINEARIZE_FUSED_STEP='yes' is not one of"):
        triton_step.fused_kernel_problem(x, "the fused RoPE")
