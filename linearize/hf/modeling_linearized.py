"""The converted model: the teacher's own causal LM with its attention layers replaced as the plan says.

Saved folders carry this file and its siblings, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works where linearize is not installed, and `import linearize` registers the same
classes so no remote code is needed where it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache

from .attention import attention_slot, decoder_layers
from .cache import LinearizedCache, cache_keyword
from .configuration_linearized import LinearizedConfig
from .errors import LinearizeError
from .mixer_attention import KeepAttention  # noqa: F401  (importing a mixer file registers it)
from .mixer_gated_deltanet import GatedDeltaNetMixer  # noqa: F401
from .mixer_gla import GLAMixer  # noqa: F401
from .mixer_hedgehog import HedgehogMixer  # noqa: F401
from .mixer_mamba2 import Mamba2Mixer  # noqa: F401
from .mixer_swa import SWAMixer  # noqa: F401
from .mixers import MIXERS, PADDING_MASK, get_mixer, mixers_in


def apply_plan(model: nn.Module, text_config, plan: list[dict[str, Any]]) -> list[str]:
    """Replace each decoder layer's attention as `plan` says; build every replacement before changing anything.

    Returns the attention slot names that were replaced. Raises LinearizeError (model untouched) on a bad plan.
    """
    layers = decoder_layers(model, text_config.num_hidden_layers)
    if len(plan) != len(layers):
        raise LinearizeError(f"the plan has {len(plan)} layers but the model has {len(layers)}; rebuild the plan for this model")
    built = []
    for index, (layer, entry) in enumerate(zip(layers, plan)):
        slot = attention_slot(layer, where=f"layer {index}: ")
        mixer = get_mixer(entry["mixer"]).from_attention(getattr(layer, slot), text_config, index, **entry.get("options", {}))
        built.append((layer, slot, mixer))
    for layer, slot, mixer in built:
        setattr(layer, slot, mixer)
    return [slot for _, slot, _ in built]


# The kernel choices a caller may request at load time (`experts_implementation` exists from transformers 5.20).
IMPLEMENTATIONS = ("_attn_implementation", "_experts_implementation")


class LinearizedForCausalLM(PreTrainedModel, GenerationMixin):
    """A teacher causal LM (`self.model`) whose attention layers follow `config.layers`.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("out/smollm2-hedgehog")   # after `import linearize`
        >>> model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)
    """

    config_class = LinearizedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # A recurrent state cannot be rolled back, so generate() refuses assisted decoding up front.
    _is_stateful = True

    def __init__(self, config: LinearizedConfig, model: PreTrainedModel | None = None):
        # What the caller asked for (None unless `attn_implementation=` or `experts_implementation=` was given);
        # read before PreTrainedModel resolves its own defaults, which the teacher's family may not support (Gemma 2
        # refuses SDPA). The teacher's family then picks its own default for what was not asked for.
        requested = {name: getattr(config, name, None) for name in IMPLEMENTATIONS}
        super().__init__(config)
        if model is None:
            for name, value in requested.items():
                if hasattr(config.text_config, name):
                    setattr(config.text_config, name, value)
            model = AutoModelForCausalLM.from_config(config.text_config)
            apply_plan(model, config.text_config, config.layers)
        for name in IMPLEMENTATIONS:
            if hasattr(model.config, name):
                setattr(config, name, getattr(model.config, name))
        self.model = model
        self._cache_keyword = cache_keyword(model)
        if getattr(model, "generation_config", None) is not None:
            self.generation_config = model.generation_config
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a plain DynamicCache: forward() builds the per-layer LinearizedCache.
        return False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if "size mismatch" in str(error) or "mismatch" in str(error).lower():
                raise LinearizeError(
                    f"this checkpoint's weights do not match the plan in its config.json ({str(error).splitlines()[0][:160]}); "
                    "re-convert the teacher, or restore the config.json saved with these weights"
                ) from None
            raise
        problems = [f"missing {k}" for k in info.get("missing_keys", [])] + [
            f"unexpected {k}" for k in info.get("unexpected_keys", [])
        ]
        problems += [f"mismatched {k[0] if isinstance(k, tuple) else k}" for k in info.get("mismatched_keys", [])]
        if problems:
            shown = ", ".join(sorted(problems)[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise LinearizeError(
                f"this checkpoint's weights do not match the plan in its config.json ({shown}); re-convert the teacher, "
                "or restore the config.json saved with these weights"
            )
        return (model, info) if want_info else model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

    def cache_kinds(self) -> list[str]:
        """Per layer: "kv" for softmax attention (kept, or any layer under teacher_mode), "state" otherwise."""
        if getattr(self, "_mixer_list", None) is None:  # walked once: every forward asks, decode steps included
            self._mixer_list = mixers_in(self)
        teacher = any(m.teacher for m in self._mixer_list)
        return ["kv" if teacher or e["mixer"] == "attention" else "state" for e in self.config.layers]

    def new_cache(self) -> LinearizedCache:
        """An empty cache with the right kind of storage for every layer."""
        return LinearizedCache(self.config.text_config, self.cache_kinds())

    def _checked_cache(self, cache: Cache | None, use_cache: bool) -> Cache | None:
        if cache is None:
            return self.new_cache() if use_cache else None
        if isinstance(cache, LinearizedCache) or getattr(cache, "kinds", None) is not None:
            if cache.kinds != self.cache_kinds():
                raise LinearizeError(
                    "this cache was built for another mode (teacher_mode on/off) or model; start generation with a fresh cache"
                )
            return cache
        if cache.get_seq_length() == 0:
            return self.new_cache()
        raise LinearizeError(
            f"a filled {type(cache).__name__} cannot serve a converted model; pass no cache and the model builds its own"
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        """The teacher's forward with this model's cache. `cache` is `past_key_values` before transformers 5.24;
        either name is taken, and the inner model gets the one the installed version expects."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise LinearizeError("got both cache and past_key_values; pass the cache once, as cache")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = self._checked_cache(cache if cache is not None else past_key_values, use_cache)
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, -length:].all()):
            kwargs[PADDING_MASK] = attention_mask[:, -length:].bool()
        kwargs[self._cache_keyword] = cache
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


def register_auto_classes() -> None:
    """Let `AutoConfig`/`AutoModelForCausalLM` resolve model_type "linearized" without remote code."""
    AutoConfig.register(LinearizedConfig.model_type, LinearizedConfig, exist_ok=True)
    AutoModelForCausalLM.register(LinearizedConfig, LinearizedForCausalLM, exist_ok=True)


LinearizedConfig.register_for_auto_class()
LinearizedForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LinearizedConfig", "LinearizedForCausalLM", "MIXERS", "apply_plan", "register_auto_classes"]
