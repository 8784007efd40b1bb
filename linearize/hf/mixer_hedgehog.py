"""Hedgehog linear attention (LoLCATs), alone or with a sliding softmax window sharing its normaliser.

The feature map is learnable and per head: phi(x) = [softmax(xW + b), softmax(-(xW + b))], applied after RoPE
(in `hedgehog_swa` with `linear_rope=false`, before it), with W initialised to the identity so training starts from a
sensible kernel. In `hedgehog_swa` the last `window` keys are scored by the teacher's own softmax and a learnable
per-head factor sets the balance. On CUDA a decode step (inference) runs as one fused Triton step,
`triton_step.hedgehog_step` or `hedgehog_swa_step`, and `hedgehog_swa`'s prefill (inference and eager training: the
kernel has a backward; a compiled training step runs the PyTorch form, which inductor fuses faster, `compiled_training`)
as one chunked Triton kernel, `triton_window.window_linear_prefill`, where they can, and an inference prefill's
feature maps as one more (`triton_features.feature_maps`); the PyTorch path is the reference. With `decay`, the keys
that have left `hedgehog_swa`'s window fade by a learnable factor per kv head and token (undecayed, their mass in the
shared normaliser grows with the context); the fused step takes it, the prefill kernel not yet (its prefill runs the
PyTorch path). With `keep`, the keys the linear state recalls worst stay exact beside the window (`ops_kept`): on
CUDA a decode step runs as the same fused Triton step (`hedgehog_swa_step`: its rows split across programs, then
combined; the decision every keep_block steps in PyTorch), and an inference prefill scores its queries in one
Triton kernel (`triton_kept`), the rest of it in PyTorch; training runs the PyTorch path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import cpu_step
from .attention import AttentionSpec, apply_rotary, compute_dtype, repeat_heads
from .errors import LinearizeError
from .kernel_dispatch import simple_gla
from .mixers import FusedStepMixer, MixerCost, register_mixer
from .ops_kept import decide_block, decode_kept_window_linear, empty_kept_state, ends_block, kept_window_linear
from .ops_window import chunk_window_linear, decode_window_linear, empty_ring_state, ordered_state, ring_state
from .triton_features import feature_map_problem, feature_maps
from .triton_step import MAX_HEAD_DIM, hedgehog_step, hedgehog_swa_step
from .triton_window import window_linear_prefill, window_prefill_problem
from .windows import check_window


class HedgehogFeatureMap(nn.Module):
    """Per-head map R^D -> R^2F: softmax over [xW + b, -(xW + b)]."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim, feature_dim).repeat(heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(heads, 1, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if feature_map_problem(x, self.weight, self.bias) is None:  # inference on CUDA: one Triton kernel (triton_features.py)
            return feature_maps(x, self.weight, self.bias)
        acc = torch.promote_types(x.dtype, torch.float32)
        b, h, t, d = x.shape
        # One batched matmul per head over every batch row and position, the bias added in it.
        rows = x.to(acc).transpose(0, 1).reshape(h, b * t, d)
        y = torch.baddbmm(self.bias.to(acc), rows, self.weight.to(acc)).view(h, b, t, -1).transpose(0, 1)
        # Both halves' softmaxes in one (over a (..., 2, F) stack), the same numbers as two and a concatenation.
        return torch.softmax(torch.stack((y, -y), dim=-2), dim=-1).flatten(-2)


@dataclass
class HedgehogOptions:
    """feature_dim: width F of each half of the feature map (default: the head dimension)."""

    feature_dim: int | None = None


def compiled_training(*tensors: torch.Tensor) -> bool:
    """Whether this prefill is traced by torch.compile and needs gradients: there the PyTorch form runs, in its chunks of
    64 queries, which inductor fuses, forward and backward, faster than the kernel's backward (Llama-3.2-1B shape, window
    256, 2,048-token windows, batch 8, bf16 autocast, H100, a layer's forward and backward: 6.2 ms in chunks of 64,
    6.9 in chunks as long as the window, 6.9 through the kernel with its bf16 feature products and blocks of 64, in half
    the memory (14.0 before them); attention transfer 106.8K against 98.1K tokens/s in chunks of 64 and 256;
    BENCHMARKS.md, fifty-ninth session)."""
    return torch.compiler.is_compiling() and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclass
