"""After a stage under FSDP (FSDP1 as accelerate sets it up: one unit per decoder layer, FULL_SHARD, original
parameters kept), every process gets back the plain model one process would hold, and it can be wrapped again.

accelerate refuses FSDP without GPUs, so the processes here wrap the model with torch's FSDP themselves, on CPU
with gloo; `sync_module_states` needs GPUs too, and is not needed here: every process builds the same model.
"""

import functools
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp._flat_param import HandleTrainingState
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

import linearize
from linearize.distillation.fsdp import held_dtypes, release, unshard
from linearize.distillation.session import check_resume
from linearize.distillation.stages.attention_transfer import TransferProbe, transfer_loss
from linearize.hf.errors import LinearizeError
from linearize.hf.mixers import mixers_in
from tests.tiny import random_ids, tiny_model

PROCESSES = 2


def wrap(model: torch.nn.Module) -> FSDP:
    layer = type(model.model.model.layers[0])
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer})
    return FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The mixers' feature maps (in the decoder-layer units) and the final norm (in the root unit)."""
    own = {id(p) for m in mixers_in(model) for p in m.new_parameters()} | {id(model.model.model.norm.weight)}
    return {name: p for name, p in model.named_parameters() if id(p) in own}


def step(forward: torch.nn.Module, params: list[torch.nn.Parameter], ids: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(params, lr=0.5)
    logits = forward(input_ids=ids, use_cache=False).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build():
    model = linearize.convert(tiny_model("llama", dtype=torch.float32), "hedgehog")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable(model).values():
        p.requires_grad_(True)
    return model


def check(model: torch.nn.Module, reference: torch.nn.Module, ids: torch.Tensor) -> None:
    assert not any(isinstance(m, FSDP) for m in model.modules())
    assert not any("_fsdp" in name for name, _ in model.named_modules())
    assert not any(mark in vars(m) for m in model.modules() for mark in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"))
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].shape == tensor.shape and state[name].dtype == tensor.dtype, name
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    buffers = dict(model.named_buffers())
    assert list(buffers) == [name for name, _ in reference.named_buffers()]
    for name, buffer in reference.named_buffers():  # non-persistent ones too (rotary frequencies)
        assert buffers[name].dtype == buffer.dtype and torch.equal(buffers[name], buffer), name
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert type(p) is torch.nn.Parameter and p.requires_grad == q.requires_grad, name
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=PROCESSES)
    try:
        reference, model = build(), build()
        ids = random_ids(2 * PROCESSES, 16)
        mine = ids[rank * 2 : rank * 2 + 2]  # each process takes its half of the batch, as the training loop does
        step(reference, list(trainable(reference).values()), ids)
        held = held_dtypes(model, trainable(model), SimpleNamespace(mixed_precision="no")), {n: b.clone() for n, b in model.named_buffers()}

        wrapped = wrap(model)
        assert any(p.numel() == 0 for p in model.parameters())  # sharded: some parameters live on the other process
        step(wrapped, [p for p in wrapped.parameters() if p.requires_grad], mine)
        for buffer in wrapped.buffers():  # what FSDP's mixed precision does to buffers, in place
            buffer.data = buffer.data.to(torch.bfloat16)
        assert unshard(wrapped, *held) is model
        check(model, reference, ids)

        # A second stage wraps the same model again; the accelerator's release gathers it back.
        step(reference, list(trainable(reference).values()), ids)
        wrapped = wrap(model)
        step(wrapped, [p for p in wrapped.parameters() if p.requires_grad], mine)
        accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, unwrap_model=lambda m, keep_fp32_wrapper: m, free_memory=lambda: None)
        assert release(accelerator, wrapped, held) is model
        check(model, reference, ids)
    finally:
        dist.destroy_process_group()


def test_unshard_gives_the_model_of_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port,), nprocs=PROCESSES, join=True)


def transfer_steps(forward: torch.nn.Module, probe: TransferProbe, ids: torch.Tensor, fsdp: bool, steps: int) -> list[float]:
    """`steps` attention-transfer steps through the stage's own step loss; the loss of each, over all processes."""
    params = [p for p in forward.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    losses = []
    with probe:
        for _ in range(steps):
            loss, _ = transfer_loss(forward, ids, probe, probe.layers, fsdp)
            loss.backward()
            if fsdp:  # the root's end-of-backward callback ran: it leaves every unit idle (a unit hook alone leaves it in BACKWARD_POST)
                assert all(u._handle._training_state == HandleTrainingState.IDLE for u in FSDP.fsdp_modules(forward) if u._handle)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            if fsdp:  # each process saw half the batch, and every layer's error is a mean over equal halves
                dist.all_reduce(loss)
                loss /= PROCESSES
            losses.append(loss.item())
    return losses


def transfer_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=PROCESSES)
    try:
        def build_transfer():
            # Wider random weights than the default, so the layers' errors (and their gradients) are far from zero.
            model = linearize.convert(tiny_model("llama", dtype=torch.float32, initializer_range=0.2), "hedgehog")
            for p in model.parameters():
                p.requires_grad_(False)
            for m in mixers_in(model):
                for p in m.new_parameters():
                    p.requires_grad_(True)
            return model

        reference, model = build_transfer(), build_transfer()
        initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
        ids = random_ids(2 * PROCESSES, 16)
        mine = ids[rank * 2 : rank * 2 + 2]
        steps = 3
        expected = transfer_steps(reference, TransferProbe(reference), ids, fsdp=False, steps=steps)
        trained = {name for name, p in reference.named_parameters() if p.requires_grad}
        assert len(trained) == sum(len(m.new_parameters()) for m in mixers_in(reference)) > 0  # the feature maps only
        for name in trained:  # every layer moved, so the comparison below means something
            assert not torch.allclose(initial[name], dict(reference.named_parameters())[name]), name

        held = held_dtypes(model, {}, SimpleNamespace(mixed_precision="no")), {n: b.clone() for n, b in model.named_buffers()}
        probe = TransferProbe(model)
        wrapped = wrap(model)
        assert any(p.numel() == 0 for p in model.parameters())
        losses = transfer_steps(wrapped, probe, mine, fsdp=True, steps=steps)
        assert unshard(wrapped, *held) is model
        torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-7)
        got = dict(model.named_parameters())
        for name, p in reference.named_parameters():
            torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def test_attention_transfer_trains_under_fsdp_as_on_one_process():
    """Attention transfer's loss flows through no FSDP unit's output (each layer passes the teacher output on), so
    FSDP's own pre-backward hooks never fire; the stage's step loss must bring back the sharded parameters."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(transfer_worker, args=(port,), nprocs=PROCESSES, join=True)


def test_resume_is_refused_under_fsdp_only():
    with pytest.raises(LinearizeError, match="ddp.yaml"):
        check_resume(SimpleNamespace(distributed_type=DistributedType.FSDP), resume=True)
    check_resume(SimpleNamespace(distributed_type=DistributedType.FSDP), resume=False)
    check_resume(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), resume=True)
