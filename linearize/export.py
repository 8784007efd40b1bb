"""Export a converted model to an architecture transformers ships natively, so that serving engines run it and
no remote code is needed: `linearize export DIR --to qwen3_5 --out OUT` (or `--to bamba`).

A target is a native hybrid architecture and the mixers whose layers are exactly its layers. Export maps the
student's weights onto the target's, builds the native model, checks on a short random input that its logits are
the student's, and writes a folder `AutoModelForCausalLM.from_pretrained` loads without linearize (config.json,
model.safetensors, tokenizer, generation_config.json, export.json with the check's figures).

Targets:
- `qwen3_5` (`Qwen3_5ForCausalLM`, transformers >= 5.17; served by vLLM and SGLang): layers `qwen3_5_gdn` become
  its Gated DeltaNet (`linear_attention`) layers, `qwen3_5_attention` its gated softmax (`full_attention`) layers;
  a kept teacher `attention` layer exports too where the teacher has per-head q/k norms (Qwen3). The teacher must
  be a Llama-shaped decoder (llama, mistral without sliding windows, qwen3): pre-norm RMSNorm blocks, a SwiGLU MLP,
  projections without bias.
- `bamba` (`BambaForCausalLM`, transformers >= 5.23): layers `bamba_mamba2` become its Mamba-2 layers (one group per
  head, d_state = head_dim), and the teacher's kept `attention` layers its attention layers, which are a Llama
  layer's (q/k/v/o without norms or gate, RoPE over the whole head). The teacher must be llama or mistral (without
  sliding windows), with head_dim * heads = hidden_size. Before 5.23, transformers' bamba normalises the Mamba-2
  output over all heads at once instead of per group, so older versions compute another function.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from .hf.attention import attention_slot, decoder_layers
from .hf.errors import LinearizeError
from .hf.mixers import mixers_in
from .hf.plan import ATTENTION
from .outputs import atomic_folder

# The largest relative logit difference export accepts in float32. Both models compute the same function in
# different orders (and qwen3_5 computes its norms and RoPE in float32 even for float64 weights): on SmolLM2-135M
# (30 layers) the two differ by 1e-5 to 4e-5, as much as the student differs from itself between a padded and an
# unpadded batch (3.6e-5); on the tiny test models, by under 1e-6. For bamba (SmolLM2-135M converted, every fourth
# layer kept): 4e-6, and 9e-6 on a left-padded batch.
FLOAT32_TOLERANCE = 1e-4
# Checked on CUDA with fla on both sides, float32 runs through TF32 matmuls: a tiny student differed by 1.45e-4
# (H200, fla 0.6.0), as fla's kernels differ from the PyTorch reference (tests/test_gpu.py allows 5e-3).
CUDA_FLOAT32_TOLERANCE = 5e-3

# Files of a converted folder that describe how it was made and travel with the export.
CARRIED = ("recipe.yaml", "results.json", "generation_config.json")


@dataclass(frozen=True)
class Target:
    """A native architecture a student can become: its name, the transformers class, the mixers it holds, and what a
    student needs to become it."""

    name: str
    architecture: str
    mixers: tuple[str, ...]  # the mixers whose layers are its layers, for a teacher of any of `families`
    families: tuple[str, ...]
    engines: tuple[tuple[str, str, str], ...]  # (engine, which versions serve it and how that is known, command line)
    recurrent: str  # the mixer of its recurrent layers; transformers cannot generate from those alone
    recurrent_label: str
    keep: str  # how a student keeps a softmax layer it can hold
    recipe: str  # the shipped recipe whose students it holds
    own_attention: tuple[str, ...] = ()  # families whose kept `attention` layers it holds too
    min_transformers: tuple[int, int] = (5, 17)  # the oldest transformers whose class computes the student's function
    # A package whose Triton kernels transformers' class calls whenever it is installed, whatever the tensors' device
    # (qwen3_5 with flash-linear-attention): with it installed, a CPU student is checked on CUDA.
    device_blind_kernels: str | None = None


QWEN3_5 = Target(
    name="qwen3_5",
    architecture="Qwen3_5ForCausalLM",
    mixers=("qwen3_5_gdn", "qwen3_5_attention"),
    families=("llama", "mistral", "qwen3"),
    engines=(
        ("transformers", ">= 5.17 (tested by linearize's suite, oldest and newest)", "AutoModelForCausalLM.from_pretrained(PATH)"),
        ("vLLM", ">= 0.17.0 (Qwen3.5 support per its release notes; not tested by linearize)", "vllm serve PATH"),
        ("SGLang", "a release with Qwen3.5 support (not tested by linearize)", "python -m sglang.launch_server --model-path PATH"),
    ),
    recurrent="qwen3_5_gdn",
    recurrent_label="Gated DeltaNet",
    keep="qwen3_5_attention (convert.keep_attention with keep_as)",
    recipe="hybrid_qwen3_5",
    own_attention=("qwen3",),
    device_blind_kernels="fla",
)
BAMBA = Target(
    name="bamba",
    architecture="BambaForCausalLM",
    mixers=("bamba_mamba2", ATTENTION),
    families=("llama", "mistral"),
    engines=(("transformers", ">= 5.23 (tested by linearize's suite on 5.24)", "AutoModelForCausalLM.from_pretrained(PATH)"),),
    recurrent="bamba_mamba2",
    recurrent_label="Mamba-2",
    keep="the teacher's attention (convert.keep_attention)",
    recipe="hybrid_bamba",
    min_transformers=(5, 23),
)
TARGETS = {target.name: target for target in (QWEN3_5, BAMBA)}
INSTALLED_TRANSFORMERS = tuple(int(part) for part in transformers.__version__.split(".")[:2])


EXPORT_FILE = "export.json"
EXPORT_FORMAT = "linearize-export"
EXPORT_VERSION = 1


@dataclass(frozen=True)
class ExportRecord:
    """What push and the card read of an exported folder's export.json: the target (its architecture and the
    engines that serve it come from linearize.export.TARGETS), the layer types, and the export's logit check."""

    target: Target
    layer_types: tuple[str, ...]
    dtype: str = ""
    logit_difference: float | None = None
    teacher: str | None = None  # the student's teacher, where export.json records it

    @classmethod
    def read(cls, folder: Path) -> ExportRecord | None:
        """The record of an exported folder; None for any other folder (no export.json, or another tool's)."""
        path = folder / EXPORT_FILE
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError, OSError):
            return None
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            return None
        if data.get("version") != EXPORT_VERSION or data.get("target") not in TARGETS:
            raise LinearizeError(
                f"{str(path)!r} is an export (version {data.get('version')}, target {data.get('target')!r}) this linearize "
                f"does not read (version {EXPORT_VERSION}, targets {', '.join(sorted(TARGETS))}): upgrade linearize"
            )
        teacher, difference = data.get("teacher"), data.get("logit_difference")
        return cls(
            target=TARGETS[data["target"]],
            layer_types=tuple(data.get("layer_types") or ()),
            dtype=str(data.get("dtype") or ""),
            logit_difference=float(difference) if isinstance(difference, (int, float)) else None,
            teacher=teacher if isinstance(teacher, str) else None,
        )


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise LinearizeError(f"unknown export target {name!r}; available: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def check_exportable(model: nn.Module, target: Target) -> None:
    """Refuse, in one line, a student the target cannot express: the teacher's family and structure, then each layer."""
    text = model.config.text_config
    family = text.model_type
    if family not in target.families:
        raise LinearizeError(
            f"{target.name} export needs a teacher of family {', '.join(target.families)}; this student's teacher is "
            f"{family!r}, whose blocks {target.name} cannot express"
        )
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False) or text.hidden_act != "silu":
        raise LinearizeError(f"{target.name} export needs projections without bias and a SiLU MLP; this {family} teacher has bias or {text.hidden_act!r}")
    if getattr(text, "sliding_window", None) and family == "mistral":
        raise LinearizeError(f"{target.name} has no sliding-window attention; this mistral teacher slides over {text.sliding_window} tokens")
    if any(name.endswith("lora_A") or "base_layer" in name for name, _ in model.named_modules()):
        raise LinearizeError("the model still holds LoRA adapters; merge them first (model.merge_and_unload()) or export the saved folder")
    wrong = {}
    for index, entry in enumerate(model.config.plan):
        fits = entry.mixer in target.mixers or (entry.mixer == ATTENTION and family in target.own_attention)
        if not fits:
            wrong.setdefault(entry.mixer, []).append(index)
    if all(entry.mixer == target.recurrent for entry in model.config.plan):
        raise LinearizeError(
            f"{target.name} in transformers cannot generate when every layer is {target.recurrent_label} (its cache needs an "
            f"attention layer to count tokens); keep at least one layer as {target.keep}"
        )
    if wrong:
        listed = "; ".join(f"layers {', '.join(map(str, layers))} ({mixer})" for mixer, layers in wrong.items())
        raise LinearizeError(f"{target.name} cannot express {listed}; convert with mixers {' and '.join(target.mixers)} (the recipe {target.recipe})")
    for name in ("conv_size", "eps"):
        values = {entry.options[name] for entry in model.config.plan if name in entry.options}
        if name == "eps":
            values.add(float(text.rms_norm_eps))
        if len(values) > 1:
            raise LinearizeError(
                f"{target.name} holds one {name} for every layer (and the model's norms); this student's layers have {sorted(values)}; convert with one value"
            )


