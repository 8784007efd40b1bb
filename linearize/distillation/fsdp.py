"""FSDP glue for the training loop: which dtypes a process holds, and the plain model back after a stage.

Under FSDP (FSDP1 as accelerate sets it up) each stage ends by gathering the full weights back into the plain
model on every process, so the next stage can wrap it again and saving needs no FSDP.
"""

from __future__ import annotations

import torch
from torch import nn


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


def inside_wrappers(module: nn.Module) -> nn.Module:
    """The module inside any FSDP (and activation checkpoint) wrappers around `module`."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # torch's activation checkpoint wrapper (in a private module) has no public accessor for the module it wraps.
    while isinstance(module, FSDP) or hasattr(module, "_checkpoint_wrapped_module"):
        module = module.module if isinstance(module, FSDP) else module._checkpoint_wrapped_module
    return module


def _unwrap_tree(module: nn.Module) -> nn.Module:
    """Replace every FSDP (and activation checkpoint) wrapper in the tree by the module it wraps."""
    module = inside_wrappers(module)
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
        for leaf, old in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            name = f"{path}.{leaf}" if path else leaf
            if id(old) not in made:
                data = full[name]
                if dtypes is not None and name in dtypes:
                    data = data.to(dtypes[name])
                made[id(old)] = nn.Parameter(data, requires_grad=old.requires_grad)
            setattr(module, leaf, made[id(old)])
    for name, tensor in (buffers or {}).items():
        if model.get_buffer(name).dtype != tensor.dtype:
            path, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(path), leaf, tensor)  # keeps the buffer persistent or not, as it was
    return model


def release(accelerator, wrapped: nn.Module, held: tuple[dict, dict] | None = None) -> nn.Module:
    """Undo what `prepare` did to the module itself, so the next stage can prepare it afresh; under FSDP gather
    the full weights back first (`held`: the dtypes and buffers to restore, see `unshard`). Returns the module."""
    if is_fsdp(accelerator):
        wrapped = unshard(wrapped, *(held or (None, None)))
    module = accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    module.__dict__.pop("_is_accelerate_prepared", None)
    module.__dict__.pop("forward", None)  # the autocast wrapper set on the instance; the class's forward remains
    accelerator.free_memory()
    return module
