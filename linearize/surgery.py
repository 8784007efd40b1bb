"""The surgery pass: plan -> validate -> check the teacher reading -> replace -> wrap.

Everything is validated before the model is touched: a bad plan raises LinearizeError and leaves the model
as it was. The plan is recorded in the config, so a saved model rebuilds itself on load.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .hf.attention import AttentionSpec, attention_slot, decoder_layers, l2_relative, reference_attention
from .hf.configuration_linearized import LinearizedConfig
from .hf.errors import LinearizeError
from .hf.mixers import get_mixer, mixers_in
from .hf.modeling_linearized import LinearizedForCausalLM, apply_plan
from .hf.plan import ATTENTION, LayerPlan, LayerSpec
from .layouts import resolve_layout, select_layers


def build_plan(
    num_layers: int,
    mixer: str,
    keep_attention: Any = (),
    layers: Any = None,
    hybrid: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    mixer_options: Mapping[str, Mapping[str, Any]] | None = None,
    keep_as: str = ATTENTION,
) -> LayerPlan:
    """The layer plan: per layer, a mixer and its options (not yet resolved against the teacher).

    `layers` limits conversion to those layers (the rest keep attention); `keep_attention` keeps some
    softmax layers, as the teacher's own layer or, with `keep_as`, as that mixer (e.g. `qwen3_5_attention`, a
    softmax layer that exports); `hybrid` maps other mixers to layer selections. Selections are validated by `layouts`.
    """
    get_mixer(mixer)
    get_mixer(keep_as)
    assignment = resolve_layout(num_layers, mixer, keep_attention=keep_attention, layers=layers, hybrid=hybrid)
    assignment = [keep_as if name == ATTENTION else name for name in assignment]
    per_mixer = {name: dict(opts) for name, opts in (mixer_options or {}).items()}
    for name in per_mixer:
        get_mixer(name)
    per_mixer.setdefault(mixer, {}).update(options or {})
    return LayerPlan.of(assignment, per_mixer)


def _teacher_of(model: nn.Module) -> PreTrainedModel:
    if isinstance(model, LinearizedForCausalLM) or getattr(model.config, "model_type", None) == "linearized":
        raise LinearizeError("this model is already converted; convert the teacher (linearize.load_teacher) instead")
    if not isinstance(model, PreTrainedModel) or not hasattr(model.config, "num_hidden_layers"):
        raise LinearizeError(f"convert takes a Hugging Face causal LM (a PreTrainedModel), got {type(model).__name__}")
    return model


@torch.no_grad()
def verify_reading(model: PreTrainedModel, indices: Iterable[int], length: int = 9) -> None:
    """Run the teacher once on a short input and check that linearize's reading of each attention module
    (projections, norms, heads, RoPE, scaling) reproduces that module's own output."""
    indices = list(indices)
    if not indices:
        return
    config = model.config
    layers = decoder_layers(model, config.num_hidden_layers)
    captured: dict[int, tuple] = {}
    hooks = []
    for index in indices:
        attn = getattr(layers[index], attention_slot(layers[index], where=f"layer {index}: "))

        def hook(module, args, kwargs, output, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = (module, hidden, kwargs.get("position_embeddings"), output)

        hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    dtype = next(model.parameters()).dtype
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    for index, (module, hidden, position_embeddings, output) in sorted(captured.items()):
        # Mixers return what HF attention modules return: (output, weights).
        if not (isinstance(output, tuple) and len(output) == 2):
            returned = f"{len(output)} values" if isinstance(output, tuple) else type(output).__name__
            raise LinearizeError(
                f"layer {index}: {type(module).__name__} returns {returned} instead of (output, weights); this model "
                "family is not supported yet"
            )
        output = output[0]
        spec = AttentionSpec.read(module, config, index)
        error = l2_relative(reference_attention(spec, module, hidden, position_embeddings), output)
        if not error < tolerance:
            raise LinearizeError(
                f"layer {index}: {type(module).__name__} computes attention differently from how linearize reads it "
                f"(relative difference {error:.1e}); this model family is not supported yet"
            )


# transformers' cache layer types (`config.layer_types`) that keep a recurrent or convolution state. transformers up to
# 5.24 also marked the models that have them with `_is_stateful`; 5.25 dropped the mark.
STATEFUL_LAYER_TYPES = frozenset({"conv", "linear_attention", "hybrid", "hybrid_sliding", "mamba", "mamba2", "recurrent", "rwkv"})


def keeps_state(model: PreTrainedModel) -> bool:
    """Whether `model` already has layers that keep a recurrent state (Mamba, linear attention, convolutions)."""
    if getattr(model, "_is_stateful", False):
        return True
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or ()
    return any(isinstance(kind, str) and kind in STATEFUL_LAYER_TYPES for kind in layer_types)


def _check_reading(teacher: PreTrainedModel, converted: list[int]) -> None:
    """Refuse, in one line, a teacher whose attention linearize cannot read or reproduce."""
    kind = type(teacher).__name__
    if keeps_state(teacher):
        raise LinearizeError(
            f"{kind} already keeps a recurrent state (Mamba or linear-attention layers) beside its attention, which "
            "linearize does not convert; convert a decoder whose layers are all softmax attention"
        )
    config = teacher.config
    try:
        blocks = decoder_layers(teacher, config.num_hidden_layers)
        for index in converted:
            AttentionSpec.read(getattr(blocks[index], attention_slot(blocks[index], where=f"layer {index}: ")), config, index)
        verify_reading(teacher, converted)
    except LinearizeError:
        raise
    except Exception as error:  # an unknown family's attention broke the reading: that is a refusal, not a crash
        first = (str(error).splitlines() or [""])[0][:160]
        raise LinearizeError(
            f"{kind} computes attention in a way linearize cannot read ({type(error).__name__}: {first}); this model "
            "family is not supported yet"
        ) from error


def convert(
    model: PreTrainedModel,
    mixer: str = "hedgehog_swa",
    keep_attention: Any = (),
    layers: Any = None,
    hybrid: Mapping[str, Any] | None = None,
    mixer_options: Mapping[str, Mapping[str, Any]] | None = None,
    source: str | None = None,
    keep_as: str = ATTENTION,
    **options: Any,
) -> LinearizedForCausalLM:
    """Replace the teacher's attention layers with `mixer`, reusing their q/k/v/o weights.

    Example:
        >>> teacher, tokenizer = linearize.load_teacher("smollm2-135m")
        >>> student = linearize.convert(teacher, "hedgehog_swa", keep_attention=[0], window=64)
        >>> exportable = linearize.convert(teacher, "qwen3_5_gdn", keep_attention="every:4", keep_as="qwen3_5_attention")

    The teacher module is changed in place and wrapped; keep no other reference to it. The returned model
    saves with `save_pretrained` and reloads with `AutoModelForCausalLM.from_pretrained`.
    """
    teacher = _teacher_of(model)
    config = teacher.config
    plan = build_plan(config.num_hidden_layers, mixer, keep_attention, layers, hybrid, options, mixer_options, keep_as)
    if any(p.device.type == "meta" for p in teacher.parameters()):
        raise LinearizeError("the teacher has weights on the meta device; load it fully before converting")
    _check_reading(teacher, plan.converted())
    apply_plan(teacher, config, plan)
    modules = [getattr(block, attention_slot(block)) for block in decoder_layers(teacher, config.num_hidden_layers)]
    wrapped_config = LinearizedConfig(
        text_config=config,
        layers=plan.with_options(m.options_dict() if hasattr(m, "options_dict") else {} for m in modules),
        source=source or getattr(config, "_name_or_path", None) or None,
        dtype=getattr(config, "dtype", None),
    )
    return LinearizedForCausalLM(wrapped_config, model=teacher)


def revert_to_attention(
    model: LinearizedForCausalLM, layers: Iterable[int], keep_as: str = ATTENTION, options: Mapping[str, Any] | None = None
) -> list[int]:
    """Put softmax attention back in the converted `layers`: the teacher's own layer (each mixer holds it as
    `.attn`), or, with `keep_as`, that mixer built on it with `options`; record it in `config.plan`, so the saved
    model rebuilds the same way. The replaced mixers' own parameters are dropped. Everything is checked before the
    model changes.

    Example:
        >>> revert_to_attention(student, [3, 17])
    """
    layers = sorted(set(layers))
    plan = model.config.plan
    text_config = model.config.text_config
    blocks = decoder_layers(model, text_config.num_hidden_layers)
    for index in layers:
        if not 0 <= index < len(blocks):
            raise LinearizeError(f"layer {index} is out of range; the model has layers 0-{len(blocks) - 1}")
        if plan[index].is_attention or plan[index].mixer == keep_as:
            raise LinearizeError(f"layer {index} already has softmax attention; revert only converted layers")
    if len(layers) == len(plan.converted()):
        raise LinearizeError("reverting these layers would leave no converted layer; keep fewer layers as attention")
    built = {}
    for index in layers:
        teacher = getattr(blocks[index], attention_slot(blocks[index])).attn
        built[index] = teacher if keep_as == ATTENTION else get_mixer(keep_as).from_attention(teacher, text_config, index, **(options or {}))
    for index, module in built.items():
        setattr(blocks[index], attention_slot(blocks[index]), module)
    model.config.plan = plan.with_layers(
        {i: LayerSpec(keep_as, m.options_dict() if hasattr(m, "options_dict") else {}) for i, m in built.items()}
    )
    return layers


def set_options(model: LinearizedForCausalLM, layers: Any = None, **options: Any) -> list[int]:
    """Change, in place, options that add and change no parameter (a mixer's `runtime_options`, such as
    `hedgehog_swa`'s `keep`) on every converted layer whose mixer takes them, or on `layers` alone (indices, or a
    selection as `keep_attention` takes: "6,7,14", "last:8"), checked as `convert` checks options; `config.plan`
    follows, so the saved model keeps them. Returns the layers changed.

    Example:
        >>> student = LinearizedForCausalLM.from_pretrained("out/lolcats")
        >>> set_options(student, keep=128)   # every hedgehog_swa layer keeps the 128 keys it recalls worst
        >>> set_options(student, layers=[14, 20], keep=1024)   # and those two layers 1024
    """
    resolved = check_runtime_options(model, layers, **options)
    for mixer, parsed in resolved.items():
        mixer.options = parsed
    model.config.plan = model.config.plan.with_layers({m.layer_idx: LayerSpec(type(m).name, m.options_dict()) for m in resolved})
    return sorted(m.layer_idx for m in resolved)


def check_runtime_options(model: LinearizedForCausalLM, layers: Any = None, **options: Any) -> dict:
    """What `set_options` would set, changing nothing: each converted layer whose mixer takes `options` (of `layers`,
    where given), with its options after them, checked as `convert` checks options. Raises LinearizeError naming the
    fix."""
    if not options:
        raise LinearizeError("set_options needs at least one option, e.g. keep=128")
    mixers = mixers_in(model)
    takers = [m for m in mixers if set(options) <= set(type(m).runtime_options)]
    if not takers:
        offered = sorted({f"{type(m).name} takes {', '.join(type(m).runtime_options)}" for m in mixers if type(m).runtime_options})
        raise LinearizeError(
            f"no converted layer takes {', '.join(map(repr, options))} after conversion ({'; '.join(offered) or 'none takes any'}); "
            "convert the teacher again with the option instead"
        )
    if layers is not None:
        by_index = {m.layer_idx: m for m in takers}
        chosen = select_layers(len(model.config.plan), layers, "layers")
        if not chosen:
            raise LinearizeError(f"layers {layers!r} selects no layer; name at least one, e.g. layers=[{min(by_index)}]")
        for index in chosen:
            if index not in by_index:
                raise LinearizeError(
                    f"layer {index} ({model.config.plan[index].mixer}) does not take {', '.join(map(repr, options))}; "
                    f"name layers that do: {', '.join(map(str, sorted(by_index)))}"
                )
        takers = [by_index[index] for index in chosen]
    text_config = model.config.text_config
    return {m: type(m).parse_options({**m.options_dict(), **options}, m.spec, text_config) for m in takers}
