"""Every causal-LM family the installed transformers ships, as a tiny random model: the table the family tests run.

The list is read from transformers itself (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), so a new release's families join
the tests without a hand-kept list. Each family's default config is shrunk through the common size names; a
family whose model still holds more than `MAX_PARAMETERS` (a vision tower, an audio codec) or cannot be built
small this way is reported with the reason, not converted.
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tests.tiny import VOCAB

LAYERS = 7  # one layer per mixer in MIXER_LAYOUT
MAX_PARAMETERS = 15_000_000

# Size knobs under the names families use; a knob is set only where the family's default config has it.
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    num_hidden_layers=LAYERS,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    sliding_window=6,
    tie_word_embeddings=False,
    rotary_dim=8,  # GPT-J, CodeGen
    kv_lora_rank=16,  # multi-head latent attention (DeepSeek V2/V3 and kin)
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    d_model=64,  # BART-style decoders
    decoder_layers=LAYERS,
    decoder_attention_heads=4,
    decoder_ffn_dim=96,
    encoder_layers=1,
    encoder_attention_heads=4,
    encoder_ffn_dim=96,
)

# Every mixer once per model, each in its own layer, beside one kept softmax layer: (mixer, options) by layer.
MIXER_LAYOUT = [
    ("attention", {}),
    ("hedgehog", {"feature_dim": 8}),
    ("hedgehog_swa", {"window": 4}),
    ("gla", {"window": 4}),
    ("gated_deltanet", {"conv_size": 3, "window": 4}),
    ("mamba2", {}),
    ("swa", {"window": 4}),
]


def causal_lm_families() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_family_config(model_type: str):
    """(config, None) for a tiny random model of `model_type`, or (None, why it cannot be made tiny); a copy of the
    one built the first time (the table test builds every family's, each family's own test reads it again)."""
    config, why = _tiny_family_config(model_type)
    return copy.deepcopy(config), why


@functools.cache
def _tiny_family_config(model_type: str):
    config_class = CONFIG_MAPPING[model_type]
    try:
        defaults = config_class()
        overrides = {k: v for k, v in SMALL.items() if hasattr(defaults, k)}
        config = config_class(**overrides)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **eager_experts(config))
    except Exception as error:  # any failure here is the family's default config resisting a generic shrink
        return None, f"no tiny config: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        return None, f"still {count:,} parameters after shrinking (parts outside the decoder)"
    if getattr(config, "num_hidden_layers", None) != LAYERS:
        return None, f"its decoder's layer count is not num_hidden_layers (has {getattr(config, 'num_hidden_layers', None)})"
    return config, None


def eager_experts(config) -> dict:
    # Mixture-of-experts layers run their eager loop where transformers offers a choice (5.20 on): the grouped
    # kernels take no float64.
    return {"experts_implementation": "eager"} if hasattr(config, "_experts_implementation") else {}


def tiny_family_model(config) -> torch.nn.Module:
    """The float64 random model of a config from `tiny_family_config`, in eval mode."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, **eager_experts(config)).to(torch.float64).eval()
