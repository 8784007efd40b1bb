"""Which implementation runs a recurrence: flash-linear-attention's Triton kernels on CUDA, PyTorch otherwise.

The PyTorch ops (`ops_gated`, `ops_delta`) are the reference and the CPU path. `LINEARIZE_KERNELS` picks:
`auto` (default: fla on CUDA when it is installed and supports the shapes), `torch` (always PyTorch) or
`fla` (always fla; an error where it cannot run). All functions take and return the (B, H, T, D) layout.

The mixers compute q, k, v and the gates in float32 or wider (the PyTorch path's accuracy). `dtype` is the model's:
fla reads q, k, v and beta in it, in the copy to its (B, T, H, D) layout, where a bfloat16 model's would otherwise read
float32 (its chunked delta rule at 32K tokens: 1.89 ms of an H200 with float32 inputs, 1.00 ms with bfloat16; it
accumulates in float32 either way). Log-decays and the state stay float32. fla 0.6 refuses a 16-bit chunked backward
with an odd K or V (its `chunk_o.py`: Triton miscompiles the masked tail into out-of-bounds shared-memory reads; it
stopped `lolcats_linear` training in bf16 on an H200, fifteenth session), and gla's and hedgehog's values carry their
normaliser as one extra column (65). In 16 bits an odd head dimension gets one zero column on the way in (q and k, with
gla's per-key log-decays, or v), sliced off the output and the state on the way out: a zero key column adds nothing to
any score and a zero value column reads nothing, so outputs, states and gradients are the unpadded ones. Until the
twentieth session fla read float32 there instead, whose autotuned kernels took Triton minutes to compile on an H200
(`liger`'s first training step never finished; `lolcats_linear`'s took 58.5 s). A mixer whose q, k are precise
float32 values the model's dtype would cut (hedgehog's feature maps) passes `dtype=None`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import LinearizeError
from .ops_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule
from .ops_gated import chunk_gla, chunk_simple_gla, recurrent_gla, recurrent_simple_gla

try:  # optional: the `gpu` extra. transformers' remote-code import check skips imports inside try blocks.
    import fla
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent_gated_delta_rule
    from fla.ops.gla import chunk_gla as fla_chunk_gla
    from fla.ops.gla import fused_recurrent_gla as fla_recurrent_gla
    from fla.ops.simple_gla import chunk_simple_gla as fla_chunk_simple_gla
    from fla.ops.simple_gla import fused_recurrent_simple_gla as fla_recurrent_simple_gla

    FLA_VERSION = getattr(fla, "__version__", "0")
    FLA_PROBLEM = None
except Exception as error:  # ImportError, or a broken Triton install
    FLA_VERSION = None
    FLA_PROBLEM = f"flash-linear-attention is not usable ({type(error).__name__}: {str(error)[:120]})"

MINIMUM_FLA = (0, 6, 0)
MODES = ("auto", "torch", "fla")
_warned: set[str] = set()


def op_name(module: str, name: str) -> str:
    """A custom op's name in the `linearize` namespace, after the module that defines it: a saved model's copy of that
    module (remote code, imported under another name) registers ops of its own beside the installed package's."""
    return f"linearize::{re.sub(r'[^0-9A-Za-z_]', '_', module)}{name}"