def _repeat_heads(weight: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Rows of `heads` head blocks, each repeated `groups` times in place (kv heads expanded to query heads)."""
    return weight.reshape(heads, -1, *weight.shape[1:]).repeat_interleave(groups, dim=0).reshape(-1, *weight.shape[1:])


def _zero_centred(weight: torch.Tensor) -> torch.Tensor:
    """A Llama-style RMSNorm weight w as qwen3_5's (1 + w') form: w' = w - 1."""
    return weight - 1.0


def _rope_parameters(text) -> dict:
    """The teacher's RoPE as a native config's `rope_parameters`, rotating the whole head as the teacher does."""
    rope = dict(getattr(text, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(text, "rope_theta", 10000.0)})
    rope.setdefault("partial_rotary_factor", 1.0)
    return rope


def qwen3_5_config(model: nn.Module) -> Any:
    """The `Qwen3_5TextConfig` of the exported model: the teacher's sizes, one layer type per plan entry."""
    from transformers import Qwen3_5TextConfig

    text = model.config.text_config
    spec = mixers_in(model)[0].spec  # the teacher's attention as linearize read it (a plan converts some layer)
    heads, kv_heads, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    conv = next((entry.options["conv_size"] for entry in model.config.plan if "conv_size" in entry.options), 4)
    return Qwen3_5TextConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        rope_parameters=_rope_parameters(text),
        attention_bias=False,
        linear_conv_kernel_dim=conv,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_num_key_heads=heads,
        linear_num_value_heads=heads,
        layer_types=["linear_attention" if entry.mixer == "qwen3_5_gdn" else "full_attention" for entry in model.config.plan],
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        dtype=next(model.parameters()).dtype,
    )


