"""The CPU decode steps (cpu_step.py) of every mixer with a fused step against the PyTorch decode path: heads and next
states step by step on every shape and variant that the fused steps' tests use (test_triton_step.py), in float64,
float32 and bfloat16; when the PyTorch path takes a step instead; and whole models' cached generation. They need no
Triton: on CPU tensors a step runs there unless LINEARIZE_FUSED_STEP=on sends it to Triton's interpreter."""

import pytest
import torch

import linearize
from linearize.hf import cpu_step
from linearize.hf.cache import MixerState
from linearize.hf.mixers import FusedStepMixer
from tests.test_triton_step import SHAPES, TOLERANCE, assert_steps_match, randomised_mixer, rotary, step
from tests.tiny import left_padded, random_ids, tiny_model

STEPS = ("hedgehog_step", "hedgehog_swa_step", "gated_deltanet_step", "qwen3_5_gdn_step", "gla_step", "mamba2_step", "bamba_mamba2_step")
# In float64 the step's arithmetic is the PyTorch path's up to the order of its sums; its cached keys, values, mask
# and position are the PyTorch path's, bit for bit, in every dtype.
F64 = dict(heads=1e-12, unequal=1.0, S=1e-12, z=1e-12, fk=1e-12, k=0, v=0, mask=0, at=0, err=0, conv=0, recurrent=1e-12, ssm=1e-12)
# hedgehog_swa's variants: a decay, feature maps that read q and k before RoPE, and kept keys.
VARIANTS = ("hedgehog_swa+decay", "hedgehog_swa+linear_rope", "hedgehog_swa+keep")
CASES = [(mixer, shape) for mixer in ("hedgehog", "gated_deltanet", "qwen3_5_gdn", "gla", "mamba2", "bamba_mamba2") for shape in SHAPES] + [
    (mixer, shape) for mixer in ("hedgehog_swa", *VARIANTS) for shape in SHAPES if shape != "no_window"
]


def cpu_calls(monkeypatch) -> list:
    """The CPU steps counted (their outputs' shapes appended to the returned list), under the default switches."""
    calls = []
    for name in STEPS:

        def counted(*args, function=getattr(cpu_step, name)):
            out = function(*args)
            calls.append(out.shape)
            return out

        monkeypatch.setattr(cpu_step, name, counted)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "auto")
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    return calls


@pytest.mark.core
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("mixer,shape", CASES, ids=[f"{m}-{s}" for m, s in CASES])
@pytest.mark.parametrize("batch,prefill", [(1, 0), (3, 3)], ids=["B1-fresh", "B3-prefill3"])
def test_each_cpu_step_equals_the_pytorch_step(monkeypatch, mixer, shape, dtype, batch, prefill):
    tolerance = F64 if dtype == torch.float64 else TOLERANCE[dtype]
    assert_steps_match(monkeypatch, mixer, shape, dtype, batch, prefill, tolerance, fused=cpu_calls(monkeypatch))


@pytest.mark.core
def test_every_mixer_with_a_fused_step_has_a_cpu_step():
    fused = sorted(name for name, mixer in linearize.MIXERS.items() if issubclass(mixer, FusedStepMixer))
    assert fused == sorted(step.removesuffix("_step") for step in STEPS)
    assert all(linearize.MIXERS[name].cpu_steps for name in fused)


def two_steps(layer, model, **settings) -> MixerState:
    """The state after a prefill of two tokens and one decode step of `layer` (under `settings`: grad or not)."""
    hidden = torch.randn(2, 3, model.config.text_config.hidden_size)
    position_embeddings = rotary(model)(hidden, torch.arange(3)[None].expand(2, -1))
    state = MixerState()
    step(layer, hidden, position_embeddings, None, state, 0, 2)
    with torch.set_grad_enabled(settings.get("grad", False)):
        q, k, v = layer.project(hidden[:, 2:])
        layer.mix(hidden[:, 2:], q, k, v, tuple(p[:, 2:] for p in position_embeddings), None, state)
    return state


