"""The generation cache of a converted model: per layer, exactly what that layer needs.

Kept softmax layers get the layer cache transformers itself would build for them (full or sliding KV; full
layers append into spare room instead of concatenating: `RoomyLayer`).
Converted layers get a `MixerState`: named tensors (recurrent state, window keys/values, conv state)
whose size does not grow with context beyond what the mixer declares, plus the count of tokens seen.

A static cache (`generate(..., cache_implementation="static")`) is what transformers compiles a decode step
for: kept layers get static KV layers of the generation's length, and each fixed-size state keeps the
tensors it first got, updated in place, so every step reads and writes the same addresses. On CUDA,
`generate()` then runs its decode steps through `torch.compile` (CUDA graphs) on its own.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import LinearizeError

# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache` (the old name
# is deprecated until 5.40). linearize speaks whichever name the installed version uses, read off its classes.
# Decoder layers hand the cache to their attention module under that name; GPT-2-style families say `layer_past`.
OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
LAYER_CACHE_NAMES = ("cache", "past_key_values", "layer_past")


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword under which `module.forward` takes its cache in the installed transformers."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_in(kwargs: dict[str, Any]) -> Cache | None:
    """The cache a decoder layer passed its attention module, under whichever name it used (None without one)."""
    return next((kwargs[name] for name in LAYER_CACHE_NAMES if kwargs.get(name) is not None), None)


def returned_cache(output) -> Cache | None:
    """The cache a model's forward returned, read under the installed transformers' field name."""
    return getattr(output, OUTPUT_CACHE_FIELD, None)


# Spare positions a kept layer's keys and values are allocated with (see `RoomyLayer`).
ROOM = 256


def append_into_room(room: torch.Tensor | None, held: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`held` (..., S, D) with `new` (..., T, D) appended along the sequence, as a view of `room`; returns (room, the
    view). `room` is a buffer whose start `held` is, with space after it: the append copies T positions. Where `held`
    is not (no room yet, or a reorder or batch selection replaced it) or the space is used up, a new buffer with
    `ROOM` spare positions takes a copy of `held` first. Under `torch.compile`, or where autograd records (a write into
    the room would change tensors saved for the backward), it concatenates and keeps no room."""
    length, extra = (held.shape[-2] if held.dim() == new.dim() else 0), new.shape[-2]
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (held.requires_grad or new.requires_grad)):
        return None, torch.cat((held, new), dim=-2)
    fits = (
        room is not None
        and length > 0
        and held.data_ptr() == room.data_ptr()
        and held.shape[:-2] == new.shape[:-2] == room.shape[:-2]
        and held.stride() == room.stride()
        and length + extra <= room.shape[-2]
    )
    if not fits:
        room = new.new_empty(*new.shape[:-2], length + extra + ROOM, new.shape[-1])
        if length:
            room[..., :length, :].copy_(held)
    room[..., length : length + extra, :].copy_(new)
    return room, room[..., : length + extra, :]


class RoomyLayer(DynamicLayer):
    """transformers' `DynamicLayer` whose keys and values are views of buffers with room for `ROOM` more positions: a
    decode step writes its one position instead of concatenating, which copies every cached key and value of the layer
    at every step (the teacher's decode on 2 CPU cores spent a quarter of its time there). Crop, reorder, batch
    selection and reset keep working on the views: a layer whose views were replaced starts a new buffer. Under
    `torch.compile` or autograd it concatenates, as transformers does."""

    _rooms: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # the buffers keys and values are views of

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        key_room, self.keys = append_into_room(self._rooms[0], self.keys, key_states)
        value_room, self.values = append_into_room(self._rooms[1], self.values, value_states)
        self._rooms = (key_room, value_room)
        return self.keys, self.values

    def reset(self) -> None:
        self._rooms = (None, None)
        super().reset()

    def offload(self) -> None:
        self._rooms = (None, None)  # the views move to the CPU; the buffers they came from are let go
        super().offload()


NO_ROLLBACK = (
    "a converted layer's recurrent state cannot be rolled back, so assisted/speculative generation and cache cropping "
    "are not supported; generate without an assistant model or prompt_lookup_num_tokens"
)


