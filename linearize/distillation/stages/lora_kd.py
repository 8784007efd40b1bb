"""Stage 2, LoRA knowledge distillation: low-rank adapters on the reused projections, trained to match the teacher.

The teacher is the same model: with the adapters disabled (peft's `disable_adapter()`) and `teacher_mode` on,
it computes exactly the original softmax model, so one copy of the weights serves both. The loss is
KL(teacher || student) of the next-token distributions at a temperature (times temperature squared, so the
gradient scale does not depend on it), plus an optional cross-entropy on the text itself. At the end the
adapters are merged into the projections, and the model saves and reloads without peft.

With `teacher_top_k` the teacher runs once per training window: its top-k distributions are cached on disk and
read back when the window comes again (see linearize.distillation.teacher_logits), and the KL is the sparse one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import nn

from ...config import register_stage
from ...hf.attention import AttentionSpec, attention_slot, decoder_layers
from ...hf.errors import LinearizeError
from ...hf.mixers import mixers_in, teacher_mode
from ..fsdp import is_fsdp
from ..kd import KDHead, chunkable_head, hidden_states_out, kd_losses
from ..loop import TrainConfig, train
from ..session import Session
from ..teacher_logits import KeyedWindows, TeacherLogitCache, cached_teacher_logits, top_k


@dataclass
class LoraKDConfig(TrainConfig):
    """LoRA on the teacher's projections inside converted layers, distilled from the teacher's logits.

    rank, alpha, dropout: the adapters (scale alpha / rank).
    targets: projection names inside each attention module (e.g. [q_proj, v_proj]); empty: every projection
        the mixer reuses (q/k/v/o, or the family's fused equivalents).
    converted_only: adapt only converted layers; false also adapts the layers that kept softmax attention.
    temperature: of both distributions in the KL; kl_weight, ce_weight: the mix of KL and next-token cross-entropy.
    train_new_parameters: also train the parameters the mixers added (feature maps, gates) in this stage.
    merge: merge the adapters at the end (false returns the peft model, e.g. to save the adapters alone).
    kl_chunk: tokens per chunk of the losses, computed from the hidden states through the output head so that no
        batch x sequence x vocabulary logits are ever held (see linearize.distillation.kd); 0 computes them from
        full logits. Each float32 row of a chunk takes kl_chunk x vocabulary x 4 bytes (SmolLM2 at 1,024: 200 MB);
        larger chunks launch fewer kernels (on an H200, SmolLM2's KD ran 1.23x faster at 2,048 than at 256).
        Families whose logits are more than `head(hidden states)` (soft-capping, scaling) and FSDP runs always use
        full logits.
    teacher_top_k: 0 runs the teacher at every step. K > 0 runs it once per training window and caches its K most
        likely tokens and the mass of the rest (K x 4 + 4 bytes a token, K x 6 + 4 past 65,536 tokens of
        vocabulary, in the stage's checkpoint folder); later epochs read them back, and the KL is over those K
        tokens and one bucket for the rest (exact for the teacher's distribution as kept). Not under FSDP.
    """

    flops_per_parameter: ClassVar[int] = 6  # the teacher's forward, the student's forward and its backward

    kind: str = "lora_kd"
    lr: float = 1e-4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)
    converted_only: bool = True
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    train_new_parameters: bool = False
    merge: bool = True
    kl_chunk: int = 1024
    teacher_top_k: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or self.temperature <= 0:
            raise LinearizeError("lora_kd: rank must be at least 1, alpha and temperature positive, dropout in [0, 1)")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise LinearizeError("lora_kd: kl_weight and ce_weight must not be negative, and not both zero")
        if self.kl_chunk < 0:
            raise LinearizeError(f"lora_kd: kl_chunk must be 0 (full logits) or a number of tokens, got {self.kl_chunk}")
        if self.teacher_top_k < 0:
            raise LinearizeError(f"lora_kd: teacher_top_k must be 0 (run the teacher every step) or a number of tokens to cache, e.g. 64; got {self.teacher_top_k}")


def lora_targets(model: nn.Module, config: LoraKDConfig) -> list[str]:
    """Full module names LoRA wraps: the chosen projections of each converted (or every) attention module."""
    names = {id(module): name for name, module in model.named_modules()}
    attentions = [(m.layer_idx, m.attn, m.spec) for m in mixers_in(model)]
    if not config.converted_only:
        text_config = model.config.text_config
        blocks = decoder_layers(model, text_config.num_hidden_layers)
        for index, entry in enumerate(model.config.plan):
            if entry.is_attention:
                attn = getattr(blocks[index], attention_slot(blocks[index]))
                attentions.append((index, attn, AttentionSpec.read(attn, text_config, index)))
    targets = []
    for index, attn, spec in sorted(attentions, key=lambda item: item[0]):
        for leaf in config.targets or spec.projections():
            module = dict(attn.named_modules()).get(leaf)
            if not isinstance(module, nn.Linear):
                have = ", ".join(n for n, m in attn.named_modules() if isinstance(m, nn.Linear))
                raise LinearizeError(f"lora_kd.targets: {leaf!r} is not a linear module of layer {index}'s attention (it has: {have})")
            targets.append(f"{names[id(attn)]}.{leaf}")
    if not targets:
        raise LinearizeError("lora_kd found no layer to adapt: the model has no converted layers; set converted_only=false or convert some layers")
    return targets


def _chunked_head(model: nn.Module, data, config: LoraKDConfig, session: Session) -> KDHead | None:
    """The head the chunked losses go through, or None where they cannot (kl_chunk 0, FSDP, a family whose logits
    are more than head(hidden states), checked on the first training window)."""
    if not config.kl_chunk or is_fsdp(session.accelerator):
        return None
    model.eval()
    probe = data.train.take(0, 1)[:, :64].to(next(model.parameters()).device)
    linear = chunkable_head(model, probe)
    if linear is None:
        session.say(f"stages[{session.stage_index}] (lora_kd): this model's logits are more than its head's output; the losses use full logits")
        return None
    return KDHead(linear.weight, linear.bias, config.kl_chunk, ce_grad=config.ce_weight > 0)


@contextmanager
def _teacher_cache(model: nn.Module, config: LoraKDConfig, session: Session) -> Iterator[TeacherLogitCache | None]:
    """The stage's cache of teacher logits (see linearize.distillation.teacher_logits), None without teacher_top_k."""
    if not config.teacher_top_k:
        yield None
        return
    where = f"stages[{session.stage_index}].teacher_top_k"
    if is_fsdp(session.accelerator):
        raise LinearizeError(f"{where} is not supported under FSDP (the teacher's forward is collective there); run under DDP (recipes/accelerate/ddp.yaml) or set it to 0")
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    if config.teacher_top_k > vocab:
        raise LinearizeError(f"{where}={config.teacher_top_k} is more than the model's {vocab} tokens; use at most {vocab}, or 0 for full logits")
    stage_dir = session.stage_dir(config.kind)
    with cached_teacher_logits(stage_dir, config.teacher_top_k, config.temperature, vocab, session.accelerator.process_index) as cache:
        session.say(f"stages[{session.stage_index}] (lora_kd): teacher top-{config.teacher_top_k} logits cached in {cache.folder} ({len(cache)} windows there)")
        yield cache


def run(model: nn.Module, data, config: LoraKDConfig, session: Session | None = None) -> nn.Module:
    """LoRA knowledge distillation on `data.train`; returns the model with the adapters merged (see `merge`).

    Example:
        >>> student = lora_kd.run(student, data, LoraKDConfig(tokens=4_000_000, rank=16))
    """
    from peft import LoraConfig, get_peft_model

    session = session or Session()
    if not mixers_in(model):
        raise LinearizeError("lora_kd needs a converted model and found no mixers; convert it first with linearize.convert")
    targets = lora_targets(model, config)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, bias="none")
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; the warning is not the user's to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    if config.train_new_parameters:
        own = {id(p) for m in mixers_in(model) for p in m.new_parameters()}
        params.update({name: p for name, p in peft_model.named_parameters() if id(p) in own})

    head = _chunked_head(peft_model, data, config, session)
    # With a chunked head both passes stop at the hidden states the head reads (see linearize.distillation.kd).
    outputs = (lambda: hidden_states_out(peft_model)) if head is not None else nullcontext

    def teacher_pass(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
        # Adapters off, softmax attention on, no dropout: the same weights as the student.
        peft_model.eval()
        with torch.no_grad(), peft_model.disable_adapter(), teacher_mode(peft_model), outputs():
            return model(input_ids=windows, use_cache=False).logits

    # With cached teacher logits, the training windows key each batch on the host as the loop takes it.
    keyed = KeyedWindows(data.train) if config.teacher_top_k and data.train is not None else None

    def step_loss(wrapped: nn.Module, batch: torch.Tensor, weights: torch.Tensor | None):
        # The prepared model brings the mixed precision into its own forward only: the losses' chunked head and the
        # teacher's top-k run outside it, and would multiply in float32 (on the Llama-3.2-1B shape, 55% of a step).
        with session.accelerator.autocast():
            return losses(wrapped, batch, weights)

    def losses(wrapped: nn.Module, batch: torch.Tensor, weights: torch.Tensor | None):
        metrics = {}
        if cache is None:
            # Through the prepared model: under FSDP only its forward gathers the weights. It brings the autocast.
            teacher = teacher_pass(wrapped, batch)
        else:
            # The windows not cached yet differ between processes, so their teacher runs on the unwrapped model
            # (which has the autocast too): a DDP forward broadcasts buffers, a collective every process must join.
            teacher, cached = cache.get(batch, lambda windows: top_k(teacher_pass(peft_model, windows), config.teacher_top_k, config.temperature, head), keyed.keys)
            metrics["cached"] = torch.full((), cached / batch.shape[0], device=batch.device)  # a fill: no copy to wait for
        peft_model.train()
        with outputs():
            student_out = wrapped(input_ids=batch, use_cache=False).logits
        kl, ce = kd_losses(student_out, teacher, batch, config.temperature, head, weights)
        loss = config.kl_weight * kl + config.ce_weight * ce
        return loss, {"kl": kl.detach(), "ce": ce.detach(), **metrics}

    where = f"stages[{session.stage_index}] (lora_kd)"
    session.say(f"{where}: rank-{config.rank} LoRA on {len(targets)} projections, {sum(p.numel() for p in params.values()):,} trainable parameters")
    with _teacher_cache(peft_model, config, session) as cache:
        report = train(peft_model, data if keyed is None else replace(data, train=keyed), config, session, params, step_loss)
        if cache is not None:
            cache.flush()
            report["teacher_logits"] = {"top_k": config.teacher_top_k, "windows": len(cache), "bytes": cache.disk_bytes()}
    report["targets"] = len(targets)
    session.reports.append(report)
    if not config.merge:
        return peft_model
    merged = peft_model.merge_and_unload()
    merged.config.tuned_projections = True
    return merged


register_stage("lora_kd", LoraKDConfig, run)
