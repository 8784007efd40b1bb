"""The training loop every stage shares, written the accelerate way.

The same code runs on CPU, on one GPU and on several under `accelerate launch` (DDP or FSDP): the model is
prepared by the Accelerator, micro-batches accumulate gradients under `no_sync`, and mixed precision is autocast
with the trainable parameters kept in float32. A checkpoint holds only what training changes (the trainable
weights, the optimizer and scheduler, the RNG, the step); the data position is a function of the step, so
resuming replays the run exactly. A non-finite loss or gradient stops the run before the optimizer touches the
weights. Under FSDP each stage ends by gathering the full weights back into the plain model on every process,
and no checkpoints are written (they would hold one process's shards).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hf.attention import decoder_layers
from ..hf.errors import LinearizeError

OPTIMIZERS = ("adamw", "sgd")
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
    checkpoint_every: steps between checkpoints (0: only at the end of the stage, when a checkpoint folder is set).
    log_every: steps between metric records.
    """

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
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self):
        kind = getattr(self, "kind", "stage")
        if self.tokens <= 0:
            raise LinearizeError(f"{kind}: tokens must be a positive budget, got {self.tokens}; e.g. tokens: 2_000_000")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise LinearizeError(f"{kind}: {name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise LinearizeError(f"{kind}: lr must be positive and weight_decay, max_grad_norm, warmup_steps, checkpoint_every not negative")
        if self.optimizer not in OPTIMIZERS:
            raise LinearizeError(f"{kind}: unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise LinearizeError(f"{kind}: unknown scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")


def count_steps(config: TrainConfig, seq_len: int, processes: int, where: str) -> int:
    """Optimizer steps the budget pays for (never more than `tokens`); fewer than one is an error."""
    tokens_per_step = config.batch_size * config.grad_accum * processes * seq_len
    if config.tokens < tokens_per_step:
        raise LinearizeError(
            f"{where}: tokens={config.tokens:,} is less than one optimizer step of {tokens_per_step:,} tokens "
            f"(batch_size x grad_accum x processes x seq_len); raise tokens or lower batch_size"
        )
    return config.tokens // tokens_per_step


def make_accelerator(precision: str = "auto"):
    """One Accelerator per process: `auto` is bf16 autocast on a CUDA GPU that supports it, else full precision.

    Under `accelerate launch --mixed_precision ...` the launcher's choice wins over `auto`.
    """
    from accelerate import Accelerator

    if precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            precision = None
        else:
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    try:
        accelerator = Accelerator(mixed_precision=precision)
    except ValueError as error:
        raise LinearizeError(f"cannot set up precision {precision!r}: {str(error).splitlines()[0]}") from None
    check_launch(accelerator.num_processes)
    return accelerator


def check_launch(processes: int) -> None:
    """Refuse a multi-process launch that accelerate set up as independent single processes (torchrun on CPU
    without ACCELERATE_USE_CPU): each would train alone on its own slice and overwrite the others' output."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and processes != launched:
        raise LinearizeError(
            f"launched as {launched} processes but accelerate joined {processes}: on CPU set ACCELERATE_USE_CPU=true "
            "(e.g. `ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 cli.py distill RECIPE`), on GPUs give each process one"
        )


@dataclass
class Session:
    """What the stages of one distillation share: the accelerator, the checkpoint folder, metrics and the log.

    `checkpoints` None keeps nothing on disk (notebook use); metric records are always kept in `records`.
    """

    accelerator: Any = None
    checkpoints: Path | None = None
    log: Callable[[str], None] = print
    progress: bool = True
    stage_index: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        if self.accelerator is None:
            self.accelerator = make_accelerator()
        if self.checkpoints is not None:
            self.checkpoints = Path(self.checkpoints)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        if self.main:
            self.log(message)

    @property
    def metrics_path(self) -> Path | None:
        return None if self.checkpoints is None else self.checkpoints / "metrics.jsonl"

    def record(self, entry: dict[str, Any]) -> None:
        """Keep a metric record and append it to metrics.jsonl beside the checkpoints."""
        self.records.append(entry)
        if self.main and self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def keep_records(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop records that a resumed stage is about to write again (the file and memory agree afterwards)."""
        path = self.metrics_path
        if path is not None and path.is_file():
            self.records = [r for r in map(json.loads, path.read_text().splitlines()) if keep(r)]
            if self.main:
                path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        else:
            self.records = [r for r in self.records if keep(r)]

    def stage_dir(self, kind: str) -> Path | None:
        return None if self.checkpoints is None else self.checkpoints / f"stage{self.stage_index}-{kind}"


def _upcast(p: torch.Tensor, accelerator) -> bool:
    """Whether trainable `p` is held in float32: under autocast the forward runs in half precision, while the
    weights and their optimizer state stay in float32."""
    return accelerator.mixed_precision != "no" and p.dtype in (torch.float16, torch.bfloat16)


def trainable_fp32(params: dict[str, nn.Parameter], accelerator) -> None:
    for p in params.values():
        if _upcast(p, accelerator):
            p.data = p.data.float()


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def check_resume(accelerator, resume: bool) -> None:
    """Under FSDP no checkpoints are written (they would hold one process's shards), so there is none to resume."""
    if resume and is_fsdp(accelerator):
        raise LinearizeError("--resume is not supported under FSDP, which writes no checkpoints; resume a DDP run under DDP (recipes/accelerate/ddp.yaml), or start again with --overwrite")


def held_dtypes(model: nn.Module, params: dict[str, nn.Parameter], accelerator) -> dict[str, torch.dtype]:
    """The dtype of every parameter as one process trains it: trainable half-precision weights in float32 under
    mixed precision (see `trainable_fp32`), the rest as they are."""
    trainable = {id(p) for p in params.values()}
    return {
        name: torch.float32 if id(p) in trainable and _upcast(p, accelerator) else p.dtype
        for name, p in model.named_parameters(remove_duplicate=False)
    }


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
FSDP_MARKS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")


def _clean(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _inside_wrappers(module: nn.Module) -> nn.Module:
    """The module inside any FSDP (and activation checkpoint) wrappers around `module`."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    while isinstance(module, FSDP) or hasattr(module, "_checkpoint_wrapped_module"):
        module = module.module if isinstance(module, FSDP) else module._checkpoint_wrapped_module
    return module


def _unwrap_tree(module: nn.Module) -> nn.Module:
    """Replace every FSDP (and activation checkpoint) wrapper in the tree by the module it wraps."""
    module = _inside_wrappers(module)
    for name, child in list(module.named_children()):
        inner = _unwrap_tree(child)
        if inner is not child:
            setattr(module, name, inner)
    return module


def unshard(
    wrapped: nn.Module, dtypes: dict[str, torch.dtype] | None = None, buffers: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """The plain model one process would hold, from a model FSDP1 wrapped (the root and its auto-wrapped units).

    Auto-wrapping changes the module tree in place and leaves each original parameter a view of this process's
    shard, marked as already flattened, so unwrapping the root alone leaves a model the next stage cannot wrap
    again and that peft's merge and saving see in shards. Every process gathers the full parameters (a
    collective: all must call this), the wrappers are replaced by the modules they wrap, and every parameter
    becomes a new full `nn.Parameter` (ties kept, requires_grad as it was). `dtypes` (name -> dtype) casts back
    parameters whose unit FSDP's mixed precision upcast; `buffers` (name -> tensor, from before wrapping) puts
    back those it cast. Returns the model, the same object that was wrapped.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    full: dict[str, torch.Tensor] = {}
    with FSDP.summon_full_params(wrapped, writeback=False, rank0_only=False, with_grads=False):
        clones: dict[int, torch.Tensor] = {}
        for name, p in wrapped.named_parameters(remove_duplicate=False):
            if id(p) not in clones:
                clones[id(p)] = p.detach().clone()
            full[_clean(name)] = clones[id(p)]
    model = _unwrap_tree(wrapped)
    for module in model.modules():  # marks FSDP leaves for torch.compile, which would take the modules as sharded
        for mark in FSDP_MARKS:
            module.__dict__.pop(mark, None)
    made: dict[int, nn.Parameter] = {}
    for path, module in list(model.named_modules(remove_duplicate=False)):
        for leaf, old in list(module._parameters.items()):
            if old is None:
                continue
            name = f"{path}.{leaf}" if path else leaf
            if id(old) not in made:
                data = full[name]
                if dtypes is not None and name in dtypes:
                    data = data.to(dtypes[name])
                made[id(old)] = nn.Parameter(data, requires_grad=old.requires_grad)
            module._parameters[leaf] = made[id(old)]
    for name, tensor in (buffers or {}).items():
        path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(path)
        if owner._buffers[leaf].dtype != tensor.dtype:
            owner._buffers[leaf] = tensor
    return model


def build_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


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
    """
    layers = [_inside_wrappers(layer) for layer in decoder_layers(model, model.config.get_text_config().num_hidden_layers)]
    for layer in layers:
        layer.compile()
    return layers


def uncompile(module: nn.Module) -> None:
    """Undo `module.compile()`, so the module runs eagerly again."""
    # torch has no public inverse: compile() sets the compiled call as an instance attribute over the class's None.
    module.__dict__.pop("_compiled_call_impl", None)


# ---- checkpoints -------------------------------------------------------------------------------------------

STEP_PREFIX = "step-"


def latest_checkpoint(stage_dir: Path | None) -> Path | None:
    """The newest complete checkpoint of a stage (written folders only; temporary ones start with a dot)."""
    if stage_dir is None or not stage_dir.is_dir():
        return None
    done = sorted(p for p in stage_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file())
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(session: Session, stage_dir: Path, state: dict[str, Any], params: dict[str, nn.Parameter], optimizer, scheduler) -> Path:
    """Write a checkpoint into a temporary folder, rename it into place, then drop the older ones of the stage."""
    from safetensors.torch import save_file

    acc = session.accelerator
    final = stage_dir / f"{STEP_PREFIX}{state['step']:07d}"
    staging = stage_dir / f".{final.name}.partial"
    if session.main:
        # Leftovers of a write that was interrupted are never checkpoints; clear them with this one.
        for stale in stage_dir.glob(f".{STEP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file({name: p.detach().to("cpu").contiguous() for name, p in params.items()}, str(staging / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    acc.wait_for_everyone()
    torch.save(_rng_state(), staging / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if session.main:
        # state.json last: a folder without it is never taken for a checkpoint.
        (staging / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in stage_dir.iterdir():
            if old.is_dir() and old.name.startswith(STEP_PREFIX) and old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(session: Session, path: Path, params: dict[str, nn.Parameter], optimizer, scheduler) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights))[:2] or sorted(set(weights) - set(params))[:2]
        raise LinearizeError(
            f"checkpoint {path} holds other trainable weights than this stage trains (e.g. {', '.join(missing)}); "
            "it belongs to another recipe or model: start again with --overwrite"
        )
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise LinearizeError(f"checkpoint {path}: {name} has shape {tuple(weights[name].shape)}, the model {tuple(p.shape)}; start again with --overwrite")
            p.copy_(weights[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng-{session.accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return state


# ---- the loop ----------------------------------------------------------------------------------------------

StepLoss = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _release(accelerator, wrapped: nn.Module, held: tuple[dict, dict] | None = None) -> nn.Module:
    """Undo what `prepare` did to the module itself, so the next stage can prepare it afresh; under FSDP gather
    the full weights back first (`held`: the dtypes and buffers to restore, see `unshard`). Returns the module."""
    if is_fsdp(accelerator):
        wrapped = unshard(wrapped, *(held or (None, None)))
    module = accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    module.__dict__.pop("_is_accelerate_prepared", None)
    module.__dict__.pop("forward", None)  # the autocast wrapper set on the instance; the class's forward remains
    accelerator.free_memory()
    return module


def _float(value: torch.Tensor) -> float | list[float]:
    value = value.detach().float().cpu()
    return value.item() if value.dim() == 0 else [round(v, 6) for v in value.tolist()]


def train(
    model: nn.Module,
    data,
    config: TrainConfig,
    session: Session,
    params: dict[str, nn.Parameter],
    step_loss: StepLoss,
) -> dict[str, Any]:
    """Train `params` (names -> parameters of `model`) on `data.train` to minimise `step_loss(model, batch)`.

    `step_loss` returns the loss and a dict of detached metric tensors (scalars or per-layer vectors) that are
    averaged over micro-batches and processes and written every `log_every` steps. Returns the stage report.
    """
    from transformers import get_scheduler

    acc = session.accelerator
    kind = getattr(config, "kind", "stage")
    where = f"stages[{session.stage_index}] ({kind})"
    if data.train is None:
        raise LinearizeError(f"{where} needs training data; load it with train=True")
    steps = count_steps(config, data.seq_len, acc.num_processes, where)
    tokens_per_step = config.batch_size * config.grad_accum * acc.num_processes * data.seq_len

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    fsdp, held = is_fsdp(acc), None
    if fsdp:
        # FSDP flattens each unit into one tensor of one dtype and, under mixed precision, upcasts the units that
        # train itself and casts buffers in place; what one process would hold is put back when the stage ends.
        held = held_dtypes(model, params, acc), {name: b.detach().clone() for name, b in model.named_buffers()}
    else:
        trainable_fp32(params, acc)
    optimizer = build_optimizer(config, list(params.values()))
    scheduler = get_scheduler(config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=steps)
    if config.gradient_checkpointing:
        set_checkpointing(model, True)
    wrapped, optimizer = acc.prepare(model, optimizer)

    stage_dir = session.stage_dir(kind)
    start, earlier_seconds = 0, 0.0
    checkpoint = latest_checkpoint(stage_dir)
    if fsdp and stage_dir is not None:
        if checkpoint is not None:
            raise LinearizeError(f"{where}: {checkpoint} cannot be resumed under FSDP; resume under DDP (recipes/accelerate/ddp.yaml) or start again with --overwrite")
        session.say(f"{where}: no checkpoints are written under FSDP (they would hold one process's shards)")
        stage_dir = None
    if checkpoint is not None:
        state = load_checkpoint(session, checkpoint, params, optimizer, scheduler)
        if state.get("kind") != kind or state.get("total_steps") != steps:
            raise LinearizeError(
                f"checkpoint {checkpoint} was written for another stage, budget or number of processes; resume as it was started, or start again with --overwrite"
            )
        start, earlier_seconds = state["step"], state.get("seconds", 0.0)
        session.say(f"{where}: resuming from {checkpoint} (step {start}/{steps})")
    index = session.stage_index
    session.keep_records(lambda r: r.get("stage") != index or r.get("step", 0) <= start)

    report = {"stage": index, "kind": kind, "steps": steps, "tokens": steps * tokens_per_step, "trainable_parameters": sum(p.numel() for p in params.values())}
    clip = config.max_grad_norm or math.inf
    last_saved, last_step = checkpoint, start
    started = time.time() - earlier_seconds  # a resumed stage records its whole training time
    progress = _progress(session)
    sums: dict[str, torch.Tensor] = {}
    window_start, window_steps = time.time(), 0
    model.train()
    compiled = compile_layers(model) if config.compile else []
    try:
        with progress:
            task = progress.add_task(where, total=steps, completed=start, rate="-", loss="-")
            for step in range(start, steps):
                step_sums: dict[str, torch.Tensor] = {}
                for micro in range(config.grad_accum):
                    first = ((step * config.grad_accum + micro) * acc.num_processes + acc.process_index) * config.batch_size
                    batch = data.train.take(first, config.batch_size).to(acc.device)
                    last_micro = micro == config.grad_accum - 1
                    with nullcontext() if last_micro else acc.no_sync(wrapped):
                        loss, metrics = step_loss(wrapped, batch)
                        acc.backward(loss / config.grad_accum)
                    for name, value in {"loss": loss.detach(), **metrics}.items():
                        step_sums[name] = step_sums.get(name, 0) + value.detach().float() / config.grad_accum
                # accelerate clips with FSDP's own (global) norm only when handed the wrapped model's parameters.
                grad_norm = acc.clip_grad_norm_(list(wrapped.parameters()) if fsdp else list(params.values()), clip)
                loss_ok = bool(torch.isfinite(step_sums["loss"]))
                # Every process takes the same decision, so none is left waiting in a collective.
                bad = acc.reduce(torch.tensor([0.0 if loss_ok else 1.0], device=acc.device), "sum").item() > 0
                if bad or not torch.isfinite(grad_norm):
                    if not bad:
                        problem = f"the gradient norm is {float(grad_norm)}"
                    else:
                        problem = f"the loss is {step_sums['loss'].item()}" if not loss_ok else "the loss is not finite on another process"
                    if session.checkpoints is None:
                        kept, then = "no checkpoints are kept (none were asked for)", "run it again"
                    else:
                        kept = (
                            f"this stage's last good checkpoint (step {last_step}) is in {last_saved}" if last_saved else "this stage has no checkpoint yet"
                        ) + (f", and the {index} finished stage(s) before it are kept in {session.checkpoints}" if index else "")
                        then = f"continue with --resume stages.{index}.lr=LOWER: this stage starts again" + (
                            " after the finished ones" if index else ""
                        )
                    raise LinearizeError(
                        f"{where} step {step + 1}: {problem}; stopped before updating the weights; {kept}. Lower "
                        f"stages[{index}].lr (or raise warmup_steps) and {then}"
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                for name, value in step_sums.items():
                    sums[name] = sums.get(name, 0) + value
                window_steps += 1
                if done % config.log_every == 0 or done == steps or done == 1:
                    elapsed = max(time.time() - window_start, 1e-9)
                    means = {name: _float(acc.reduce(value / window_steps, "mean")) for name, value in sums.items()}
                    entry = {
                        "stage": index,
                        "kind": kind,
                        "step": done,
                        "tokens": done * tokens_per_step,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": round(window_steps * tokens_per_step / elapsed, 1),
                        **means,
                    }
                    session.record(entry)
                    progress.update(task, rate=f"{entry['tokens_per_s']:,.0f}", loss=f"{means['loss']:.4g}")
                    sums, window_start, window_steps = {}, time.time(), 0
                progress.update(task, completed=done)
                if stage_dir is not None and (done == steps or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                    state = {
                        "stage": index, "kind": kind, "step": done, "total_steps": steps, "tokens": done * tokens_per_step,
                        "seconds": time.time() - started,
                    }
                    last_saved, last_step = save_checkpoint(session, stage_dir, state, params, optimizer, scheduler), done
    except torch.cuda.OutOfMemoryError:
        raise LinearizeError(
            f"{where}: the GPU ran out of memory with batch_size={config.batch_size} and data.seq_len={data.seq_len}; "
            f"lower stages[{index}].batch_size (raise grad_accum to keep the batch), lower data.seq_len, "
            f"or set stages[{index}].gradient_checkpointing=true"
        ) from None
    finally:
        model.eval()
        for layer in compiled:
            uncompile(layer)
        if config.gradient_checkpointing:
            set_checkpointing(model, False)
        # Under FSDP the parameters are new objects now, so they are reached through the model.
        for p in _release(acc, wrapped, held).parameters():
            p.requires_grad_(False)
    logged = [r for r in session.records if r.get("stage") == index]
    report.update(seconds=round(time.time() - started, 1), first=logged[0] if logged else None, last=logged[-1] if logged else None)
    return report


def _progress(session: Session):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tok/s"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        disable=not (session.progress and session.main),
    )