class MixerState(CacheLayerMixin):
    """One converted layer's state. Mixers read `tensors` and `write` the next ones; `seen` counts tokens.

    A static state (`static=True`) copies each write into the tensors of its first one, so their addresses
    never change, and counts tokens in a tensor: a compiled decode step then neither re-traces nor reads the
    host. Its mixer's state must keep one shape; a state that grows (kept KV) is built non-static. While `deferred`
    (a compiled decode step, `LinearizedForCausalLM.get_compiled_call`), a mixer that decides on the host's count
    (`Mixer.decision_period`) steps without deciding, and decides after the step.
    """

    is_mixer_state = True
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, static: bool = False):
        super().__init__()
        self.static = static
        self._tensors: dict[str, torch.Tensor] = {}
        self._rooms: dict[str, torch.Tensor] = {}  # buffers some tensors are views of (`append`)
        self.seen = torch.zeros((), dtype=torch.long) if static else 0
        self.deferred = False
        self.is_initialized = True

    @property
    def is_compileable(self) -> bool:
        return self.static

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self._tensors

    def write(self, new: dict[str, torch.Tensor]) -> None:
        """Take `new` as the state. A static state copies it into the tensors of its first write.

        A method, not a property setter: torch.compile inlines it into the decode step's graph on every supported
        torch, where torch 2.11 replayed a setter after the graph, as a frame of its own per layer (recorded as a
        CUDA graph of its own per layer, and run once per layer at every step).
        """
        if not self.static:
            self._tensors = new
            return
        old = self._tensors
        if old.keys() == new.keys() and all(old[n].shape == t.shape and old[n].dtype == t.dtype for n, t in new.items()):
            for name, tensor in new.items():
                if tensor is not old[name]:  # a step that wrote the state's own tensors in place gives them back
                    old[name].copy_(tensor)
            return
        if old:
            raise LinearizeError(
                "a static cache's layer state changed shape between calls; generate without "
                "cache_implementation='static', or start from a fresh cache"
            )
        self._tensors = {name: tensor.clone() for name, tensor in new.items()}
        self.seen = self.seen.to(next(iter(new.values())).device) if new else self.seen
        if not torch.compiler.is_compiling():
            for tensor in (*self._tensors.values(), self.seen):
                torch._dynamo.mark_static_address(tensor)

    def append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """Tensor `name` (..., S, D) with `new` (..., T, D) appended along the sequence, written into room kept beside
        it (`append_into_room`), as `RoomyLayer` does for kept layers. The caller writes the result back as the
        state's `name`."""
        self._rooms[name], appended = append_into_room(self._rooms.get(name), self._tensors[name], new)
        return appended

    def advance(self, tokens: int) -> None:
        """Count `tokens` more seen (in place for a static state, whose count is a tensor)."""
        if self.static:
            self.seen.add_(tokens)
        else:
            self.seen += tokens

    def __repr__(self):
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"MixerState(seen={int(self.seen)}, {shapes})"

    def lazy_initialization(self, key_states, value_states) -> None:
        raise LinearizeError("a converted layer's state holds no keys/values; it is written by its mixer")

    def update(self, key_states, value_states, *args, **kwargs):
        raise LinearizeError(
            "a softmax attention layer tried to write keys/values into a converted layer's state; build the cache "
            "under the same teacher_mode setting the model runs in"
        )

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # Older transformers pass cache_position (a tensor) instead of the query length.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        # No layer reads a mask sized by a static state (the cache sizes masks by its first softmax layer): a
        # constant keeps a compiled step from reading the count.
        return (query_length, 0) if self.static else (query_length + self.seen, 0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.static:
            for tensor in self._tensors.values():
                tensor.zero_()
            self.seen.zero_()
        else:
            self._tensors, self._rooms = {}, {}
            self.seen = 0

    def _apply(self, fn) -> None:
        self._tensors, self._rooms = {k: fn(v) for k, v in self._tensors.items()}, {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise LinearizeError(NO_ROLLBACK)

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        return None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class LinearizedCache(Cache):
    """A cache whose layers follow a converted model's plan.

    `kinds[i]` is "kv" for softmax layers (transformers' own layer cache), "state" for converted layers with one
    fixed-size state updated on the device, and "dynamic" for other converted layers (their state grows). With
    `max_cache_len` the cache is static:
    kv layers are transformers' static layers of that length and fixed-size states are updated in place.
    """

    def __init__(self, text_config, kinds: list[str], max_cache_len: int | None = None):
        if max_cache_len is None:
            kv_layers = [RoomyLayer() if type(layer) is DynamicLayer else layer for layer in DynamicCache(config=text_config).layers]
        else:
            kv_layers = StaticCache(config=text_config, max_cache_len=max_cache_len).layers
        if len(kv_layers) != len(kinds):
            kv_layers = [RoomyLayer() for _ in kinds]
        static = max_cache_len is not None
        layers = [
            kv_layers[i] if kind == "kv" else MixerState(static=static and kind == "state") for i, kind in enumerate(kinds)
        ]
        super().__init__(layers=layers)
        self.kinds = list(kinds)
        # Masks are sized by the first softmax layer's cache: converted layers read no attention mask.
        self._mask_layer = kinds.index("kv") if "kv" in kinds else None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx if self._mask_layer is None else self._mask_layer].get_seq_length()

    def get_mask_sizes(self, query_length, layer_idx: int) -> tuple[int, int]:
        return self.layers[layer_idx if self._mask_layer is None else self._mask_layer].get_mask_sizes(query_length)

    def state_bytes(self) -> list[int]:
        """Bytes held per layer (keys/values for kept layers, state tensors for converted ones). A kept layer's buffer
        has up to `ROOM` more positions allocated (`RoomyLayer`), not counted here."""
        sizes = []
        for layer in self.layers:
            if isinstance(layer, MixerState):
                sizes.append(layer.nbytes())
            else:
                tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
                sizes.append(sum(t.numel() * t.element_size() for t in tensors))
        return sizes
