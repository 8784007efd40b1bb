"""Sliding-window softmax attention: the teacher's own attention restricted to the last `window` keys.

It adds no parameters and keeps a bounded window KV cache, a cheap layer for hybrids (the local-attention
half of Liger attention, or of SWA hybrids in general). The window itself lives in `windows`, shared with the
mixers that mix it into their linear heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention import AttentionSpec
from .mixers import Mixer, MixerCost, register_mixer
from .windows import check_window, effective_window, sliding_window_heads, window_cache_size


@dataclass
class SWAOptions:
    """window: how many of the latest keys (the current one included) each query attends to."""

    window: int = 128


@register_mixer
class SWAMixer(Mixer):
    name = "swa"
    anchor = "sliding window"
    summary = "the teacher's softmax attention over the last `window` keys, bounded KV cache, no new parameters"
    Options = SWAOptions

    def __init__(self, attn, spec: AttentionSpec, options, layer_idx: int):
        super().__init__(attn, spec, options, layer_idx)
        self.window = effective_window(options.window, spec)

    @classmethod
    def resolve(cls, options, spec: AttentionSpec, config):
        check_window(options.window, config, cls.name)
        return options

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        state = window_cache_size(effective_window(options.window, spec), spec)
        return MixerCost(new_parameters=0, state_fixed=state, state_per_token=0)

    def mix(self, hidden_states, q, k, v, position_embeddings, padding_mask, state):
        cache = None if state is None else state.tensors
        heads, cache = sliding_window_heads(self.spec, self.window, q, k, v, position_embeddings, padding_mask, cache)
        if state is not None:
            state.write(cache)
        return heads