def qwen3_5_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's weights under the names and layouts of `Qwen3_5ForCausalLM` (see the module docstring)."""
    text = model.config.text_config
    inner = model.model  # the teacher's causal LM, its attention replaced
    out = {
        "model.embed_tokens.weight": inner.get_input_embeddings().weight,
        "model.norm.weight": _zero_centred(inner.model.norm.weight),
        "lm_head.weight": inner.get_output_embeddings().weight,  # listed when tied too, as the state dict lists it
    }
    for index, block in enumerate(decoder_layers(inner, text.num_hidden_layers)):
        prefix = f"model.layers.{index}."
        out[prefix + "input_layernorm.weight"] = _zero_centred(block.input_layernorm.weight)
        out[prefix + "post_attention_layernorm.weight"] = _zero_centred(block.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{prefix}mlp.{name}.weight"] = getattr(block.mlp, name).weight
        module = getattr(block, attention_slot(block))
        if getattr(module, "name", None) == "qwen3_5_gdn":
            out.update({prefix + "linear_attn." + k: v for k, v in _gated_deltanet(module).items()})
        else:
            out.update({prefix + "self_attn." + k: v for k, v in _gated_attention(module, text).items()})
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def _gated_deltanet(mixer: nn.Module) -> dict[str, torch.Tensor]:
    spec, attn = mixer.spec, mixer.attn
    h, hkv, d, groups = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.groups
    conv_q, conv_k, conv_v = mixer.conv_weight.split((h * d, hkv * d, hkv * d))
    return {
        "in_proj_qkv.weight": torch.cat(
            (attn.q_proj.weight, _repeat_heads(attn.k_proj.weight, hkv, groups), _repeat_heads(attn.v_proj.weight, hkv, groups))
        ),
        "conv1d.weight": torch.cat((conv_q, _repeat_heads(conv_k, hkv, groups), _repeat_heads(conv_v, hkv, groups)))[:, None, :],
        "in_proj_z.weight": mixer.z_proj.weight,
        "in_proj_b.weight": mixer.b_proj.weight,
        "in_proj_a.weight": mixer.a_proj.weight,
        "A_log": mixer.A_log,
        "dt_bias": mixer.dt_bias,
        "norm.weight": mixer.norm_weight,
        "out_proj.weight": attn.o_proj.weight,
    }


def _gated_attention(module: nn.Module, text) -> dict[str, torch.Tensor]:
    """A `qwen3_5_attention` mixer, or a kept Qwen3 attention layer (gate 0, norms its own)."""
    is_mixer = getattr(module, "name", None) == "qwen3_5_attention"
    attn = module.attn if is_mixer else module
    q = attn.q_proj.weight
    heads = text.num_attention_heads
    gate = module.gate_proj.weight if is_mixer else torch.zeros_like(q)
    if is_mixer and module.spec.q_norm is None:
        q_norm, k_norm = module.q_norm_weight, module.k_norm_weight
    else:
        q_norm, k_norm = _zero_centred(attn.q_norm.weight), _zero_centred(attn.k_norm.weight)
    # qwen3_5 packs each head's query rows and then its gate rows into q_proj; its gate is sigmoid(g), the
    # mixer's 2 * sigmoid(g) (a kept layer's: 2 * sigmoid(0) = 1), so o_proj takes the 2.
    packed = torch.stack((q.reshape(heads, -1, q.shape[-1]), gate.reshape(heads, -1, q.shape[-1])), dim=1)
    return {
        "q_proj.weight": packed.reshape(-1, q.shape[-1]),
        "k_proj.weight": attn.k_proj.weight,
        "v_proj.weight": attn.v_proj.weight,
        "o_proj.weight": 2.0 * attn.o_proj.weight,
        "q_norm.weight": q_norm,
        "k_norm.weight": k_norm,
    }


def bamba_config(model: nn.Module) -> Any:
    """The `BambaConfig` of the exported model: the teacher's sizes, RoPE over the whole head (bamba's default rotates
    half), Mamba-2 layers of one group per head with d_state = head_dim, attention at the kept layers. The step limit
    stays (0, inf): bamba clamps dt to it in a prefill but not when decoding, and only that limit clamps nothing."""
    from transformers import BambaConfig

    text = model.config.text_config
    spec = mixers_in(model)[0].spec
    heads, head_dim = spec.num_heads, spec.head_dim
    if heads * head_dim != text.hidden_size:
        raise LinearizeError(
            f"bamba's attention heads are hidden_size / heads wide; this {text.model_type} teacher has {heads} heads of "
            f"{head_dim} for a hidden size of {text.hidden_size}, which bamba cannot express"
        )
    conv = next((entry.options["conv_size"] for entry in model.config.plan if "conv_size" in entry.options), 4)
    return BambaConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=spec.num_kv_heads,
        hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        rope_parameters=_rope_parameters(text),
        attn_layer_indices=[index for index, entry in enumerate(model.config.plan) if entry.mixer == ATTENTION],
        mamba_n_heads=heads,
        mamba_d_head=head_dim,
        mamba_n_groups=heads,
        mamba_d_state=head_dim,
        mamba_d_conv=conv,
        mamba_expand=1,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        time_step_limit=(0.0, float("inf")),
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        dtype=next(model.parameters()).dtype,
    )


