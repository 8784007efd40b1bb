"""What a converted model is made of, per layer, read without loading its weights; and the mixer catalogue."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .hf.attention import AttentionSpec, attention_slot, decoder_layers
from .hf.configuration_linearized import LinearizedConfig
from .hf.errors import LinearizeError
from .hf.mixers import MIXERS, MixerCost
from .hf.modeling_linearized import LinearizedForCausalLM
from .loaders import check_weights, read_config_file


@dataclass(frozen=True)
class LayerInfo:
    index: int
    mixer: str
    options: dict
    new_parameters: int
    state_bytes: int
    state_bytes_per_token: int
    cuda_path: str = ""

    @property
    def grows_with_context(self) -> bool:
        return self.state_bytes_per_token > 0


def read_config(folder: str | Path) -> LinearizedConfig:
    """The LinearizedConfig of a saved converted model; anything else is a one-line error."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LinearizeError(f"{str(folder)!r} has no config.json; give the folder written by `linearize convert` or save_pretrained")
    model_type = read_config_file(Path(folder)).get("model_type")
    if model_type != LinearizedConfig.model_type:
        raise LinearizeError(
            f"{str(folder)!r} holds a {model_type!r} model, not a converted one; convert it first with `linearize convert {folder} --out DIR`"
        )
    check_weights(Path(folder))
    return LinearizedConfig.from_pretrained(folder, local_files_only=True)


def describe(model_or_folder, dtype_bytes: int | None = None) -> list[LayerInfo]:
    """Per layer: mixer, options, parameters it added, state bytes for one sequence (fixed, and per token of context)."""
    if isinstance(model_or_folder, LinearizedForCausalLM) or hasattr(model_or_folder, "config") and hasattr(model_or_folder, "model"):
        model = model_or_folder
        config = model.config
    else:
        config = read_config(model_or_folder)
        with torch.device("meta"):
            model = LinearizedForCausalLM(config)
    text = config.text_config
    dtype = getattr(torch, str(config.dtype or "float32").replace("torch.", ""))
    if dtype_bytes is None:
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
    infos = []
    for index, (layer, entry) in enumerate(zip(decoder_layers(model.model, text.num_hidden_layers), config.plan)):
        module = getattr(layer, attention_slot(layer))
        if getattr(module, "is_linearize_mixer", False):
            cost = type(module).cost(module.spec, module.options)
            added = sum(p.numel() for p in module.new_parameters())
            options = module.options_dict()
        else:
            cost = MIXERS[entry.mixer].cost(AttentionSpec.read(module, text, index), None)
            added, options = 0, {}
        if entry.is_attention:
            where = f"teacher attention ({text._attn_implementation or 'sdpa'})"
        else:
            where = module.cuda_path(dtype)
        infos.append(LayerInfo(index, entry.mixer, options, added, cost.state_fixed * dtype_bytes, cost.state_per_token * dtype_bytes, where))
    return infos


# The catalogue shows costs for one reference shape: SmolLM2-135M's attention (9 query heads, 3 KV heads of 64).
REFERENCE_SHAPE = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192)


@dataclass(frozen=True)
class MixerEntry:
    name: str
    anchor: str
    summary: str
    cost: MixerCost
    options: dict


def catalogue() -> list[MixerEntry]:
    """Every registered mixer with its per-layer cost at default options on the reference shape."""
    from transformers import LlamaConfig

    config = LlamaConfig(**REFERENCE_SHAPE, num_hidden_layers=1, intermediate_size=1536, vocab_size=64)
    spec = AttentionSpec(
        layout="separate",
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        output="o_proj",
        q_norm=None,
        k_norm=None,
        norm_per_head=True,
        scaling=config.head_dim**-0.5,
        sliding_window=None,
        softcap=None,
    )
    entries = []
    for name, cls in sorted(MIXERS.items()):
        options = cls.parse_options({}, spec, config)
        fields = vars(options) if options is not None else {}
        entries.append(MixerEntry(name, cls.anchor, cls.summary, cls.cost(spec, options), dict(fields)))
    return entries