class HedgehogSWAOptions:
    """feature_dim: width F of each half of the feature map (default: head dimension); window: softmax window;
    decay: 0 (off), or the starting per-token retention in (0, 1) of a learnable per-kv-head decay of the keys that
    have left the window (e.g. 0.99); linear_rope: the feature maps read q and k after RoPE (true, as LoLCATs), or
    before it (false: the keys beyond the window are matched by content at any distance, and the window alone sees
    positions); keep: 0 (off), or how many of the keys that have left the window each kv head keeps exact, scored by
    the window's softmax: those its linear state recalls worst (LoLA's sparse cache; `ops_kept`), decided keep_block
    at a time (the window then holds window to window + keep_block - 1 keys). keep adds no parameters: a trained
    student takes it as it is."""

    feature_dim: int | None = None
    window: int = 64
    decay: float = 0.0
    linear_rope: bool = True
    keep: int = 0
    keep_block: int = 64


@register_mixer
class HedgehogMixer(FusedStepMixer):
    name = "hedgehog"
    anchor = "LoLCATs"
    summary = "linear attention with a learnable Hedgehog feature map after RoPE"
    Options = HedgehogOptions
    # The state per kv head: S (B, Hkv, 2F, D + 1), the feature-mapped keys times [v, 1] (its last column the normaliser).
    step_tensors = ("S",)
    window = 0
    cpu_steps = True

    def __init__(self, attn, spec: AttentionSpec, options, layer_idx: int):
        super().__init__(attn, spec, options, layer_idx)
        f = options.feature_dim
        self.feature_q = HedgehogFeatureMap(spec.num_heads, spec.head_dim, f)
        self.feature_k = HedgehogFeatureMap(spec.num_kv_heads, spec.head_dim, f)

    @classmethod
    def resolve(cls, options, spec: AttentionSpec, config):
        if options.feature_dim is None:
            options.feature_dim = spec.head_dim
        if options.feature_dim < 1:
            raise LinearizeError(f"option 'feature_dim' of mixer {cls.name!r} must be at least 1, got {options.feature_dim}")
        return options

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        f, d = options.feature_dim, spec.head_dim
        params = (spec.num_heads + spec.num_kv_heads) * (d * f + f)
        return MixerCost(new_parameters=params, state_fixed=spec.num_kv_heads * 2 * f * (d + 1), state_per_token=0)

    def kernel(self):
        return "simple_gla", (2 * self.options.feature_dim, self.spec.head_dim + 1)

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state):
        if self.fuses_step(hidden_states, q, k, v, position_embeddings, state):
            return self.fused_step(hidden_states, q, k, v, position_embeddings, padding_mask, state)
        q, k = apply_rotary(q, k, position_embeddings)
        fq, fk = self.feature_q(q), self.feature_k(k)
        values = torch.cat((v.to(fk.dtype), torch.ones_like(v[..., :1], dtype=fk.dtype)), dim=-1)
        if padding_mask is not None:
            fk = fk * padding_mask[:, None, :, None]
        groups = self.spec.groups
        initial = None if state is None else state.tensors.get("S")
        # Plain linear attention is simple GLA with no decay; the ones column of the values carries the
        # normaliser. The state is the same for the query heads of one kv head, so one copy is kept per kv head.
        # fla reads the feature maps' float32 output as it is, whatever the model's dtype: their bias's gradient is
        # a small difference of large terms (a softmax's), and in bf16 it came back 15% off the PyTorch path's on an
        # H200 (twenty-first session), where gla's raw projections in bf16 stayed within rounding.
        out, final = simple_gla(
            fq,
            repeat_heads(fk, groups),
            repeat_heads(values, groups),
            None,
            scale=1.0,
            initial_state=None if initial is None else repeat_heads(initial, groups),
            decode=state is not None and q.shape[2] == 1,
            output_state=state is not None,
        )
        if state is not None:
            state.write({"S": final[:, ::groups].clone()})  # a copy: a view would keep every query head's state
        num, den = out[..., :-1], out[..., -1:]
        # den is 0 only where no real key has been seen yet (left padding), and num with it.
        return num / torch.where(den > 0, den, torch.ones_like(den))

    def fuses_step(self, hidden_states, q, k, v, position_embeddings, state) -> bool:
        # The kernels hold the state's halves (F x D) and a feature map's weight (D x F) as the others hold a head's
        # D x D state: up to MAX_HEAD_DIM features.
        return self.options.feature_dim <= MAX_HEAD_DIM and super().fuses_step(hidden_states, q, k, v, position_embeddings, state)

    def fresh_step_state(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, hkv, width = q.shape[0], self.spec.num_kv_heads, 2 * self.options.feature_dim
        return {"S": q.new_zeros(batch, hkv, width, self.spec.head_dim + 1, dtype=torch.promote_types(q.dtype, torch.float32))}

    def launch_step(self, hidden_states, q, k, v, cos, sin, real, tensors) -> torch.Tensor:
        step = hedgehog_step if self.launches_triton(hidden_states, q, k, v, cos, sin, tensors) else cpu_step.hedgehog_step
        return step(
            q, k, v, cos, sin, real, self.feature_q.weight, self.feature_q.bias, self.feature_k.weight, self.feature_k.bias, tensors["S"]
        )


@register_mixer
class HedgehogSWAMixer(HedgehogMixer):
    name = "hedgehog_swa"
    anchor = "LoLCATs"
    summary = "Hedgehog linear attention plus a sliding softmax window, one normaliser"
    Options = HedgehogSWAOptions
    chunks_window = True
    fused_prefill = True
    runtime_options = ("keep", "keep_block")

    def __init__(self, attn, spec: AttentionSpec, options, layer_idx: int):
        super().__init__(attn, spec, options, layer_idx)
        self.window = options.window
        # sigmoid(0) = 0.5: the window and the linear part start evenly weighted; the window's softmax
        # scores (near 1 at their peak) then dominate the small linear scores, close to the teacher.
        self.window_logit = nn.Parameter(torch.zeros(spec.num_heads))
        if options.decay:
            # Per kv head, as the state it fades is kept per kv head.
            self.decay_logit = nn.Parameter(torch.full((spec.num_kv_heads,), math.log(options.decay / (1 - options.decay))))

    @classmethod
    def resolve(cls, options, spec: AttentionSpec, config):
        check_window(options.window, config, cls.name)
        if not 0 <= options.decay < 1:
            raise LinearizeError(
                f"option 'decay' of mixer {cls.name!r} must be 0 (off) or between 0 and 1, got {options.decay}; 0.99 is a start"
            )
        if options.keep < 0 or options.keep_block < 1:
            raise LinearizeError(
                f"options 'keep' and 'keep_block' of mixer {cls.name!r} must be at least 0 and 1, got {options.keep} and "
                f"{options.keep_block}; keep=128 is a start"
            )
        if options.keep and options.decay:
            raise LinearizeError(f"option 'keep' of mixer {cls.name!r} does not take 'decay' yet; set decay=0 or keep=0")
        return super().resolve(options, spec, config)

    @classmethod
    def decision_period(cls, options: dict) -> int:
        return options.get("keep_block", HedgehogSWAOptions.keep_block) if options.get("keep") else 0

    @property  # a property, as `set_options` may give a converted layer kept keys
    def step_tensors(self) -> tuple[str, ...]:
        """The state per kv head: S (B, Hkv, 2F, D) and z (B, Hkv, 2F) sum the feature-mapped keys that have left the
        window, fk (B, Hkv, window, 2F) holds those in its ring (`ops_window.ring_state`); with kept keys, fk holds the
        kept keys' and the ring's and err the kept keys' errors (`ops_kept`). Beside them, k, v, mask, and at (B,),
        int64, the position (`fused_step`)."""
        return ("S", "z", "fk", "err") if self.options.keep else ("S", "z", "fk")

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        w, hkv, d, f = options.window, spec.num_kv_heads, spec.head_dim, options.feature_dim
        # Per kv head: the linear state (2F x D) and normaliser (2F), and a ring of w rows (`ops_window.ring_state`),
        # with kept keys (`ops_kept`) the kept keys and a ring of w + keep_block - 1, each row a key, value, features
        # and mask entry; each kept key its error; and the position.
        rows = w + (options.keep + options.keep_block - 1 if options.keep else 0)
        state = hkv * 2 * f * (d + 1) + hkv * rows * (2 * d + 2 * f + 1) + hkv * options.keep + 1
        decay = hkv if options.decay else 0
        return MixerCost(super().cost(spec, options).new_parameters + spec.num_heads + decay, state, 0)

    def kernel(self):
        return None  # no fla kernel: the window and the linear part share one normaliser (triton_window's kernel, or PyTorch)

    def window_inputs(self, q, k, position_embeddings, padding_mask):
        """q and k after RoPE, their feature maps (of q and k before RoPE without linear_rope), and the arguments every
        window form takes: its length, scaling, the heads' shares, the key mask and the softcap."""
        raw_q, raw_k = q, k
        q, k = apply_rotary(q, k, position_embeddings)
        fq, fk = (self.feature_q(q), self.feature_k(k)) if self.options.linear_rope else (self.feature_q(raw_q), self.feature_k(raw_k))
        share = torch.sigmoid(self.window_logit.to(torch.promote_types(q.dtype, torch.float32)))
        kwargs = dict(
            window=self.window,
            scaling=self.spec.scaling,
            sm_weight=share,
            ln_weight=1.0 - share,
            key_mask=padding_mask,
            softcap=self.spec.softcap,
        )
        return q, k, fq, fk, kwargs

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state):
        if self.fuses_step(hidden_states, q, k, v, position_embeddings, state):
            return self.fused_step(hidden_states, q, k, v, position_embeddings, padding_mask, state)
        if self.options.keep:
            return self.mix_kept(q, k, v, position_embeddings, padding_mask, state)
        q, k, fq, fk, kwargs = self.window_inputs(q, k, position_embeddings, padding_mask)
        decay = torch.sigmoid(self.decay_logit.to(torch.promote_types(q.dtype, torch.float32))) if self.options.decay else None
        # The state is kept per kv head: its keys, values and feature-mapped keys are the same for every query
        # head of one kv head, and so are the sums of those that left the window. Its window is a ring
        # (`ops_window.ring_state`), which a decode step writes a row of; a prefill reads and leaves it in order.
        if state is not None and q.shape[2] == 1:
            out, new = decode_window_linear(q, k, v, fq, fk, state=state.tensors, decay=decay, **kwargs)
            state.write(new)
            return out
        tensors = None if state is None or not state.tensors else state.tensors
        ordered = None if tensors is None else ordered_state(tensors, self.window)
        # The kernel takes q, k, v of one dtype: under autocast, autocast's (q and k may have left a norm in float32).
        low = compute_dtype(v)
        kq, kk, kv = q.to(low), k.to(low), v.to(low)
        training = compiled_training(q, fq, fk)
        if decay is None and not training and window_prefill_problem(kq, kk, kv, fq, fk, self.window) is None:
            out, final = window_linear_prefill(kq, kk, kv, fq, fk, state=ordered, output_state=state is not None, **kwargs)
        else:
            if state is None:
                return chunk_window_linear(q, k, v, fq, fk, decay=decay, **kwargs)[0]
            out, final = chunk_window_linear(q, k, v, fq, fk, decay=decay, state=ordered, output_state=True, **kwargs)
        if state is not None:
            at = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device) if tensors is None else tensors["at"]
            state.write(ring_state(final, at + q.shape[2], self.window))
        return out

    def mix_kept(self, q, k, v, position_embeddings, padding_mask, state):
        """`mix` with kept keys (`ops_kept`), grouped heads as they are: the parallel form, or the decode step. Blocks
        are counted from the sequence's start, so the state's count of tokens seen is the call's position; the state
        holds it on the device too ("at", `fused_step`). A state whose decisions are deferred (`MixerState.deferred`: a
        compiled decode step) is stepped without reading the host's count, and decided after the step (`decide_after`)."""
        q, k, fq, fk, kwargs = self.window_inputs(q, k, position_embeddings, padding_mask)
        kwargs.update(keep=self.options.keep, block=self.options.keep_block)
        if state is None:
            return kept_window_linear(q, k, v, fq, fk, **kwargs)[0]
        tensors = {name: t for name, t in state.tensors.items() if name != "at"}
        if state.deferred and q.shape[2] == 1:  # the ring's row from the device, the decision after the step
            at = state.tensors["at"]
            out, new = decode_kept_window_linear(q, k, v, fq, fk, state=tensors, position=at[0], decide=False, **kwargs)
            state.write({**new, "at": at + 1})
            return out
        position = int(state.seen)
        if position == 0:  # zeros after a static cache's reset are not the empty state (an empty slot's error is -inf)
            tensors = {}
        if q.shape[2] == 1:
            out, new = decode_kept_window_linear(q, k, v, fq, fk, state=tensors, position=position, **kwargs)
        else:
            out, new = kept_window_linear(q, k, v, fq, fk, state=tensors, position=position, output_state=True, **kwargs)
        state.write({**new, "at": torch.full((q.shape[0],), position + q.shape[2], dtype=torch.int64, device=q.device)})
        return out

    def fused_step(self, hidden_states, q, k, v, position_embeddings, padding_mask, state) -> torch.Tensor:
        """One decode step through the kernel, on the state's ring in place (`ops_window.ring_state`, or with kept keys
        `ops_kept`'s layout); with kept keys, at a block's end its decision (`ops_kept`), which makes new tensors. The
        kernel (and a decision) read the position from the state's "at" (B,), on the device, so that a captured step
        serves every position (`linearize.decode.GraphDecoder`); whether the step decides is the host's count's, after
        the step where the state's decisions are deferred (`decide_after`)."""
        keep = self.options.keep
        position = int(state.seen) if keep and not state.deferred else None  # a deferred step never reads the host's count
        # A fresh state, or with kept keys a static one after its reset (zeros, where an empty slot's error is -inf).
        tensors = self.step_state(q, state)[0] if state.tensors and position != 0 else self.fresh_step_state(q)
        cos, sin = (None, None) if position_embeddings is None else position_embeddings
        out = self.launch_step(hidden_states, q, k, v, cos, sin, padding_mask, tensors)
        at = tensors["at"]
        if position is not None and ends_block(position, self.options.keep_block):
            tensors = decide_block(tensors, at[0], window=self.window, keep=keep, block=self.options.keep_block)
        # In place, as the rows (torch refuses it for a tensor made under inference mode, written outside it; a deferred
        # or static step's are a static state's own, which a compiled step cannot ask).
        owned = state.deferred or state.static or not at.is_inference() or torch.is_inference_mode_enabled()
        state.write({**tensors, "at": at.add_(1) if owned else at + 1})
        return out

    def decide_after(self, state, position) -> None:
        """The block decision that the deferred decode step at `position` left (`mix_kept`), into the state's tensors
        (`ops_kept.decide_block`); `position` a number, or a 0-d tensor on the state's device (a captured decision)."""
        tensors = {name: t for name, t in state.tensors.items() if name != "at"}
        decided = decide_block(tensors, position, window=self.window, keep=self.options.keep, block=self.options.keep_block)
        state.write({**decided, "at": state.tensors["at"]})

    def cuda_path(self, dtype: torch.dtype) -> str:
        path = super().cuda_path(dtype)
        if self.options.keep:  # `triton_kept`: inference only
            return path.replace("Triton (linearize)", "Triton (linearize; training on the PyTorch path)")
        return path.replace("Triton (linearize)", "PyTorch (no prefill kernel for option 'decay' yet)") if self.options.decay else path

    def fresh_step_state(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, hkv, width = q.shape[0], self.spec.num_kv_heads, 2 * self.options.feature_dim
        keys = q.new_empty(batch, hkv, 0, self.spec.head_dim)
        features = keys.new_empty(batch, hkv, 0, width, dtype=torch.promote_types(q.dtype, torch.float32))
        if not self.options.keep:
            return empty_ring_state(q, keys, keys, features, self.window)
        kept = empty_kept_state(q, keys, keys, features, self.window, self.options.keep, self.options.keep_block)
        return {**kept, "at": torch.zeros(batch, dtype=torch.int64, device=q.device)}

    def launch_step(self, hidden_states, q, k, v, cos, sin, real, tensors) -> torch.Tensor:
        maps = (self.feature_q.weight, self.feature_q.bias, self.feature_k.weight, self.feature_k.bias)
        rings = (tensors["S"], tensors["z"], tensors["k"], tensors["v"], tensors["fk"], tensors["mask"], tensors["at"])
        decay = self.decay_logit if self.options.decay else None
        if not self.launches_triton(hidden_states, q, k, v, cos, sin, tensors):
            return cpu_step.hedgehog_swa_step(
                q, k, v, cos, sin, real, *maps, self.window_logit, *rings, self.options.keep, self.spec.scaling,
                self.spec.softcap, decay, self.options.linear_rope,
            )
        return hedgehog_swa_step(
            q, k, v, cos, sin, real, *maps, self.window_logit, *rings, self.options.keep, self.spec.scaling,
            self.spec.softcap, decay, self.options.linear_rope,
        )