def _fla_chunk_call(rule: str, q, k, v, g, beta, scale: float, initial_state, output_final_state: bool):
    """fla's chunked `rule` (gated_delta_rule, gla or simple_gla) over (B, T, H, *) tensors: (o in q's dtype, the final
    state (B, H, K, V) in float32, or None)."""
    if rule == "gated_delta_rule":
        return fla_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    chunk = fla_chunk_gla if rule == "gla" else fla_chunk_simple_gla
    return chunk(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def _fla_chunk_launch(
    rule: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], beta: Optional[torch.Tensor],
    scale: float, initial_state: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_fla_chunk_call` with the final state: the custom op `FLA_CHUNK`."""
    return _fla_chunk_call(rule, q, k, v, g, beta, scale, initial_state, True)


# fla wraps its chunked kernels in `torch.compiler.disable`: inside a compiled prefill (a static cache's chunks) each
# call broke the graph, and the rest of every layer ran as frames of its own, recompiled per layer (H100, sixty-third
# session). As a custom op, opaque to the compiler, fla's call stays in the graph.
FLA_CHUNK = torch.library.custom_op(op_name(__name__, "_fla_chunk"), _fla_chunk_launch, mutates_args=())


@FLA_CHUNK.register_fake
def _(rule, q, k, v, g, beta, scale, initial_state):
    return v.new_empty(v.shape, dtype=q.dtype), q.new_empty((q.shape[0], v.shape[2], q.shape[-1], v.shape[-1]), dtype=torch.float32)


def _fla_chunk(rule: str, q, k, v, g, beta, scale: float, initial_state, output_state: bool):
    """fla's chunked `rule` (fla's layout, as `_fla_chunk_launch`); returns (o, the final state or None). Inside
    torch.compile without gradients (a compiled prefill) through the custom op `FLA_CHUNK`, else fla's function."""
    if torch.compiler.is_compiling() and not _needs_grad(q, k, v, g, beta, initial_state):
        o, state = FLA_CHUNK(rule, q, k, v, g, beta, scale, initial_state)
        return o, (state if output_state else None)
    return _fla_chunk_call(rule, q, k, v, g, beta, scale, initial_state, output_state)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def fla_problem() -> str | None:
    """Why fla cannot be used at all here (None when it can)."""
    if FLA_PROBLEM is not None:
        return FLA_PROBLEM
    if _version_tuple(FLA_VERSION) < MINIMUM_FLA:
        return f"flash-linear-attention {FLA_VERSION} is older than {'.'.join(map(str, MINIMUM_FLA))}"
    return None


def gated_backward_problem(kernel: str = "gated_delta_rule", dtype: torch.dtype = torch.float32) -> str | None:
    """Why fla cannot train through its gated chunk `kernel` (`gated_delta_rule` or `simple_gla`) reading q, k, v in
    `dtype` here (None when it can).

    fla 0.6 refuses the backward of gated chunk kernels on Hopper with Triton 3.4 to 3.7.0 (they give wrong
    gradients there) unless tilelang takes it; training then runs on the PyTorch path, inference on fla. tilelang
    0.1.15 takes the gated delta rule in every dtype, but `simple_gla` only in float32: in 16 bits fla keeps
    simple_gla's backward states in float32, its tilelang kernel refuses states of another dtype than q's, and fla
    raises (H200, thirty-second session: the bf16 gradient tests failed so, the other twelve passed); `simple_gla`
    then reads q, k, v in float32 while it trains.
    """
    held = _held_backward()
    if held is None:
        return None
    triton_version, tilelang = held
    needs = "Triton >= 3.7.1 or tilelang"
    if tilelang:
        if kernel != "simple_gla" or dtype == torch.float32:
            return None
        needs = f"Triton >= 3.7.1: tilelang takes simple_gla in float32 only, not {dtype}"
    return f"fla's gated backward is wrong on Hopper with Triton {triton_version} (needs {needs})"


@functools.cache
def _held_backward() -> tuple[str, bool] | None:
    """(Triton's version, whether tilelang is installed) where fla 0.6 holds its gated backward (a Hopper GPU, Triton
    3.4 to 3.7.0), else None: facts of the process, asked once, since training asks at every gated call."""
    import triton

    version = _version_tuple(triton.__version__)
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    if not (hopper and (3, 4, 0) <= version < (3, 7, 1)):
        return None
    return triton.__version__, importlib.util.find_spec("tilelang") is not None


def shape_problem(head_dims: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """Why fla's kernels cannot take these head dimensions / dtype (None when they can)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"fla kernels take float16/bfloat16/float32, not {dtype}"
    if any(d > 256 for d in head_dims):
        return f"fla kernels take head dimensions up to 256, got {max(head_dims)}"
    return None


def mode() -> str:
    value = os.environ.get("LINEARIZE_KERNELS", "auto").lower()
    if value not in MODES:
        raise LinearizeError(f"LINEARIZE_KERNELS={value!r} is not one of {', '.join(MODES)}; unset it or pick one")
    return value


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message + "; using the PyTorch path (slower)", stacklevel=3)


def backend(device: torch.device, head_dims: tuple[int, ...], dtype: torch.dtype) -> tuple[str, str | None]:
    """("fla" or "torch", reason when fla was wanted but not used) for tensors on `device`."""
    chosen = mode()
    if chosen == "torch":
        return "torch", None
    if device.type != "cuda":
        if chosen == "fla":
            raise LinearizeError("LINEARIZE_KERNELS=fla needs CUDA tensors; move the model to a GPU or set LINEARIZE_KERNELS=auto")
        return "torch", None
    problem = fla_problem() or shape_problem(head_dims, dtype)
    if problem is not None:
        if chosen == "fla":
            raise LinearizeError(f"LINEARIZE_KERNELS=fla, but {problem}; `pip install 'linearize[gpu]'` or set LINEARIZE_KERNELS=auto")
        _warn_once(problem)
        return "torch", problem
    return "fla", None


def path(kernel: tuple[str, tuple[int, int]] | None, dtype: torch.dtype) -> str:
    """Where a layer whose `Mixer.kernel()` is `kernel` runs on CUDA tensors of `dtype` (for `linearize info`)."""
    if kernel is None:
        return "PyTorch (no fla kernel)"
    name, head_dims = kernel
    if mode() == "torch":
        return "PyTorch (LINEARIZE_KERNELS=torch)"
    problem = fla_problem() or shape_problem(head_dims, dtype)
    return f"fla {name}" if problem is None else f"PyTorch: {problem}"


def _pick(q: torch.Tensor, v: torch.Tensor, trains: tuple[str, torch.dtype] | None = None, decode: bool = False) -> bool:
    """Whether fla runs this call; `trains` is (gated kernel, the dtype fla reads) where gradients will flow through a
    gated kernel."""
    if backend(q.device, (q.shape[-1], v.shape[-1]), q.dtype)[0] != "fla":
        return False
    if decode and torch.compiler.is_compiling() and mode() == "auto":
        # A compiled decode step (static cache) keeps the one-token recurrence in PyTorch ops, which inductor fuses
        # into the step's own kernels; fla's autotuned Triton kernels would be user kernels compiled on their own.
        return False
    if trains is not None:
        problem = gated_backward_problem(*trains)
        if problem is not None:
            _warn_once(problem + " for training")
            return False
    return True


def _needs_grad(*tensors) -> bool:
    """Whether gradients will flow back through a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _bthd(dtype, *tensors):
    """(B, H, T, ...) tensors in fla's (B, T, H, ...) layout, in `dtype` where given, one copy each."""
    return [None if t is None else _relaid(t.transpose(1, 2), dtype or t.dtype) for t in tensors]


def _scale(scale: float | None, q: torch.Tensor) -> float:
    """The query scale, 1/sqrt(K) of the unpadded K by default: fla would take it from the padded q."""
    return q.shape[-1] ** -0.5 if scale is None else scale


def _evened(dtype: torch.dtype, *tensors):
    """fla-layout tensors with one zero column appended where their last dimension is odd and fla computes in 16 bits
    (`dtype`; the module docstring says why); as they are otherwise."""
    if dtype not in (torch.float16, torch.bfloat16):
        return list(tensors)
    return [t if t is None or t.shape[-1] % 2 == 0 else F.pad(t, (0, 1)) for t in tensors]


def _evened_state(state: torch.Tensor | None, key_dim: int, value_dim: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A (B, H, K, V) initial state padded as `_evened` pads keys and values."""
    if state is None or dtype not in (torch.float16, torch.bfloat16):
        return state
    return F.pad(state, (0, value_dim % 2, 0, key_dim % 2))


def _unevened(o: torch.Tensor, state: torch.Tensor | None, key_dim: int, value_dim: int):
    """fla's (B, T, H, V) output in the (B, H, T, V) layout and its state, cut back to the unpadded sizes (a cut state
    is copied: a cache keeps it, and the fused decode steps update contiguous states in place)."""
    if state is not None and state.shape[-2:] != (key_dim, value_dim):
        state = state[..., :key_dim, :value_dim].contiguous()
    return o[..., :value_dim].transpose(1, 2), state


def _relaid(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `to` with a memory format copies only where the dtype changes; `contiguous` copies only where the layout does.
    return t.contiguous() if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)


def _state(initial_state):
    return None if initial_state is None else initial_state.float().contiguous()


def gla(q, k, v, gk, scale=None, initial_state=None, decode=False, output_state=False, dtype=None):
    """Gated linear attention with per-channel log-decays `gk` (see `ops_gated`); returns (o, state or None).
    q may hold G query heads for each head of k, v and gk (query head h reads key head h // G), and the state, given
    and returned, is then one per key head: PyTorch's chunked form computes it once per key head, fla and the
    recurrence on the key heads repeated. fla reads q, k and v in `dtype` (None: theirs); the PyTorch path ignores it."""
    fla_runs = _pick(q, v, decode=decode)
    if not fla_runs and not decode:
        o, state = chunk_gla(q, k, v, gk, scale=scale, initial_state=initial_state)
        return o, (state if output_state else None)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v, gk = (x.repeat_interleave(groups, dim=1) for x in (k, v, gk))
        initial_state = None if initial_state is None else initial_state.repeat_interleave(groups, dim=1)
    if fla_runs:
        o, state = _fla_gla(q, k, v, gk, scale, initial_state, decode, output_state, dtype)
    else:
        o, state = recurrent_gla(q, k, v, gk, scale=scale, initial_state=initial_state)
    return o, (state[:, ::groups].contiguous() if output_state else None)


def _fla_gla(q, k, v, gk, scale, initial_state, decode, output_state, dtype):
    qt, kt, vt = _bthd(dtype, q, k, v)
    (gt,) = _bthd(torch.float32, gk)
    qt, kt, gt, vt = _evened(qt.dtype, qt, kt, gt, vt)
    initial = _evened_state(_state(initial_state), q.shape[-1], v.shape[-1], qt.dtype)
    if decode:
        o, state = fla_recurrent_gla(qt, kt, vt, gt, scale=_scale(scale, q), initial_state=initial, output_final_state=output_state)
    else:
        o, state = _fla_chunk("gla", qt, kt, vt, gt, None, _scale(scale, q), initial, output_state)
    return _unevened(o, state, q.shape[-1], v.shape[-1])


def simple_gla(q, k, v, g, scale=None, initial_state=None, decode=False, output_state=False, dtype=None):
    """Linear attention with one log-decay per head and step (Mamba-2's SSD); g = None is plain linear attention.
    fla reads q, k and v in `dtype` (None: theirs); the PyTorch path ignores it."""
    trains = ("simple_gla", dtype or q.dtype) if g is not None and _needs_grad(q, k, v, g, initial_state) else None
    if trains is not None and gated_backward_problem(*trains) is not None and gated_backward_problem("simple_gla") is None:
        # fla trains simple_gla in float32 where it cannot in 16 bits (tilelang on Hopper): q, k, v go in so
        trains, dtype = ("simple_gla", torch.float32), torch.float32
    if not _pick(q, v, trains, decode):
        op = recurrent_simple_gla if decode else chunk_simple_gla
        g = q.new_zeros(q.shape[:3]) if g is None else g
        o, state = op(q, k, v, g, scale=scale, initial_state=initial_state)
        return o, (state if output_state else None)
    qt, kt, vt = _bthd(dtype, q, k, v)
    (gt,) = _bthd(torch.float32, g)
    qt, kt, vt = _evened(qt.dtype, qt, kt, vt)
    initial = _evened_state(_state(initial_state), q.shape[-1], v.shape[-1], qt.dtype)
    if decode:
        o, state = fla_recurrent_simple_gla(qt, kt, vt, gt, scale=_scale(scale, q), initial_state=initial, output_final_state=output_state)
    else:
        o, state = _fla_chunk("simple_gla", qt, kt, vt, gt, None, _scale(scale, q), initial, output_state)
    return _unevened(o, state, q.shape[-1], v.shape[-1])


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, decode=False, output_state=False, dtype=None):
    """Gated delta rule with L2-normalised q/k (see `ops_delta`); returns (o, state or None).
    fla reads q, k, v and beta in `dtype` (None: theirs); the PyTorch path ignores it."""
    trains = ("gated_delta_rule", dtype or q.dtype) if _needs_grad(q, k, v, g, beta, initial_state) else None
    if not _pick(q, v, trains, decode):
        op = recurrent_gated_delta_rule if decode else chunk_gated_delta_rule
        o, state = op(q, k, v, g, beta, scale=scale, initial_state=initial_state)
        return o, (state if output_state else None)
    qt, kt, vt, bt = _bthd(dtype, q, k, v, beta)
    (gt,) = _bthd(torch.float32, g)
    qt, kt, vt = _evened(qt.dtype, qt, kt, vt)
    initial = _evened_state(_state(initial_state), q.shape[-1], v.shape[-1], qt.dtype)
    if decode:
        o, state = fla_recurrent_gated_delta_rule(qt, kt, vt, g=gt, beta=bt, scale=_scale(scale, q), initial_state=initial, output_final_state=output_state)
    else:
        o, state = _fla_chunk("gated_delta_rule", qt, kt, vt, gt, bt, _scale(scale, q), initial, output_state)
    return _unevened(o, state, q.shape[-1], v.shape[-1])
