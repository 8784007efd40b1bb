"""The training loop every stage shares, written the accelerate way.

The same code runs on CPU, on one GPU and on several under `accelerate launch` (DDP or FSDP): the model is
prepared by the Accelerator, micro-batches accumulate gradients under `no_sync`, and mixed precision is autocast
with the trainable parameters kept in float32. A non-finite loss or gradient stops the run before the optimizer
touches the weights; on CUDA the fused optimizer skips such a step on the device and the host reads the verdict a
step later, so it never waits for the GPU between logged steps. An interrupted stage resumes from its step
checkpoints (see `checkpoints`); under FSDP no checkpoints are written (they would hold one process's shards), and
each stage ends by gathering the full weights back into the plain model on every process (see `fsdp`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..hf.attention import decoder_layers
from ..hf.errors import LinearizeError
from ..hf.mixers import mixers_in
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .fsdp import held_dtypes, inside_wrappers, is_fsdp, release, trainable_fp32
from .profiling import StepProfiler
from .retrieval_mix import take_weighted
from .session import Session

# Dense bf16/fp16 matrix peaks from the vendors' datasheets, by device name, for MFU under mixed precision;
# LINEARIZE_PEAK_TFLOPS sets the peak for any device.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
OPTIMIZERS = ("adamw", "sgd")
DEFERRED_CHECK_DEVICES = ("cuda",)  # where a step's finite check is read a step later (`_Stage.defer`)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclass
class TrainConfig:
    """What every stage takes.

    tokens: training budget; the stage runs floor(tokens / tokens per step) optimizer steps and stops there.
    batch_size: windows per micro-batch on each process; grad_accum: micro-batches per optimizer step.
    lr, optimizer (adamw, sgd), weight_decay, scheduler (cosine, linear, constant, constant_with_warmup),
    warmup_steps: the optimisation; max_grad_norm clips the gradient norm (0: no clipping).
    gradient_checkpointing: recompute activations in the backward pass to save memory.
    compile: run each decoder layer through torch.compile for this stage. The mixers' PyTorch forms are chains of
        small operations; on a GPU at a few thousand tokens per step launching them bounds the speed, and
        compiling fuses them. Identical layers share one compiled graph, so the first step pays for compiling
        each kind of layer once, not the whole depth.
    seq_len: this stage's window length (default: data.seq_len); stages at growing lengths make a context
        curriculum (e.g. lora_kd at 512, then at 2048 with a quarter of the batch_size).
    checkpoint_every: steps between checkpoints (0: only at the end of the stage, when a checkpoint folder is set).
    log_every: steps between metric records.
    window_dropout: in each converted layer that mixes a softmax window into its output by a share
        (gated_deltanet, gla, mamba2 with `window`), each head of each training window loses its window with this
        probability, so its linear part learns to carry the context alone (the remedy for hybrids that lean on
        their window, "component imbalance"). For this stage only; 0: none.
    profile_steps: record this many optimizer steps after the first (which compiles) under torch.profiler and
        report where their time goes (see `profiling`): in the stage report, printed, and as
        profile-stage<N>-<kind>.txt in the output folder. 0: none.
    split_on_oom: when the GPU runs out of memory in a micro-batch (one process), split the micro-batches by their
        smallest factor and multiply grad_accum by it: the same windows make the same step, which is taken again,
        and the stage goes on at the smaller micro-batch (said in one line, and recorded in the stage report as
        `micro_batch`). Stops with the error where a micro-batch is one window, under several processes (the others
        would wait for the one that failed) or with false.

    `flops_per_parameter` (a class constant of each stage) counts the FLOPs one token costs per non-embedding
    parameter, for MFU: 2 per forward pass and 2 per backward pass through activations (frozen weights need no
    weight gradients).
    """

    flops_per_parameter: ClassVar[int] = 6

    tokens: int = 1_000_000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    compile: bool = False
    seq_len: int | None = None
    checkpoint_every: int = 100
    log_every: int = 10
    window_dropout: float = 0.0
    profile_steps: int = 0
    split_on_oom: bool = True

    def __post_init__(self):
        kind = getattr(self, "kind", "stage")
        if self.tokens <= 0:
            raise LinearizeError(f"{kind}: tokens must be a positive budget, got {self.tokens}; e.g. tokens: 2_000_000")
        if self.seq_len is not None and self.seq_len < 8:
            raise LinearizeError(f"{kind}: seq_len must be at least 8 (or unset: data.seq_len), got {self.seq_len}")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise LinearizeError(f"{kind}: {name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or self.warmup_steps < 0 or self.checkpoint_every < 0 or self.profile_steps < 0:
            raise LinearizeError(
                f"{kind}: lr must be positive and weight_decay, max_grad_norm, warmup_steps, checkpoint_every, profile_steps not negative"
            )
        if not 0 <= self.window_dropout < 1:
            raise LinearizeError(f"{kind}: window_dropout is a probability in [0, 1), got {self.window_dropout}")
        if self.optimizer not in OPTIMIZERS:
            raise LinearizeError(f"{kind}: unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise LinearizeError(f"{kind}: unknown scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")


def count_steps(config: TrainConfig, seq_len: int, processes: int, where: str) -> int:
    """Optimizer steps the budget pays for (never more than `tokens`); fewer than one, or too few for the steps to
    profile after the first, is an error."""
    tokens_per_step = config.batch_size * config.grad_accum * processes * seq_len
    if config.tokens < tokens_per_step:
        raise LinearizeError(
            f"{where}: tokens={config.tokens:,} is less than one optimizer step of {tokens_per_step:,} tokens "
            f"(batch_size x grad_accum x processes x seq_len); raise tokens or lower batch_size"
        )
    steps = config.tokens // tokens_per_step
    if config.profile_steps >= steps:
        raise LinearizeError(
            f"{where}: profile_steps={config.profile_steps} needs at least {config.profile_steps + 1} optimizer steps (the first compiles) "
            f"and tokens={config.tokens:,} pay for {steps}; lower profile_steps or raise tokens"
        )
    return steps


def build_optimizer(config: TrainConfig, params: list[nn.Parameter], fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: torch's fused implementation, one kernel for all parameters, which also skips a step on the device when
    handed a `found_inf` flag (as torch's GradScaler hands it)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, fused=fused or None)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def set_checkpointing(model: nn.Module, enable: bool) -> None:
    """Gradient checkpointing through transformers (named activation checkpointing from 5.2x on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = "activation_checkpointing" if hasattr(base, "activation_checkpointing_enable") else "gradient_checkpointing"
    if enable:
        getattr(base, f"{prefix}_enable")({"use_reentrant": False})
    else:
        getattr(base, f"{prefix}_disable")()


def compile_layers(model: nn.Module) -> list[nn.Module]:
    """Compile each decoder layer of `model` in place (regional compilation); returns the layers compiled.

    Parameters are graph inputs to dynamo, so identical layers share one compiled graph and compiling costs one
    layer, not the model's depth. `nn.Module.compile` keeps the compiled call on the module itself, so names and
    state_dict keys stay as they are. Under FSDP the layer inside each unit's wrappers is compiled, so the units'
    gathering and resharding run eagerly around it.

    Shapes are static: a stage's windows all have one length, and the next stage's length compiles graphs of its own.
    With dynamo's automatic dynamic shapes, the 2,048-token stage after a 512-token one recompiled the gated delta
    rule with a symbolic length, which inductor could not generate code for on CUDA (torch 2.11: "Unexpected tiling"
    in the chunk cumsum; BENCHMARKS.md, eighth session).
    """
    layers = [inside_wrappers(layer) for layer in decoder_layers(model, model.config.get_text_config().num_hidden_layers)]
    for layer in layers:
        layer.compile(dynamic=False)
    return layers


# Compiled variants of the decoder layer's forward (one code object for every layer): each kind of layer (kept softmax,
# each mixer), with and without gradients flowing in (the first layer, the teacher's pass), per stage (LoRA wraps
# projections; a new sequence length), and those of earlier stages stay. torch's default limit of 8 was hit at a
# recipe's third stage, which then ran eagerly and silently (BENCHMARKS.md, seventh session).
LAYER_VARIANTS = 64


def compile_limits():
    """dynamo's recompile limit raised (never lowered) to LAYER_VARIANTS for a compiled stage."""
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, LAYER_VARIANTS))