def bamba_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's weights under the names and layouts of `BambaForCausalLM` (see the module docstring)."""
    text = model.config.text_config
    inner = model.model
    out = {
        "model.embed_tokens.weight": inner.get_input_embeddings().weight,
        "model.final_layernorm.weight": inner.model.norm.weight,
        "lm_head.weight": inner.get_output_embeddings().weight,
    }
    for index, block in enumerate(decoder_layers(inner, text.num_hidden_layers)):
        prefix = f"model.layers.{index}."
        out[prefix + "input_layernorm.weight"] = block.input_layernorm.weight
        out[prefix + "pre_ff_layernorm.weight"] = block.post_attention_layernorm.weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{prefix}feed_forward.{name}.weight"] = getattr(block.mlp, name).weight
        module = getattr(block, attention_slot(block))
        if getattr(module, "name", None) == "bamba_mamba2":
            out.update({prefix + "mamba." + k: v for k, v in _mamba2(module).items()})
        else:
            out.update({f"{prefix}self_attn.{name}.weight": getattr(module, name).weight for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def _mamba2(mixer: nn.Module) -> dict[str, torch.Tensor]:
    """A `bamba_mamba2` mixer as bamba's Mamba-2 layer: in_proj stacks the gate z, x (v), B (k), C (q) and dt rows."""
    spec, attn = mixer.spec, mixer.attn
    hkv, groups = spec.num_kv_heads, spec.groups
    x, b = _repeat_heads(attn.v_proj.weight, hkv, groups), _repeat_heads(attn.k_proj.weight, hkv, groups)
    return {
        "in_proj.weight": torch.cat((mixer.z_proj.weight, x, b, attn.q_proj.weight, mixer.dt_proj.weight)),
        "conv1d.weight": mixer.conv_weight[:, None, :],
        "conv1d.bias": mixer.conv_bias,
        "dt_bias": mixer.dt_bias,
        "A_log": mixer.A_log,
        "D": mixer.D,
        "norm.weight": mixer.norm_weight.reshape(-1),
        "out_proj.weight": attn.o_proj.weight,
    }


BUILDERS = {QWEN3_5.name: (qwen3_5_config, qwen3_5_state_dict), BAMBA.name: (bamba_config, bamba_state_dict)}


def build_native(model: nn.Module, to: str = "qwen3_5") -> nn.Module:
    """The native model equal to `model` (a converted student), in its dtype and on its device, in eval mode."""
    from transformers import AutoModelForCausalLM

    target = get_target(to)
    check_exportable(model, target)
    make_config, make_weights = BUILDERS[target.name]
    config = make_config(model)
    # The student fits the target; older transformers build the target's class but compute another function.
    if INSTALLED_TRANSFORMERS < target.min_transformers:
        raise LinearizeError(
            f"{target.name} export needs transformers >= {'.'.join(map(str, target.min_transformers))}, whose {target.architecture} "
            f"computes what the student does; this is transformers {transformers.__version__}: pip install -U transformers"
        )
    parameter = next(model.parameters())
    native = AutoModelForCausalLM.from_config(config, dtype=parameter.dtype).to(parameter.device)
    native.load_state_dict(make_weights(model), strict=True)
    if getattr(model, "generation_config", None) is not None:
        native.generation_config = model.generation_config
    return native.eval()


def check_device(model: nn.Module, target: Target) -> torch.device:
    """Where the exported model's logits are checked: the student's device, but CUDA for a CPU student where the
    target's class would call installed Triton kernels on CPU tensors (which fails)."""
    device = next(model.parameters()).device
    package = target.device_blind_kernels
    if device.type != "cpu" or package is None or importlib.util.find_spec(package) is None:
        return device
    if not torch.cuda.is_available():
        raise LinearizeError(
            f"transformers' {target.architecture} calls {package}'s GPU kernels whenever {package} is installed, and this "
            f"machine has no GPU: export where {package} is not installed (pip uninstall flash-linear-attention fla-core)"
        )
    return torch.device("cuda")


@torch.no_grad()
def compare_logits(student: nn.Module, native: nn.Module, length: int = 24, seed: int = 0) -> float:
    """Relative difference ||native - student|| / ||student|| of the two models' logits on `length` random tokens."""
    vocab = student.config.text_config.vocab_size
    device = next(student.parameters()).device
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)
    a = student(input_ids=ids, use_cache=False).logits.float()
    b = native(input_ids=ids, use_cache=False).logits.float()
    return ((b - a).norm() / a.norm()).item()


def export(
    source: str | Path | nn.Module,
    out: str | Path,
    to: str = "qwen3_5",
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    tolerance: float | None = None,
    log=print,
) -> Path:
    """Write the student `source` (a converted folder, or a converted model with its `tokenizer`) as the native
    architecture `to` into `out`, after checking that the native model's logits equal the student's (relative
    difference at most `tolerance`: default FLOAT32_TOLERANCE in float32 and float64, CUDA_FLOAT32_TOLERANCE where the
    check runs on CUDA's TF32 kernels, 1e-2 in bfloat16/float16).

    Example:
        >>> linearize.export("out/hybrid_qwen3_5", "out/hybrid_qwen3_5-native")   # then: vllm serve out/hybrid_qwen3_5-native
    """
    from .loaders import load_teacher

    target = get_target(to)
    folder = None
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise LinearizeError(f"{str(folder)!r} is not a saved model folder (no config.json); pass the folder `linearize run` wrote")
        model, tokenizer = load_teacher(str(folder))
    else:
        model = source
    if getattr(model.config, "model_type", None) != "linearized":
        raise LinearizeError("export takes a converted model (a linearize folder or LinearizedForCausalLM); convert and distill the teacher first")
    started = time.time()
    native = build_native(model, target.name)
    parameter = next(model.parameters())
    dtype, home, device = parameter.dtype, parameter.device, check_device(model, target)
    exact = CUDA_FLOAT32_TOLERANCE if device.type == "cuda" else FLOAT32_TOLERANCE
    limit = tolerance if tolerance is not None else (exact if dtype in (torch.float32, torch.float64) else 1e-2)
    difference = compare_logits(model.to(device), native.to(device))
    model.to(home)
    native.to(home)
    if not difference <= limit:
        raise LinearizeError(
            f"the exported {target.name} model's logits differ from the student's by {difference:.2e} (limit {limit:g}); "
            "this is a bug in linearize's export: please report it with the folder's config.json"
        )
    log(f"{target.architecture}: logits differ from the student's by {difference:.2e} (relative, {dtype}, on {device.type})")
    with atomic_folder(out, overwrite) as staging:
        native.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if folder is not None:
            for name in CARRIED:
                if (folder / name).is_file() and not (staging / name).exists():
                    shutil.copyfile(folder / name, staging / name)
        record = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "target": target.name,
            "architecture": target.architecture,
            "source": str(folder) if folder is not None else getattr(model.config, "source", None),
            "teacher": getattr(model.config, "source", None),
            "layer_types": native.config.layer_types,
            "dtype": str(dtype).removeprefix("torch."),
            "logit_difference": difference,
            "checked_on": device.type,
            "seconds": round(time.time() - started, 2),
            "engines": [{"engine": e, "versions": v, "command": c} for e, v, c in target.engines],
        }
        (staging / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)