@pytest.mark.core
@pytest.mark.parametrize("mixer", ["hedgehog_swa+keep", "gated_deltanet", "qwen3_5_gdn", "gla", "mamba2", "bamba_mamba2"])
@pytest.mark.parametrize(
    "why,setting",
    [
        ("LINEARIZE_FUSED_STEP=off", ("LINEARIZE_FUSED_STEP", "off")),
        ("LINEARIZE_KERNELS=torch", ("LINEARIZE_KERNELS", "torch")),
        ("gradients", None),
    ],
)
def test_the_pytorch_path_takes_the_steps_the_cpu_step_does_not(monkeypatch, why, setting, mixer):
    calls = cpu_calls(monkeypatch)
    model, layer = randomised_mixer(mixer, "partial_rope", torch.float32)
    if setting:
        monkeypatch.setenv(*setting)
    two_steps(layer, model, grad=why == "gradients")
    assert calls == []
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "auto")
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    two_steps(layer, model)
    assert len(calls) == 1


@pytest.mark.core
def test_a_state_made_in_inference_mode_is_stepped_by_the_pytorch_path_outside_it(monkeypatch):
    """torch does not let a tensor made under inference_mode change in place outside it: the PyTorch path, which copies,
    takes such a step; inside inference_mode the CPU step does."""
    calls = cpu_calls(monkeypatch)
    model, layer = randomised_mixer("hedgehog_swa", "partial_rope", torch.float32)
    hidden = torch.randn(1, 3, model.config.text_config.hidden_size)
    position_embeddings = rotary(model)(hidden, torch.arange(3)[None])
    state = MixerState()
    with torch.inference_mode():
        step(layer, hidden, position_embeddings, None, state, 0, 2)
    step(layer, hidden, position_embeddings, None, state, 2, 3)
    assert calls == []
    with torch.inference_mode():
        step(layer, hidden, position_embeddings, None, state, 2, 3)
    assert len(calls) == 1


# (mixer, options): hedgehog_swa's window 1 caches no key (the current one leaves into the sums at once); a prompt of
# window - 1 tokens leaves the windows' masks a view of the model's padding mask.
GENERATIONS = [
    ("hedgehog", {}),
    ("hedgehog_swa", {"window": 4}),
    ("hedgehog_swa", {"window": 8}),
    ("hedgehog_swa", {"window": 1}),
    ("hedgehog_swa", {"window": 3, "linear_rope": False, "decay": 0.9}),
    ("hedgehog_swa", {"window": 3, "keep": 2, "keep_block": 4}),
    ("gated_deltanet", {"window": 4}),
    ("gated_deltanet", {"window": 8}),
    ("gated_deltanet", {"window": 0}),
    ("qwen3_5_gdn", {}),
    ("gla", {"window": 4}),
    ("gla", {"window": 0}),
    ("mamba2", {"window": 4}),
    ("mamba2", {"window": 0}),
    ("bamba_mamba2", {}),
]


@pytest.mark.core
@pytest.mark.parametrize("mixer,options", GENERATIONS, ids=[f"{m}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for m, o in GENERATIONS])
def test_cached_generation_through_the_cpu_step(monkeypatch, mixer, options):
    """A left-padded batch's cached greedy generation through the CPU step equals uncached generation's tokens and, the
    step switched off, the PyTorch path's tokens and logits."""
    calls = cpu_calls(monkeypatch)
    model = linearize.convert(tiny_model(), mixer, **options)
    ids, mask = left_padded(random_ids(2, 7), [2, 0])
    settings = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )
    generated = model.generate(**settings)
    assert len(calls) == 9 * model.config.text_config.num_hidden_layers  # every decode step of every layer
    assert torch.equal(generated.sequences, model.generate(**settings, use_cache=False).sequences)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    made = len(calls)
    reference = model.generate(**settings)
    assert len(calls) == made
    assert torch.equal(generated.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(generated.logits), torch.stack(reference.logits), rtol=0, atol=1e-5)