def uncompile(module: nn.Module) -> None:
    """Undo `module.compile()`, so the module runs eagerly again."""
    # torch (2.11 to 2.13) has no public inverse: compile() sets the compiled call as an instance attribute over
    # the class's None, so dropping the instance attribute restores the eager call.
    module.__dict__.pop("_compiled_call_impl", None)


def peak_flops(accelerator) -> float | None:
    """FLOP/s the MFU figure is measured against: LINEARIZE_PEAK_TFLOPS, else the datasheet peak of a known GPU
    under bf16/fp16 mixed precision, else None (no MFU is reported)."""
    override = os.environ.get("LINEARIZE_PEAK_TFLOPS")
    if override:
        try:
            return float(override) * 1e12
        except ValueError:
            raise LinearizeError(f"LINEARIZE_PEAK_TFLOPS must be a number of TFLOP/s, e.g. 989; got {override!r}") from None
    if accelerator.device.type != "cuda" or accelerator.mixed_precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(accelerator.device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def non_embedding_parameters(model: nn.Module) -> int:
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def held_elsewhere(device: torch.device) -> tuple[int, int] | None:
    """(bytes of `device`'s memory that other processes hold, its total bytes): what the driver reports in use, less
    what this process's caching allocator has reserved; None off CUDA or where the driver cannot say."""
    if device.type != "cuda":
        return None
    try:
        free, total = torch.cuda.mem_get_info(device)
        return max(0, total - free - torch.cuda.memory_reserved(device)), total
    except RuntimeError:
        return None


def out_of_memory_message(where: str, index: int, micro: int, seq_len: int, seq_key: str, device: torch.device) -> str:
    """The one line a stage stops with when a micro-batch does not fit: other processes' share of the GPU first, where
    they hold a quarter of it or more (lowering the batch does not help then), then the settings that lower the need."""
    lower = (f"lower stages[{index}].batch_size (raise grad_accum to keep the batch), lower {seq_key}, "
             f"or set stages[{index}].gradient_checkpointing=true")
    held = held_elsewhere(device)
    if held is not None and held[0] >= held[1] / 4:
        return (f"{where}: the GPU ran out of memory with batch_size={micro} and {seq_key}={seq_len} while other processes "
                f"held {held[0] / 2**30:.1f} of its {held[1] / 2**30:.1f} GiB; free that memory or pick another GPU "
                f"(CUDA_VISIBLE_DEVICES), or {lower}")
    return f"{where}: the GPU ran out of memory with batch_size={micro} and {seq_key}={seq_len}; {lower}"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor onto `device`; onto CUDA from pinned memory, without waiting: a plain copy to CUDA synchronises the
    host with the GPU, which would drain the queue of launched kernels at every step."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Verdict:
    """Whether an optimizer step's loss (on any process) or gradient norm is not finite. `bad` is a float flag on the
    device, what a fused optimizer's `found_inf` takes; it and the loss's own flag are copied to the host behind the
    step's kernels, so making a verdict never waits for the GPU, and `problem` waits only for this step's kernels."""

    def __init__(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, accelerator):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        # Every process takes the same decision, so none is left waiting in a collective.
        loss_bad = accelerator.reduce((~torch.isfinite(loss)).float().reshape(1), "sum").sum()
        self.bad = ((loss_bad + (~torch.isfinite(grad_norm)).float()) > 0).float()
        self.flags = torch.stack((loss_bad, self.bad)).to("cpu", non_blocking=True)
        self.copied = None
        if self.bad.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def problem(self) -> str | None:
        """What was not finite, or None."""
        if self.copied is not None:
            self.copied.synchronize()
        loss_bad, bad = self.flags.tolist()
        if not bad:
            return None
        if not loss_bad:
            return f"the gradient norm is {float(self.grad_norm)}"
        return "the loss is not finite on another process" if bool(torch.isfinite(self.loss)) else f"the loss is {self.loss.item()}"


StepLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def train(
    model: nn.Module,
    data,
    config: TrainConfig,
    session: Session,
    params: dict[str, nn.Parameter],
    step_loss: StepLoss,
) -> dict[str, Any]:
    """Train `params` (names -> parameters of `model`) on `data.train` to minimise `step_loss(model, batch, weights)`,
    `weights` being the batch's per-position loss weights where retrieval answers weigh more, else None.

    `step_loss` returns the loss and a dict of detached metric tensors (scalars or per-layer vectors) that are
    averaged over micro-batches and processes and written every `log_every` steps. Returns the stage report.
    """
    stage = _Stage(model, data, config, session, params, step_loss)
    stage.resume()
    return stage.run()


class _Stage:
    """One call of `train`, in its parts: the setup (here), the resumption, the optimizer steps (each checked for
    non-finite values, logged and checkpointed as due) and handing the model back however the stage ends."""

    def __init__(self, model: nn.Module, data, config: TrainConfig, session: Session, params: dict[str, nn.Parameter], step_loss: StepLoss):
        from transformers import get_scheduler

        self.model, self.data, self.config, self.session, self.params, self.step_loss = model, data, config, session, params, step_loss
        self.acc = acc = session.accelerator
        self.kind = getattr(config, "kind", "stage")
        self.index = session.stage_index
        self.where = f"stages[{self.index}] ({self.kind})"
        if data.train is None:
            raise LinearizeError(f"{self.where} needs training data; load it with train=True")
        self.steps = count_steps(config, data.seq_len, acc.num_processes, self.where)
        self.tokens_per_step = config.batch_size * config.grad_accum * acc.num_processes * data.seq_len
        self.micro, self.accum = config.batch_size, config.grad_accum  # split_on_oom changes them, never their product
        self.peak = peak_flops(acc)
        self.flops_per_token = config.flops_per_parameter * non_embedding_parameters(model)

        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        self.fsdp, self.held = is_fsdp(acc), None
        if self.fsdp:
            # FSDP flattens each unit into one tensor of one dtype and, under mixed precision, upcasts the units that
            # train itself and casts buffers in place; what one process would hold is put back when the stage ends.
            self.held = held_dtypes(model, params, acc), {name: b.detach().clone() for name, b in model.named_buffers()}
        else:
            trainable_fp32(params, acc)
        # Checking a step for non-finite values on the host waits for the GPU, which then idles while the host launches
        # the next step: 34 of 344 ms a LoRA KD step at the Llama-3.2-1B shape (H200, BENCHMARKS.md, twenty-seventh
        # session). Where the parameters train on CUDA, without FSDP or a loss scaler (fp16's), the check is deferred:
        # the fused optimizer skips a non-finite step on the GPU and the host reads the verdict a step later (`Verdict`).
        devices = {p.device.type for p in params.values()}
        self.defer = not self.fsdp and acc.scaler is None and devices <= set(DEFERRED_CHECK_DEVICES)
        self.pending: Verdict | None = None
        optimizer = build_optimizer(config, list(params.values()), fused=self.defer)
        self.scheduler = get_scheduler(config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=self.steps)
        if config.gradient_checkpointing:
            set_checkpointing(model, True)
        self.wrapped, self.optimizer = acc.prepare(model, optimizer)

    def resume(self) -> None:
        """Continue from the stage's newest checkpoint, if there is one; under FSDP refuse one and write none."""
        session, where = self.session, self.where
        self.stage_dir = session.stage_dir(self.kind)
        self.start, earlier_seconds = 0, 0.0
        checkpoint = latest_checkpoint(self.stage_dir)
        if self.fsdp and self.stage_dir is not None:
            if checkpoint is not None:
                raise LinearizeError(f"{where}: {checkpoint} cannot be resumed under FSDP; resume under DDP (recipes/accelerate/ddp.yaml) or start again with --overwrite")
            session.say(f"{where}: no checkpoints are written under FSDP (they would hold one process's shards)")
            self.stage_dir = None
        if checkpoint is not None:
            state = load_checkpoint(session, checkpoint, self.params, self.optimizer, self.scheduler)
            if state.get("kind") != self.kind or state.get("total_steps") != self.steps:
                raise LinearizeError(
                    f"checkpoint {checkpoint} was written for another stage, budget or number of processes; resume as it was started, or start again with --overwrite"
                )
            self.start, earlier_seconds = state["step"], state.get("seconds", 0.0)
            session.say(f"{where}: resuming from {checkpoint} (step {self.start}/{self.steps})")
        index, start = self.index, self.start
        session.keep_records(lambda r: r.get("stage") != index or r.get("step", 0) <= start)
        self.last_saved, self.last_step = checkpoint, self.start
        self.started = time.time() - earlier_seconds  # a resumed stage records its whole training time

    def run(self) -> dict[str, Any]:
        """The steps from where the stage starts to its end; returns the stage report."""
        config, data, index = self.config, self.data, self.index
        report = {
            "stage": index, "kind": self.kind, "steps": self.steps, "tokens": self.steps * self.tokens_per_step,
            "trainable_parameters": sum(p.numel() for p in self.params.values()),
        }
        progress = _progress(self.session)
        self.sums: dict[str, torch.Tensor] = {}
        self.window_start, self.window_steps = time.time(), 0
        self.model.train()
        self.drop_windows(config.window_dropout)
        compiled = compile_layers(self.model) if config.compile else []
        first_profiled = min(self.start + 1, self.steps - config.profile_steps)
        self.profiler = StepProfiler(first_profiled, config.profile_steps if first_profiled > self.start else 0, self.acc.device)
        try:
            with progress, compile_limits() if compiled else nullcontext():
                task = progress.add_task(self.where, total=self.steps, completed=self.start, rate="- tok/s", loss="-")
                for step in range(self.start, self.steps):
                    began = time.time()
                    self.profiler.begin(step)
                    grad_norm = self.optimizer_step(step)
                    self.profiler.end(step)
                    if step == self.start:  # compiling (graphs, Triton kernels) and first-use set-up
                        report["first_step_seconds"] = round(time.time() - began, 3)
                    done = step + 1
                    logs = done % config.log_every == 0 or done == self.steps or done == 1
                    saves = self.stage_dir is not None and (done == self.steps or (config.checkpoint_every and done % config.checkpoint_every == 0))
                    if logs or saves:
                        self.settle()
                    if logs:
                        self.log(done, grad_norm, progress, task)
                    progress.update(task, completed=done)
                    if saves:
                        self.save(done)
        except torch.cuda.OutOfMemoryError:
            seq_key = f"stages[{index}].seq_len" if config.seq_len else "data.seq_len"
            raise LinearizeError(out_of_memory_message(self.where, index, self.micro, data.seq_len, seq_key, self.acc.device)) from None
        finally:
            self.profiler.stop()
            self.hand_back(compiled)
        if self.profiler.summary is not None:
            report["profile"] = self.profiler.summary
            self.session.profiles[f"profile-stage{index}-{self.kind}.txt"] = self.profiler.text
            self.session.say(f"{self.where}: {self.profiler.headline}")
        if (self.micro, self.accum) != (config.batch_size, config.grad_accum):
            report["micro_batch"] = {"batch_size": self.micro, "grad_accum": self.accum}
        logged = [r for r in self.session.records if r.get("stage") == index]
        report.update(seconds=round(time.time() - self.started, 1), first=logged[0] if logged else None, last=logged[-1] if logged else None)
        return report

    def optimizer_step(self, step: int) -> torch.Tensor:
        """Optimizer step `step` over its micro-batches, taken only when the loss and the gradient are finite; adds
        its metrics to those of the steps since the last record. Returns the gradient norm."""
        acc, config, wrapped = self.acc, self.config, self.wrapped
        phase = self.profiler.phase
        while True:
            try:
                step_sums = self.accumulate(step)
                break
            except torch.cuda.OutOfMemoryError:
                if not self.splits():
                    raise
            self.split()  # out of the handler: the failed attempt's tensors, held by its traceback, are freed by now
        with phase("checks"):
            # accelerate clips with FSDP's own (global) norm only when handed the wrapped model's parameters.
            grad_norm = acc.clip_grad_norm_(list(wrapped.parameters()) if self.fsdp else list(self.params.values()), config.max_grad_norm or math.inf)
            verdict = Verdict(step, step_sums["loss"], grad_norm, acc)
            if self.defer:
                # The optimizer skips this step on the device if it is not finite; the previous step's verdict, long
                # computed, is read now.
                getattr(self.optimizer, "optimizer", self.optimizer).found_inf = verdict.bad
                self.settle()
                self.pending = verdict
            else:
                self.check(verdict)
        with phase("optimizer"):
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        for name, value in step_sums.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.window_steps += 1
        return grad_norm

    def accumulate(self, step: int) -> dict[str, torch.Tensor]:
        """Forward and backward of step `step`'s micro-batches, the gradients summed; returns the step's metrics."""
        acc, wrapped, micro_batch, accum = self.acc, self.wrapped, self.micro, self.accum
        step_sums: dict[str, torch.Tensor] = {}
        phase = self.profiler.phase
        for micro in range(accum):
            first = ((step * accum + micro) * acc.num_processes + acc.process_index) * micro_batch
            with phase("data"):
                batch, weights = (None if t is None else to_device(t, acc.device) for t in take_weighted(self.data.train, first, micro_batch))
            with nullcontext() if micro == accum - 1 else acc.no_sync(wrapped):
                with phase("forward"):
                    loss, metrics = self.step_loss(wrapped, batch, weights)
                with phase("backward"):
                    acc.backward(loss / accum)
            for name, value in {"loss": loss.detach(), **metrics}.items():
                step_sums[name] = step_sums.get(name, 0) + value.detach().float() / accum
        return step_sums

    def splits(self) -> bool:
        """Whether a micro-batch that ran out of GPU memory is split (`split_on_oom`)."""
        return self.config.split_on_oom and self.acc.num_processes == 1 and self.micro > 1

    def split(self) -> None:
        """Split the micro-batches by their smallest factor and drop the step's partial gradients, so that it is
        taken again."""
        factor = next(f for f in range(2, self.micro + 1) if self.micro % f == 0)
        was = self.micro
        self.micro, self.accum = self.micro // factor, self.accum * factor
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        self.session.say(
            f"{self.where}: out of GPU memory at batch_size={was}; now {self.micro} windows a micro-batch and grad_accum={self.accum}, "
            f"the same {self.tokens_per_step:,} tokens a step (stages[{self.index}].split_on_oom=false stops instead)"
        )

    def settle(self) -> None:
        """Check the deferred verdict of the last step, if one is pending (before its step is logged or saved)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self.check(pending)

    def check(self, verdict: Verdict) -> None:
        """Stop when a step's loss (on any process) or gradient norm was not finite: the optimizer skipped it (or has
        not taken it yet), so no weight has changed; the error says which checkpoints are kept and how to continue."""
        problem = verdict.problem()
        if problem is None:
            return
        session, index, step = self.session, self.index, verdict.step
        if session.checkpoints is None:
            kept, then = "no checkpoints are kept (none were asked for)", "run it again"
        else:
            kept = (
                f"this stage's last good checkpoint (step {self.last_step}) is in {self.last_saved}" if self.last_saved else "this stage has no checkpoint yet"
            ) + (f", and the {index} finished stage(s) before it are kept in {session.checkpoints}" if index else "")
            then = f"continue with --resume stages.{index}.lr=LOWER: this stage starts again" + (" after the finished ones" if index else "")
        raise LinearizeError(
            f"{self.where} step {step + 1}: {problem}; stopped before updating the weights; {kept}. Lower "
            f"stages[{index}].lr (or raise warmup_steps) and {then}"
        )

    def log(self, done: int, grad_norm: torch.Tensor, progress, task) -> None:
        """Record the metrics of the steps since the last record, averaged over them and over the processes."""
        elapsed = max(time.time() - self.window_start, 1e-9)
        means = {name: _float(self.acc.reduce(value / self.window_steps, "mean")) for name, value in self.sums.items()}
        entry = {
            "stage": self.index,
            "kind": self.kind,
            "step": done,
            "tokens": done * self.tokens_per_step,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "tokens_per_s": round(self.window_steps * self.tokens_per_step / elapsed, 1),
            **means,
        }
        rate = f"{entry['tokens_per_s']:,.0f} tok/s"
        if self.peak:
            entry["mfu"] = round(entry["tokens_per_s"] * self.flops_per_token / self.peak, 4)
            rate += f", MFU {entry['mfu']:.1%}"
        self.session.record(entry)
        progress.update(task, rate=rate, loss=f"{means['loss']:.4g}")
        self.sums, self.window_start, self.window_steps = {}, time.time(), 0

    def save(self, done: int) -> None:
        state = {
            "stage": self.index, "kind": self.kind, "step": done, "total_steps": self.steps, "tokens": done * self.tokens_per_step,
            "seconds": time.time() - self.started,
        }
        self.last_saved = save_checkpoint(self.session, self.stage_dir, state, self.params, self.optimizer, self.scheduler)
        self.last_step = done

    def drop_windows(self, probability: float) -> None:
        """Set the window dropout of every converted layer that has a window to drop; a dropout asked of a model
        with none is refused."""
        layers = [m for m in mixers_in(self.model) if getattr(m, "drops_window", False) and getattr(m, "window", 0)]
        if probability and not layers:
            raise LinearizeError(
                f"{self.where}: window_dropout needs converted layers that mix a softmax window by share (gated_deltanet, gla or "
                f"mamba2 with window > 0), and this model has none; set stages.{self.index}.window_dropout=0"
            )
        for mixer in layers:
            mixer.window_dropout = probability

    def hand_back(self, compiled: list[nn.Module]) -> None:
        """However the stage ended: the model eager again, without gradient checkpointing, unwrapped and frozen."""
        self.model.eval()
        self.drop_windows(0.0)
        for layer in compiled:
            uncompile(layer)
        if self.config.gradient_checkpointing:
            set_checkpointing(self.model, False)
        # Under FSDP the parameters are new objects now, so they are reached through the model.
        for p in release(self.acc, self.wrapped, self.held).parameters():
            p.requires_grad_(False)


def _float(value: torch.Tensor) -> float | list[float]:
    value = value.detach().float().cpu()
    return value.item() if value.dim() == 0 else [round(v, 6) for v in value.tolist()]


def _progress(session: Session):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        disable=not (session.progress and session.main),
    )
