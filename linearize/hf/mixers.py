"""The mixer registry and the behaviour every mixer shares.

A mixer replaces one teacher attention module. It keeps that module as `self.attn`, so the teacher's
q/k/v/o weights are reused in place and the exact teacher output is one call away (`teacher_mode`).
A new mixer is one file: a subclass with `name`, `Options` and `mix()`, decorated with `@register_mixer`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .attention import AttentionSpec
from .cache import cache_in
from .cpu_step import cpu_step_problem
from .errors import LinearizeError
from .kernel_dispatch import path as kernel_path
from .triton_step import fused_step_problem, turned_off
from .typed import coerce

MIXERS: dict[str, type["Mixer"]] = {}

# The wrapper model passes the 2D padding mask of the current tokens under this keyword; it travels through the
# teacher's decoder layers (they forward **kwargs to attention) and reaches every mixer.
PADDING_MASK = "linearize_padding_mask"


def register_mixer(cls: type["Mixer"]) -> type["Mixer"]:
    """Class decorator adding a mixer to `MIXERS` under `cls.name`; a duplicate or malformed name raises.

    A new mixer is one file, `hf/mixer_<name>.py` (found by shipped_mixers, saved beside every converted model):
    subclass `Mixer`, set `name`/`anchor`/`summary` (and `Options`, a dataclass), and implement `mix()` and
    `cost()`; `linearize.convert(model, "my_mixer")` and saved checkpoints then find it.

    >>> from linearize import register_mixer
    >>> from linearize.hf.mixers import Mixer
    >>> @register_mixer
    ... class Identity(Mixer):
    ...     name, anchor, summary = "identity_example", "none", "passes the values through"
    ...     def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state):
    ...         return v
    >>> register_mixer(Identity)
    Traceback (most recent call last):
    ...
    ValueError: mixer 'identity_example' is already registered by linearize.hf.mixers.Identity
    """
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ValueError(f"mixer name {name!r} of {cls.__qualname__} must be lowercase letters, digits and underscores")
    if name in MIXERS:
        raise ValueError(f"mixer {name!r} is already registered by {MIXERS[name].__module__}.{MIXERS[name].__qualname__}")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"{cls.__qualname__}.Options must be a dataclass")
    MIXERS[name] = cls
    return cls


def get_mixer(name: str) -> type["Mixer"]:
    """The registered mixer class for `name`; an unknown name raises with the closest match."""
    if name in MIXERS:
        return MIXERS[name]
    close = difflib.get_close_matches(name, MIXERS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise LinearizeError(f"unknown mixer {name!r}; {hint}available: {', '.join(sorted(MIXERS))}")


def check_option_names(mixer_name: str, options: dict[str, Any]) -> None:
    """Refuse option names that mixer `mixer_name` does not declare, naming the ones it takes.

    >>> check_option_names("swa", {"windows": 4})
    Traceback (most recent call last):
    ...
    linearize.hf.errors.LinearizeError: mixer 'swa' does not take option(s) windows; it takes: window
    """
    takes = [f.name for f in dataclasses.fields(get_mixer(mixer_name).Options)]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise LinearizeError(
            f"mixer {mixer_name!r} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(takes) or 'no options'}"
        )


@dataclass
class NoOptions:
    """This mixer takes no options."""


@dataclass(frozen=True)
class MixerCost:
    """Per-layer figures for `linearize mixers` / `linearize info` (counts of elements, not bytes)."""

    new_parameters: int
    state_fixed: int
    state_per_token: int


class Mixer(nn.Module):
    """Base class: one converted attention layer.

    Subclasses set `name`, `anchor` (the method it follows), `summary`, `Options` (a dataclass) and implement
    `mix()` (parallel/chunked form when no cache or a prefill, recurrent form when decoding) and `cost()`.
    """

    name: ClassVar[str] = ""
    anchor: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    is_linearize_mixer: ClassVar[bool] = True
    # Whether the layer's cache grows with the context (softmax attention); fixed-size states can be captured
    # in a CUDA graph (`linearize.decode.GraphDecoder`).
    state_grows: ClassVar[bool] = False
    # Whether the layer mixes a softmax window into its output by a share (`windows.add_window`), which a
    # distillation stage's `window_dropout` can drop.
    drops_window: ClassVar[bool] = False
    # Options that add and change no parameter, so a converted or trained layer takes new values as it is
    # (`linearize.set_options`).
    runtime_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, attn: nn.Module, spec: AttentionSpec, options: Any, layer_idx: int):
        super().__init__()
        self.attn = attn
        self.spec = spec
        self.options = options
        self.layer_idx = layer_idx
        self.teacher = False
        # Set by attention transfer: called with (mixer, student_output, teacher_output); the layer then
        # passes the teacher's output on, so every layer learns from the teacher's own inputs.
        self.transfer_hook = None
        # Set by a distillation stage with `window_dropout` (see `drops_window`); applies in training mode only.
        self.window_dropout = 0.0

    def dropped_window(self) -> float:
        """The probability with which `add_window` drops a head's window now: the stage's `window_dropout` while
        training, else 0."""
        return self.window_dropout if self.training else 0.0

    @classmethod
    def parse_options(cls, raw: dict[str, Any], spec: AttentionSpec, config) -> Any:
        """Validate `raw` option values against `Options` and resolve defaults that depend on the teacher."""
        check_option_names(cls.name, raw)
        hints = typing.get_type_hints(cls.Options)
        values = {k: coerce(v, hints[k], f"option {k!r} of mixer {cls.name!r}") for k, v in raw.items()}
        return cls.resolve(cls.Options(**values), spec, config)

    @classmethod
    def resolve(cls, options: Any, spec: AttentionSpec, config) -> Any:
        """Fill teacher-dependent defaults and check the options fit the teacher (override when needed)."""
        return options

    @classmethod
    def from_attention(cls, attn: nn.Module, config, layer_idx: int, **options: Any) -> "Mixer":
        """Build the mixer around the teacher attention module `attn` of layer `layer_idx`, reusing its weights."""
        spec = AttentionSpec.read(attn, config, layer_idx)
        mixer = cls(attn, spec, cls.parse_options(options, spec, config), layer_idx)
        reference = next(attn.parameters(), None)
        if reference is not None:  # new parameters live where the teacher's do, in its dtype
            mixer.to(device=reference.device, dtype=reference.dtype)
        mixer._mark_initialized()
        return mixer

    @classmethod
    def cost(cls, spec: AttentionSpec, options: Any) -> MixerCost:
        raise NotImplementedError

    @classmethod
    def static_state(cls, options: dict[str, Any]) -> bool:
        """Whether a layer with these (saved) options keeps one fixed-size state that its steps update on the device
        alone: what a static cache and a captured CUDA graph need (a softmax layer's cache grows)."""
        return not cls.state_grows

    @classmethod
    def decision_period(cls, options: dict[str, Any]) -> int:
        """0 where every decode step of a layer with these (saved) options is alike; else the period of the steps after
        which the layer decides something on the host's count of tokens (`hedgehog_swa`'s kept keys), a step of
        another kind, which `linearize.decode.GraphDecoder` captures apart."""
        return 0

    def decide_after(self, state, position) -> None:
        """The decision a deferred decode step at `position` left (`MixerState.deferred`), called where that step ends
        a period (`decision_period`); `position` a number, or a 0-d tensor on the state's device."""
        raise NotImplementedError(f"mixer {self.name!r} decides nothing after a step (its decision_period is 0)")

    def kernel(self) -> tuple[str, tuple[int, int]] | None:
        """The fla kernel this layer's recurrence runs on CUDA and the (key, value) head sizes it passes it; None
        where the layer has no fla kernel (softmax attention, sliding windows) and runs in PyTorch."""
        return None

    def cuda_path(self, dtype: torch.dtype) -> str:
        """Where this layer runs on CUDA tensors of `dtype`, in words (`linearize info`)."""
        return kernel_path(self.kernel(), dtype)

    def _mark_initialized(self) -> None:
        # transformers re-initialises modules it did not load unless flagged; our new parameters carry their
        # own deliberate initialisation (identity feature maps, identity convolutions), which must survive.
        for name, module in self.named_modules():
            if name == "attn" or name.startswith("attn."):
                continue
            module._is_hf_initialized = True
            for param in module.parameters(recurse=False):
                param._is_hf_initialized = True

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters this mixer added to the teacher (what attention transfer trains)."""
        return [p for n, p in self.named_parameters() if not n.startswith("attn.")]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.teacher:
            return self.attn(hidden_states, *args, **kwargs)
        if self.transfer_hook is not None:
            with torch.no_grad():
                teacher_out = self.attn(hidden_states, *args, **kwargs)
            student_out = self.student_forward(hidden_states, **kwargs)[0]
            self.transfer_hook(self, student_out, teacher_out[0])
            return teacher_out
        return self.student_forward(hidden_states, **kwargs)

    def student_forward(self, hidden_states: torch.Tensor, **kwargs):
        """The converted layer's own output (what `forward` returns outside teacher_mode and transfer)."""
        cache = cache_in(kwargs)
        state = None
        if cache is not None:
            state = cache.layers[self.layer_idx]
            if not getattr(state, "is_mixer_state", False):
                raise LinearizeError(
                    f"layer {self.layer_idx} got a {type(cache).__name__} made for softmax attention; let the model "
                    "create its own cache (pass none), or make one with model.new_cache()"
                )
        q, k, v = self.project(hidden_states)
        out = self.mix(
            hidden_states,
            q,
            k,
            v,
            position_embeddings=kwargs.get("position_embeddings"),
            padding_mask=kwargs.get(PADDING_MASK),
            state=state,
        )
        if state is not None:
            state.advance(hidden_states.shape[1])
        return self.spec.out(self.attn, out.to(hidden_states.dtype)), None

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, Hkv, T, D) from the teacher's projections (and q/k norms, if it has them)."""
        return self.spec.project(self.attn, hidden_states)

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state) -> torch.Tensor:
        """Return the attention heads (B, H, T, Dv) for q (B, H, T, D) and k, v (B, Hkv, T, D).

        `padding_mask` (B, T) is None or marks real tokens; `state` is None (no cache) or this layer's
        `MixerState`, whose `tensors` hold what the previous call left and must be updated in place.
        """
        raise NotImplementedError


