"""`attention`: keep the teacher's softmax attention layer as it is (for `keep_attention` and hybrids)."""

from __future__ import annotations

from torch import nn

from .attention import AttentionSpec
from .mixers import Mixer, MixerCost, register_mixer
from .plan import ATTENTION


@register_mixer
class KeepAttention(Mixer):
    name = ATTENTION
    anchor = "teacher"
    summary = "keep the teacher's softmax attention layer unchanged"
    state_grows = True

    @classmethod
    def from_attention(cls, attn: nn.Module, config, layer_idx: int, **options) -> nn.Module:
        """Return the teacher module itself: a kept layer is the teacher layer, bit for bit."""
        cls.parse_options(options, AttentionSpec.read(attn, config, layer_idx), config)
        return attn

    @classmethod
    def cost(cls, spec: AttentionSpec, options) -> MixerCost:
        return MixerCost(new_parameters=0, state_fixed=0, state_per_token=2 * spec.num_kv_heads * spec.head_dim)