class FusedStepMixer(Mixer):
    """A mixer whose inference decode step can run as one fused Triton step (`triton_step`); its PyTorch path stays
    the reference, and takes every other call.

    A subclass has a `window` (0: none), names the float32 tensors of its state that its step updates besides the
    window's (`step_tensors`), gives their zeros (`fresh_step_state`) and launches its step (`launch_step`). Its
    `mix` begins `if self.fuses_step(...): return self.fused_step(...)`. One whose `launch_step` also runs a CPU step
    (`cpu_step`: the same arithmetic in fewer PyTorch operations, for CPU tensors) says so in `cpu_steps`.
    """

    step_tensors: ClassVar[tuple[str, ...]] = ()
    # Whether its step reads the window a chunk at a time (`fused_step_problem`).
    chunks_window: ClassVar[bool] = False
    # Whether its inference prefill runs a Triton kernel of linearize's own (`triton_window`) rather than `kernel()`.
    fused_prefill: ClassVar[bool] = False
    # Whether its `launch_step` takes CPU decode steps too (`cpu_step`), where Triton does not run.
    cpu_steps: ClassVar[bool] = False

    def cuda_path(self, dtype: torch.dtype) -> str:
        if turned_off() is not None:
            return super().cuda_path(dtype)
        prefill = "Triton (linearize)" if self.fused_prefill else super().cuda_path(dtype)
        return f"{prefill}; decode: fused Triton step"

    def fuses_step(self, hidden_states, q, k, v, position_embeddings, state) -> bool:
        """Whether this call is a decode step that runs through the fused step: on CUDA with Triton, without gradients
        or window dropout, unless LINEARIZE_FUSED_STEP=off or LINEARIZE_KERNELS=torch (`fused_step_problem`); or, for a
        mixer with `cpu_steps`, on the CPU under the same switches (`cpu_step.cpu_step_problem`)."""
        if state is None or q.shape[2] != 1 or self.dropped_window():
            return False
        problem = fused_step_problem(
            hidden_states, q, k, v, position_embeddings, self.window, state.tensors, self.step_tensors, self.chunks_window
        )
        if problem is None:
            return True
        return self.cpu_steps and cpu_step_problem(q, state.tensors, self.step_tensors, self.window) is None

    def fused_step(self, hidden_states, q, k, v, position_embeddings, padding_mask, state) -> torch.Tensor:
        """One decode step through `launch_step`, which updates the state's tensors in place (after `step_state` has
        made them the state's own); returns the heads in q's dtype."""
        tensors, owned = self.step_state(q, state)
        cos, sin = (None, None) if position_embeddings is None else position_embeddings
        out = self.launch_step(hidden_states, q, k, v, cos, sin, padding_mask, tensors)
        if not owned:
            state.write(tensors)
        return out

    def launches_triton(self, hidden_states, q, k, v, cos, sin, tensors) -> bool:
        """Whether `launch_step` launches the Triton step (on CUDA, or where the fused step takes CPU tensors: Triton's
        interpreter) rather than its CPU step (`cpu_steps`)."""
        if q.is_cuda:
            return True
        position_embeddings = None if cos is None else (cos, sin)
        return fused_step_problem(
            hidden_states, q, k, v, position_embeddings, self.window, tensors, self.step_tensors, self.chunks_window
        ) is None

    def step_state(self, q: torch.Tensor, state) -> tuple[dict[str, torch.Tensor], bool]:
        """The state's tensors where the fused step may update them in place, else contiguous copies, which the
        step's caller writes; zeros (nothing seen, as on the PyTorch path) for a fresh state. And whether they are the
        state's own: a flag, not `is` on the dicts, which a compiled decode step cannot trace (dynamo breaks the graph
        there, and then recompiles every layer until it gives up, H200, eleventh session).

        A static state owns its tensors. A dynamic one may hold views the PyTorch path left: the window's mask after a
        prefill of window - 1 or window tokens is a view of the model's padding mask, one tensor for every layer.
        """
        tensors = state.tensors
        if tensors:
            own = [t.is_contiguous() and (state.static or t._base is None) for t in tensors.values()]
            if all(own):
                return tensors, True
            return {name: t if mine else t.clone(memory_format=torch.contiguous_format) for (name, t), mine in zip(tensors.items(), own)}, False
        fresh = self.fresh_step_state(q)
        if self.window:
            batch, _, _, d = q.shape
            keep, hkv = self.window - 1, self.spec.num_kv_heads
            fresh.update(
                k=q.new_zeros(batch, hkv, keep, d), v=q.new_zeros(batch, hkv, keep, d),
                mask=torch.zeros(batch, keep, dtype=torch.bool, device=q.device),
            )
        return fresh, False

    def fresh_step_state(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zeros for the tensors named in `step_tensors`, for q's batch (B, H, 1, D)."""
        raise NotImplementedError

    def launch_step(self, hidden_states, q, k, v, cos, sin, real, tensors) -> torch.Tensor:
        """The heads of one decode step from this mixer's step function in `triton_step`, which updates `tensors` in
        place; cos, sin: RoPE or None; real: the padding mask or None."""
        raise NotImplementedError


def mixers_in(model: nn.Module) -> list[Mixer]:
    # Duck-typed so models loaded as remote code (their own copy of this module) are found too.
    return [m for m in model.modules() if getattr(m, "is_linearize_mixer", False)]


@contextmanager
def teacher_mode(model: nn.Module):
    """Make a converted model compute the teacher's softmax attention with the same weights, inside the block.

    Example:
        >>> with teacher_mode(student):
        ...     teacher_logits = student(input_ids).logits
    """
    mixers = mixers_in(model)
    if not mixers:
        raise LinearizeError("teacher_mode needs a converted model and found no linearize mixers; convert it first with linearize.convert")
    before = [m.teacher for m in mixers]
    for m in mixers:
        m.teacher = True
    try:
        yield model
    finally:
        for m, was in zip(mixers, before):
            m.teacher = was
