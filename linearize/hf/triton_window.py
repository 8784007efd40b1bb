"""A `hedgehog_swa` prefill in one chunked Triton kernel: Hedgehog linear attention plus a sliding softmax window under
one shared normaliser (LoLCATs), and its backward in two more.

The arithmetic is `ops_window.chunk_window_linear`'s (its docstring, and `naive_window_linear`, the reference): for
query t, keys in (t - window, t] weigh exp(q.k * scaling - m_t) * sm_weight (m_t: the largest of their scores, after the
softcap where there is one; 0 where none of them is real), older keys (fq_t . fk_s) * ln_weight, the carried state (S,
z) is read by fq with ln_weight, and the output is the weighted values over the weights; pad keys (key_mask False) weigh
nothing. First, at every CHUNK keys, the prefix sums of fk^T v and fk (pads masked) from the carried state on
(`prefix_states`: two more Triton kernels in inference, a batched matmul and a cumsum in training). Then one program per
(sequence, query head, block of BLOCK queries): it reads the prefix state at the last chunk boundary c <= t0 - window +
1 (t0: its first query), before which every key is linear for each of its queries, then walks the key tiles (BLOCK keys)
from c to its last query, giving each (query, key) its linear weight or its window's softmax weight. The window's part
is kept with an online max (its accumulators rescaled as the max grows), the linear part never rescaled, and the two are
added under one normaliser at the end. Query head i reads kv head i // (H // Hkv) directly: the caller does not repeat
k, v and fk.

Arithmetic is float32 and the output in v's dtype. The products q.k, fq.fk and fq S run on tensor cores: bf16/fp16
q and k as they are, the float32 feature maps in tf32, the weights cast to v's dtype before they meet the values (as
flash attention casts them); in float32 every product is float32 (input_precision "ieee"). Compiled for sm_90 with
ptxas at SmolLM2's shape (head dim 64, feature dim 64: 2F = 128), windows 64 and 256: blocks of 32 on 8 warps take 191
registers a thread and spill none in bf16 (fp16 alike; float32 spills 32 bytes), blocks of 64 spill 52 bytes on 8 warps
and 88 on 4, and run fastest on 4 all the same (`FORWARD`, which picks them for 16-bit inputs). At head dim 128
(2F = 256) blocks of 32 spill 1.8 KB.

The backward runs where an input requires grad (`TRAIN_OP`, a custom op around the kernel, which then also writes each
query's m_t and normaliser den_t, with `BACKWARD_OP` registered as its gradient). With do_t the output's gradient and D_t = do_t . o_t, every key weight
a_s of query t (window: sm_weight exp(sigma_s - m_t), linear: ln_weight fq_t . fk_s) has da_s = (do_t . v_s - D_t) /
den_t, and dv_s gains a_s do_t / den_t. A window weight's score gains da_s a_s, and the query's top key's score (the
argmax behind m_t, which is not detached, as in the reference) loses their sum; through the softcap's slope and scaling
they reach dq and dk. One kernel per (sequence, query head, block of queries) walks the forward's tiles again for dq,
dfq, the prefix state's share of dfq, the per-query sums behind the weights' gradients, and each query's top key; one
per (sequence, kv head, block of keys) walks the query blocks of each query head of its group whose tiles hold those
keys, for dk, dv and dfk (no atomics: the group's heads are summed in the program). The keys a query block reads
through its prefix state get their gradients in PyTorch: the state's gradient, fq^T (ln_weight do / den) summed over
the blocks that read it (a matmul a block), flows back through `prefix_states` (a cumsum and a matmul) by autograd, to
fk, v and the carried (S, z). Its blocks are BACKWARD's (64 queries and 4 warps in bfloat16, 32 and 8 in float16,
16 and 4 in float32); in a bfloat16 training step the feature products take bfloat16 operands (`LOW_FEATURES_IN_TRAINING`),
as autocast's PyTorch form does, where inference keeps them float32. Compiled for sm_90 at SmolLM2's shape, windows 64
and 256, blocks of 32 on 8 warps take 255 registers a thread in bfloat16 (and float16) and 245 and 161 in float32, and
spill none; blocks of 32 spill 0.3 and 0.8 KB in float32. Where
two window keys tie for a query's top score, m_t's gradient goes to the earlier one; torch's amax (the reference)
splits it between them: the same gradients but for dk, whose sum over the tied keys is the same.

A prefill that continues a state (a cache's second call of several tokens) has the state's window keys prepended in
PyTorch. The next state (S, z per kv head and the window's tail, `ops_window.window_tail`) is taken in PyTorch too,
from the prefix states (`state_after`).

Shipped as remote code next to saved models, as triton_step.py: Triton is imported inside a try block (there), and where
it is missing or the prefill does not fit (`window_prefill_problem`) the PyTorch path runs. It shares the fused decode
step's switch, `LINEARIZE_FUSED_STEP` (auto: CUDA tensors; on: CPU tensors too, through Triton's interpreter, for the
tests; off), since both are the fused inference kernels of one mixer; `LINEARIZE_KERNELS=torch` turns it off too.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .errors import LinearizeError
from .ops_window import _with_context, window_tail
from .triton_step import DTYPES, INTERPRETED, MAX_HEAD_DIM, TRITON_PROBLEM, fused_kernel_problem

if TRITON_PROBLEM is None:  # Triton as triton_step imported it: transformers' remote-code check skips relative imports
    from .triton_step import _float32, _operator, _registered, _rounded, tl, triton

# Queries a program of the forward takes and keys a tile holds, and the warps that take them, by q's dtype. On an H200
# (bf16, SmolLM2's shape, window 256, batch 1; BENCHMARKS.md, twenty-fourth session) blocks of 64 on 4 warps ran in
# 0.63 ms at 32K against 2.14 ms for blocks of 32 on 8 warps (1.25 ms on 4; blocks of 64 on 8: 1.10 ms), and in 0.23
# against 0.41 ms at 4K, though compiled for sm_90 they spill 88 bytes a thread. float32, unmeasured, keeps the blocks
# that spill least (32 on 8 warps: 32 bytes).
FORWARD = {torch.float16: (64, 4), torch.bfloat16: (64, 4), torch.float32: (32, 8)}
# The backward's blocks of queries and tiles of keys, and its warps, by q's dtype. A Llama-3.2-1B layer's training
# forward and backward (32 query heads on 8, batch 8, 2,048 tokens, window 256, bf16 feature products; H100;
# `benchmarks/window_training.py`, BENCHMARKS.md, fifty-ninth session): blocks of 64 on 4 warps 6.9 ms, on 8 warps 8.6,
# blocks of 32 on 4 warps 9.5, of 128 on 8 warps 9.4 (with float32 feature products: 64 on 4 warps 10.7 ms, 32 on 8
# 13.9). float16, unmeasured, keeps blocks of 32 on 8 warps; compiled for sm_90 at SmolLM2's shape, those spill in
# float32 (0.3 and 0.8 KB), not in 16-bit; blocks of 16 with 4 warps spill in neither (module docstring).
BACKWARD = {torch.float16: (32, 8), torch.bfloat16: (64, 4), torch.float32: (16, 4)}
# Whether a bf16 training step multiplies the feature maps (fq, fk, the prefix states, the linear weights' gradients)
# as bf16 operands, as autocast's PyTorch form does, where inference keeps them float32 (tf32 products): a Llama-3.2-1B
# layer's forward and backward 6.9 against 10.7 ms (blocks of 64 on 4 warps, above), the GPU gradient tests passing
# either way. float16 keeps float32 products: its range would hold prefix sums of long prompts less safely.
LOW_FEATURES_IN_TRAINING = True
# Keys per prefix state: the float32 states (2F x V per kv head) take CHUNK times less memory than a state per key
# (SmolLM2: 512 bytes a key and kv head, about what its k, v and fk take), for half a tile more work a program.
CHUNK = 64
# `prefix_states`' kernels: the features of a chunk's sums a program takes (its float32 product, up to 64 x 128, in
# registers), its products' precision, and the chunks and state entries of each tile of the running sums. "tf32x3"
# (three tf32 products on tensor cores, each operand split in two) keeps float32's accuracy: the sums' error against
# float64 was float32 matmul's on the CPU (emulated). On an H200 at 32K (SmolLM2's kv heads, bf16 v) both kernels took
# 0.17-0.19 ms a layer with it, 1.68 ms with "ieee" (float32 products on CUDA cores), against PyTorch's 0.56 ms
# (BENCHMARKS.md, twenty-fifth session).
SUM_FEATURES = 64
SUM_PRECISION = "tf32x3"
SCAN_TILE = 32
SCAN_LANES = 256
# A program holds its queries' feature maps and a key tile's (BLOCK x 2F, float32): up to 2 * MAX_HEAD_DIM features.
MAX_FEATURES = 2 * MAX_HEAD_DIM


def window_prefill_problem(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int) -> Optional[str]:
    """Why a `hedgehog_swa` prefill does not take the kernel (None when it does): the device and the switches
    (`fused_kernel_problem`), then `kernel_problem`.
    On CPU tensors it runs only with LINEARIZE_FUSED_STEP=on under Triton's interpreter (the tests)."""
    return fused_kernel_problem(q, "the fused prefill") or kernel_problem(q, k, v, fq, fk, window)


def kernel_problem(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int) -> Optional[str]:
    """Why `window_linear_prefill` cannot take these tensors (None when it can): Triton, the device, dtypes and sizes. q, fq (B, H, T, *); k, v, fk (B, Hkv, T, *), H a multiple of Hkv."""
    if TRITON_PROBLEM is not None:
        return TRITON_PROBLEM
    if not (q.is_cuda or INTERPRETED):
        return "the fused prefill runs on CUDA tensors (on CPU tensors under TRITON_INTERPRET=1)"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or fq.dtype not in DTYPES or fk.dtype != fq.dtype:
        return (f"the fused prefill takes q, k, v of one dtype and fq, fk of one, each float16/bfloat16/float32, got {q.dtype}, "
                f"{k.dtype}, {v.dtype}, {fq.dtype}, {fk.dtype}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM or fq.shape[-1] > MAX_FEATURES:
        return f"the fused prefill takes head dimensions up to {MAX_HEAD_DIM} and feature maps up to {MAX_FEATURES} wide"
    if window < 1 or q.shape[1] % k.shape[1]:
        return f"the fused prefill takes a window of at least 1 and whole groups of query heads per kv head, got {window}, {q.shape[1]} on {k.shape[1]}"
    return None


def _weights(weight, heads: int, like: Tensor) -> Tensor:
    """A per-query-head weight (H,) or a number as a contiguous float32 tensor (H,)."""
    return torch.as_tensor(weight, dtype=torch.float32, device=like.device).expand(heads).contiguous()


def window_linear_prefill(
    q, k, v, fq, fk, *, window, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None, state=None, output_state=False
):
    """`chunk_window_linear`'s output through the kernel (module docstring), with grouped heads: q, fq (B, H, T, *) the
    queries; k, v, fk (B, Hkv, T, *) the keys, query head i reading kv head i // (H // Hkv); `state` (or the new state
    returned with `output_state`) per kv head, as `decode_window_linear` keeps it. `sm_weight`/`ln_weight` are numbers
    or per-query-head tensors (H,). Returns (o (B, H, T, V) in v's dtype, the next state or None). Where gradients are
    on and an input (the state's too) requires grad, o has the kernels' backward (module docstring).

        with torch.no_grad():
            o, state = window_linear_prefill(q, k, v, fq, fk, window=64, scaling=0.125, state=state, output_state=True)
    """
    problem = kernel_problem(q, k, v, fq, fk, window)
    if problem is not None:
        raise LinearizeError(f"{problem}; for anything else call ops_window.chunk_window_linear (the PyTorch path)")
    # Under autocast (mixed-precision training) the PyTorch parts here would multiply in its dtype: they keep the
    # dtypes they ask for, float32 sums included.
    with torch.autocast(q.device.type, enabled=False):
        k_all, v_all, fk_all, mask, S, z = _with_context(q, k, v, fk, key_mask, state)
        sm, ln = _weights(sm_weight, q.shape[1], q), _weights(ln_weight, q.shape[1], q)
        mask = mask.contiguous()
        # Without a key mask or a carried state every key is real: the prefix sums and the next state skip the mask.
        # (`state is not None`, not `bool(state)`: torch 2.11's Dynamo cannot trace bool() of a dict, and broke a
        # compiled chunked prefill's graph at every layer there.)
        masked = key_mask is not None or state is not None
        prefix_S, prefix_z = prefix_states(fk_all, v_all, mask, S, z, CHUNK, masked=masked)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_all, v_all, fq, fk_all, S, z, sm, ln)):
            o = TRAIN_OP(q, k_all, v_all, fq, fk_all, mask, prefix_S, prefix_z, sm, ln, window, scaling, softcap)[0].to(v.dtype)
        else:
            o = window_prefill(q, k_all, v_all, fq, fk_all, mask, prefix_S, prefix_z, sm, ln, window, scaling, softcap)
        return o, (state_after(k_all, v_all, fk_all, mask, prefix_S, prefix_z, window, masked) if output_state else None)


def prefix_states(fk: Tensor, v: Tensor, mask: Tensor, S: Tensor, z: Tensor, block: int, masked: bool = True) -> tuple[Tensor, Tensor]:
    """(S, z) before each chunk of `block` keys: the carried S (B, Hkv, 2F, V) and z (B, Hkv, 2F) plus the sums of
    fk^T v and fk over the real keys (`mask`, unread where not `masked`) of the chunks before it; float32,
    (B, Hkv, chunks, 2F, V) and (B, Hkv, chunks, 2F). Where nothing needs a gradient (inference) and Triton runs here,
    two kernels (`_chunk_sums_kernel`, then `_running_sums_kernel`); otherwise PyTorch, through which autograd takes the
    backward. On an H200 at 32K (SmolLM2's kv heads, bf16 v) PyTorch's matmul and its cumsum over the chunks' dimension
    took 0.56 ms a layer, the two kernels 0.17-0.19 ms (BENCHMARKS.md, twenty-fifth session)."""
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (fk, v, S, z))
    S, z = S.to(torch.float32), z.to(torch.float32)
    if TRITON_PROBLEM is None and (fk.is_cuda or INTERPRETED) and not grads:
        return _prefix_kernels(fk, v, mask, S, z, block, masked)
    return _prefix_sums(fk, v, mask, S, z, block, masked)


def _prefix_sums(fk: Tensor, v: Tensor, mask: Tensor, S: Tensor, z: Tensor, block: int, masked: bool) -> tuple[Tensor, Tensor]:
    """`prefix_states` in PyTorch: a batched matmul of the chunks and a cumsum along them."""
    b, hkv, total, width = fk.shape
    chunks = math.ceil(total / block)
    # The last chunk's sum reaches no boundary: only the keys of the first chunks - 1 are summed.
    whole = (chunks - 1) * block
    fkc = fk[:, :, :whole].to(torch.float32)
    if masked:
        fkc = fkc * mask[:, None, :whole, None]
    fkc = fkc.reshape(b, hkv, chunks - 1, block, width)
    vc = v[:, :, :whole].to(torch.float32).reshape(b, hkv, chunks - 1, block, v.shape[-1])
    prefix_S = torch.cat((S[:, :, None], fkc.transpose(-1, -2) @ vc), dim=2).cumsum_(2)
    prefix_z = torch.cat((z[:, :, None], fkc.sum(3)), dim=2).cumsum_(2)
    return prefix_S, prefix_z


def _prefix_launch(fk: Tensor, v: Tensor, mask: Tensor, S: Tensor, z: Tensor, block: int, masked: bool) -> tuple[Tensor, Tensor]:
    """`prefix_states` in two launches (the custom op `PREFIX_OP`, which a compiled model calls; eager code launches
    them directly, `_prefix_kernels`): each chunk's sums (and the carried float32 state, as chunk 0's), then their
    running sums in place along the chunks."""
    batch, kv_heads, total, width = fk.shape
    value_dim = v.shape[-1]
    chunks = math.ceil(total / block)
    fk, v, S, z = _contiguous_rows(fk, v) + (S.contiguous(), z.contiguous())
    prefix_S = torch.empty(batch, kv_heads, chunks, width, value_dim, dtype=torch.float32, device=fk.device)
    prefix_z = torch.empty(batch, kv_heads, chunks, width, dtype=torch.float32, device=fk.device)
    features = min(SUM_FEATURES, max(triton.next_power_of_2(width), 16))
    _chunk_sums_kernel[(batch * kv_heads, chunks, triton.cdiv(width, features))](
        fk, v, mask, S, z, prefix_S, prefix_z, fk.stride(0), fk.stride(1), fk.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), chunks, KV_HEADS=kv_heads, WIDTH=width, VALUE_DIM=value_dim, BLOCK_FEATURES=features,
        BLOCK_VALUE=max(triton.next_power_of_2(value_dim), 16), CHUNK=block, MASKED=masked, PRECISION=SUM_PRECISION, num_warps=4,
    )
    lanes_S, lanes_z = triton.cdiv(width * value_dim, SCAN_LANES), triton.cdiv(width, SCAN_LANES)
    _running_sums_kernel[(batch * kv_heads, lanes_S + lanes_z)](
        prefix_S, prefix_z, chunks, lanes_S, WIDTH=width, VALUE_DIM=value_dim, TILE=SCAN_TILE, LANES=SCAN_LANES, num_warps=4,
    )
    return prefix_S, prefix_z


def state_after(
    k: Tensor, v: Tensor, fk: Tensor, mask: Tensor, prefix_S: Tensor, prefix_z: Tensor, window: int, masked: bool = True
) -> dict[str, Tensor]:
    """The state after the keys k, v, fk (B, Hkv, total, *), as `ops_window._next_state` makes it (every key but the last
    window - 1 folded into S, z; those kept as the window's context), from their prefix states: the last one at or
    before the first kept key, plus the few keys (under a chunk) between them, their pads (`mask`) left out unless not
    `masked` (no key can be a pad). Not a sum over every key again: at 32K that float32 matmul, of a 32K-long inner
    dimension, took 1.5 ms a layer on an H200 (twenty-fourth session)."""
    keep = max(window - 1, 0)
    total = k.shape[2]
    cut = max(total - keep, 0)
    chunk = min(cut // CHUNK, prefix_S.shape[2] - 1)
    start = chunk * CHUNK
    fk_rest = fk[:, :, start:cut].to(torch.float32)
    if masked:
        fk_rest = fk_rest * mask[:, None, start:cut, None]
    return {
        "S": prefix_S[:, :, chunk] + fk_rest.transpose(-1, -2) @ v[:, :, start:cut].to(torch.float32),
        "z": prefix_z[:, :, chunk] + fk_rest.sum(2),
        **window_tail(keep, mask, k=k, v=v, fk=fk),
    }


def _prefill(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, mask: Tensor, prefix_S: Tensor, prefix_z: Tensor, sm_weight: Tensor,
    ln_weight: Tensor, window: int, scaling: float, softcap: Optional[float],
) -> Tensor:
    """The heads (B, H, T, V) in v's dtype of a prefill of T queries against the `total` keys k, v, fk (B, Hkv, total, *)
    of which mask (B, total) marks the real ones, the last T the queries' own, from the prefix states before each chunk."""
    return _forward(q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, window, scaling, softcap)


def _contiguous_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def low_features(dtype: torch.dtype, training: bool) -> bool:
    """Whether the kernels' feature products take q's dtype as operands: in a bf16 `training` step, where
    `LOW_FEATURES_IN_TRAINING`; float32 products everywhere else."""
    return training and LOW_FEATURES_IN_TRAINING and dtype == torch.bfloat16


def _shared(q, k, v, fq, fk, mask, window, scaling, softcap, block, warps, training=False) -> tuple[tuple, dict]:
    """The strides and sizes every kernel here takes after its tensors, and their shapes and blocks as constants; the
    feature products as `low_features` picks them."""
    dim, value_dim, width = q.shape[-1], v.shape[-1], fk.shape[-1]
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        fq.stride(0), fq.stride(1), fq.stride(2), fk.stride(0), fk.stride(1), fk.stride(2), mask.stride(0),
        q.shape[2], k.shape[2], math.ceil(k.shape[2] / CHUNK), scaling, 1.0 if softcap is None else softcap,
    )
    constants = dict(
        HEADS=q.shape[1], KV_HEADS=k.shape[1], DIM=dim, VALUE_DIM=value_dim, WIDTH=width,
        BLOCK_DIM=max(triton.next_power_of_2(dim), 16), BLOCK_VALUE=max(triton.next_power_of_2(value_dim), 16),
        BLOCK_WIDTH=max(triton.next_power_of_2(width), 16), BLOCK=block, CHUNK=CHUNK, WINDOW=window, SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRETED=INTERPRETED, num_warps=warps,
        LOW_FEATURES=low_features(q.dtype, training),
    )
    return strides, constants


def _forward(q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, window, scaling, softcap, stats=False):
    """The kernel's heads (B, H, T, V) in v's dtype from the prefix states; with `stats`, the heads in float32 and each
    query's m_t and normaliser (float32 (B, H, T)), which the backward takes. Its D_t = do_t . o_t takes the float32
    heads: in bfloat16 (B 1, T 100, SmolLM2's heads, interpreted), with heads rounded to bfloat16 the gradients of fq, fk
    and the weights' share were 2e-3, 7e-4 and 2e-2 of their largest entry off float32 PyTorch's (the rounding of o
    against sums that cancel); with the float32 heads 7e-4, 2e-4 and 4e-3, as q's, k's and v's (3e-3 to 5e-3)."""
    q, k, v, fq, fk = _contiguous_rows(q, k, v, fq, fk)
    batch, heads, length, _ = q.shape
    out = torch.empty(batch, heads, length, v.shape[-1], dtype=torch.float32 if stats else v.dtype, device=v.device)
    peak, den = (torch.empty(batch, heads, length, dtype=torch.float32, device=q.device) for _ in range(2)) if stats else (out, out)
    block, warps = FORWARD[q.dtype]
    strides, constants = _shared(q, k, v, fq, fk, mask, window, scaling, softcap, block, warps, training=stats)
    _window_linear_kernel[(batch * heads, triton.cdiv(length, block))](
        q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, out, peak, den, *strides, STATS=stats, **constants,
    )
    return (out, peak, den) if stats else out


def _train(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, mask: Tensor, prefix_S: Tensor, prefix_z: Tensor, sm_weight: Tensor,
    ln_weight: Tensor, window: int, scaling: float, softcap: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """A training prefill's forward: the heads in float32, each query's m_t and its normaliser (`_forward` with stats)."""
    return _forward(q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, window, scaling, softcap, stats=True)


def _backward(
    grad: Tensor, out: Tensor, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, mask: Tensor, prefix_S: Tensor,
    prefix_z: Tensor, sm_weight: Tensor, ln_weight: Tensor, peak: Tensor, den: Tensor, window: int, scaling: float,
    softcap: Optional[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients (float32) of q, k, v, fq, fk, prefix_S, prefix_z, sm_weight and ln_weight given the float32 heads'
    (`grad`), from `_train`'s outputs (module docstring)."""
    q, k, v, fq, fk = _contiguous_rows(q, k, v, fq, fk)
    batch, heads, length, _ = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    grad = grad.to(v.dtype).contiguous()
    rden = 1.0 / den
    delta = (grad.to(torch.float32) * out.to(torch.float32)).sum(-1)
    dq, dfq = (torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in (q, fq))  # contiguous, as the kernel writes them
    window_grad, linear_grad = torch.empty_like(peak), torch.empty_like(peak)
    top = torch.empty(peak.shape, dtype=torch.int32, device=q.device)
    block, warps = BACKWARD[q.dtype]
    strides, constants = _shared(q, k, v, fq, fk, mask, window, scaling, softcap, block, warps, training=True)
    _window_linear_dq_kernel[(batch * heads, triton.cdiv(length, block))](
        q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, grad, peak, rden, delta,
        dq, dfq, window_grad, linear_grad, top, *strides, **constants,
    )
    dk, dv, dfk = (torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in (k, v, fk))
    _window_linear_dk_kernel[(batch * kv_heads, triton.cdiv(total, block))](
        q, k, v, fq, fk, mask, sm_weight, ln_weight, grad, peak, rden, delta, window_grad, top,
        dk, dv, dfk, *strides, **constants,
    )
    # The keys before a block's prefix state reach its queries through that state: d(prefix state) sums, over the
    # blocks that read it, fq^T (ln_weight * grad / den) and -fq^T (ln_weight * delta / den), a matmul a block.
    blocks = triton.cdiv(length, block)
    pad = blocks * block - length
    scale = (ln_weight[:, None] * rden).unsqueeze(-1)

    def by_block(x: Tensor) -> Tensor:  # (B, H, T, *) -> (B, Hkv, blocks, group * block, *)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(batch, kv_heads, heads // kv_heads, blocks, block, -1)
        return x.transpose(2, 3).flatten(3, 4)

    fq_blocks = by_block(fq.to(torch.float32)).transpose(-1, -2)
    d_S = fq_blocks @ by_block(grad.to(torch.float32) * scale)
    d_z = (fq_blocks @ by_block(-delta.unsqueeze(-1) * scale)).squeeze(-1)
    first = total - length + torch.arange(blocks, device=q.device) * block
    chunk = (first - window + 1).clamp_min(0) // CHUNK
    d_prefix_S = torch.zeros_like(prefix_S).index_add_(2, chunk, d_S)
    d_prefix_z = torch.zeros_like(prefix_z).index_add_(2, chunk, d_z)
    return dq, dk, dv, dfq, dfk, d_prefix_S, d_prefix_z, window_grad.sum((0, 2)), linear_grad.sum((0, 2))


if TRITON_PROBLEM is None:

    @triton.jit
    def _tile(x, b, head, rows, stride_b, stride_h, stride_t, lanes, in_rows, WIDTH: tl.constexpr):
        """Rows `rows` of head `head` of sequence b of x (B, heads, T, WIDTH), `lanes` wide, 0 past them, in x's dtype."""
        offsets = b * stride_b + head * stride_h + rows[:, None] * stride_t + lanes[None, :]
        return tl.load(x + offsets, mask=in_rows[:, None] & (lanes < WIDTH)[None, :], other=0.0)

    @triton.jit
    def _operand(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
        """x as a tensor-core product's operand in `dtype`. Triton's interpreter (tests) multiplies bfloat16 tiles wrongly
        (values near 1e10): there, x's values rounded to `dtype` as the compiled cast rounds them, held in float32."""
        if INTERPRETED:
            return _rounded(x.to(tl.float32), dtype)
        return x.to(dtype)

    @triton.jit
    def _features(x, dtype: tl.constexpr, LOW_FEATURES: tl.constexpr, INTERPRETED: tl.constexpr):
        """float32 x as a feature product's operand: in `dtype` where LOW_FEATURES (a bf16 training step), else as it is
        (tf32 or ieee products)."""
        if LOW_FEATURES:
            y = _operand(x, dtype, INTERPRETED)
        else:
            y = x
        return y

    @triton.jit
    def _query_block(
        q, fq, stride_qb, stride_qh, stride_qt, stride_fqb, stride_fqh, stride_fqt, length, total,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, WIDTH: tl.constexpr, BLOCK_DIM: tl.constexpr,
        BLOCK_VALUE: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
        LOW_FEATURES: tl.constexpr,
    ):
        """Program (b * HEADS + h, n)'s sequence b, query head h, its kv head j (and b's row of kv heads, head), the
        lanes of a head (d), a value (e) and a feature map (f), its queries n * BLOCK .. (n + 1) * BLOCK - 1 (rows, in_rows:
        before `length`) at key positions t from `first` (the queries are the last `length` of the `total` keys), and
        their q (a tensor-core operand) and fq (float32, or q's dtype with LOW_FEATURES)."""
        b = (tl.program_id(0) // HEADS).to(tl.int64)  # offsets past 2^31 elements (B 128, 32K: q's; B 512, 4K: fq's)
        h = tl.program_id(0) % HEADS
        j = h // (HEADS // KV_HEADS)
        head = b * KV_HEADS + j
        d, e, f = tl.arange(0, BLOCK_DIM), tl.arange(0, BLOCK_VALUE), tl.arange(0, BLOCK_WIDTH)
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_rows = rows < length
        first = total - length + tl.program_id(1) * BLOCK
        t = first + tl.arange(0, BLOCK)
        q_tile = _operand(_tile(q, b, h, rows, stride_qb, stride_qh, stride_qt, d, in_rows, DIM), q.dtype.element_ty, INTERPRETED)
        fq_tile = _tile(fq, b, h, rows, stride_fqb, stride_fqh, stride_fqt, f, in_rows, WIDTH).to(tl.float32)
        fq_tile = _features(fq_tile, q.dtype.element_ty, LOW_FEATURES, INTERPRETED)
        return b, h, j, head, d, e, f, rows, in_rows, first, t, q_tile, fq_tile

    @triton.jit
    def _key_tile(
        k, v, fk, mask, b, j, t, s, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_fkb, stride_fkh, stride_fkt, stride_mask, total, d, e, f,
        DIM: tl.constexpr, VALUE_DIM: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr, WINDOW: tl.constexpr,
        INTERPRETED: tl.constexpr, LOW_FEATURES: tl.constexpr,
    ):
        """Keys s .. s + BLOCK - 1 of kv head j of sequence b: k and v as tensor-core operands, fk in float32 (k's dtype
        with LOW_FEATURES), and which
        of them each query t (its key position) reads in its window and which linearly (real keys only)."""
        cols = s + tl.arange(0, BLOCK)
        in_cols = cols < total
        real = tl.load(mask + b * stride_mask + cols, mask=in_cols, other=0) != 0
        k_tile = _operand(_tile(k, b, j, cols, stride_kb, stride_kh, stride_kt, d, in_cols, DIM), k.dtype.element_ty, INTERPRETED)
        v_tile = _operand(_tile(v, b, j, cols, stride_vb, stride_vh, stride_vt, e, in_cols, VALUE_DIM), v.dtype.element_ty, INTERPRETED)
        fk_tile = _tile(fk, b, j, cols, stride_fkb, stride_fkh, stride_fkt, f, in_cols, WIDTH).to(tl.float32)
        fk_tile = _features(fk_tile, k.dtype.element_ty, LOW_FEATURES, INTERPRETED)
        distance = t[:, None] - cols[None, :]
        in_window = (distance >= 0) & (distance < WINDOW) & real[None, :]
        in_linear = (distance >= WINDOW) & real[None, :]
        return k_tile, v_tile, fk_tile, in_window, in_linear

    @triton.jit
    def _scores(q_tile, k_tile, scaling, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
        """A tile's scores sigma (after the softcap) and their derivative in q.k * scaling, as the forward computes them."""
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION) * scaling
        if SOFTCAP:
            fall = tl.exp(-2.0 * tl.abs(scores / softcap))
            scores = tl.where(scores < 0, -1.0, 1.0) * (1.0 - fall) / (1.0 + fall) * softcap
            return scores, 1.0 - (scores / softcap) * (scores / softcap)
        return scores, tl.full(scores.shape, 1.0, tl.float32)

    @triton.jit
    def _window_linear_kernel(
        q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, out, peak_out, den_out,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_fqb, stride_fqh, stride_fqt, stride_fkb, stride_fkh, stride_fkt, stride_mask,
        length, total, chunks, scaling, softcap,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, VALUE_DIM: tl.constexpr, WIDTH: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_VALUE: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
        WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, STATS: tl.constexpr,
        LOW_FEATURES: tl.constexpr,
    ):
        """Program (b * HEADS + h, n): query head h of sequence b, its queries n * BLOCK .. (n + 1) * BLOCK - 1 (module
        docstring). The queries are the last `length` of the `total` keys. With STATS it also writes each query's m_t
        and normaliser (float32, (B, H, T)) to peak_out and den_out."""
        scaling, softcap = _float32(scaling), _float32(softcap)
        b, h, j, head, d, e, f, rows, in_rows, first, t, q_tile, fq_tile = _query_block(
            q, fq, stride_qb, stride_qh, stride_qt, stride_fqb, stride_fqh, stride_fqt, length, total, HEADS, KV_HEADS, DIM,
            WIDTH, BLOCK_DIM, BLOCK_VALUE, BLOCK_WIDTH, BLOCK, INTERPRETED, LOW_FEATURES,
        )
        # Every key before the last chunk boundary at or before first - WINDOW + 1 is linear for each query here: the
        # prefix state there reads them all.
        lowest = first - WINDOW + 1
        start = tl.where(lowest > 0, lowest, 0) // CHUNK * CHUNK
        state = (head * chunks + start // CHUNK) * WIDTH + f
        S = tl.load(prefix_S + state[:, None] * VALUE_DIM + e[None, :], mask=(f < WIDTH)[:, None] & (e < VALUE_DIM)[None, :], other=0.0)
        linear = tl.dot(fq_tile, _features(S, q.dtype.element_ty, LOW_FEATURES, INTERPRETED), input_precision=PRECISION)
        linear_total = tl.sum(fq_tile * tl.load(prefix_z + state, mask=f < WIDTH, other=0.0)[None, :], 1)
        peak = tl.full([BLOCK], float("-inf"), tl.float32)
        window_total = tl.zeros([BLOCK], dtype=tl.float32)
        windowed = tl.zeros([BLOCK, BLOCK_VALUE], dtype=tl.float32)
        # The keys from `start` to the block's last query, at most WINDOW + CHUNK + BLOCK - 3, span at most TILES tiles.
        # A constant trip count: Triton's interpreter (the tests) takes no loop bound computed in the kernel.
        TILES: tl.constexpr = (WINDOW + CHUNK + 2 * BLOCK - 3) // BLOCK
        for tile in range(TILES):
            s = start + tile * BLOCK
            if s < first + BLOCK:  # else the tile is past the block's last query
                k_tile, v_tile, fk_tile, in_window, in_linear = _key_tile(
                    k, v, fk, mask, b, j, t, s, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                    stride_fkb, stride_fkh, stride_fkt, stride_mask, total, d, e, f, DIM, VALUE_DIM, WIDTH, BLOCK, WINDOW,
                    INTERPRETED, LOW_FEATURES,
                )
                scores, _ = _scores(q_tile, k_tile, scaling, softcap, SOFTCAP, PRECISION)
                scores = tl.where(in_window, scores, float("-inf"))
                new_peak = tl.maximum(peak, tl.max(scores, 1))
                base = tl.where(new_peak == float("-inf"), 0.0, new_peak)
                rescale = tl.exp(peak - base)
                a_window = tl.where(in_window, tl.exp(scores - base[:, None]), 0.0)
                a_linear = tl.where(in_linear, tl.dot(fq_tile, tl.trans(fk_tile), input_precision=PRECISION), 0.0)
                window_total = window_total * rescale + tl.sum(a_window, 1)
                windowed = windowed * rescale[:, None] + tl.dot(_operand(a_window, v.dtype.element_ty, INTERPRETED), v_tile, input_precision=PRECISION)
                linear_total += tl.sum(a_linear, 1)
                linear += tl.dot(_operand(a_linear, v.dtype.element_ty, INTERPRETED), v_tile, input_precision=PRECISION)
                peak = new_peak
        sm = tl.load(sm_weight + h)
        ln = tl.load(ln_weight + h)
        den = tl.maximum(sm * window_total + ln * linear_total, 1e-30)
        heads = (sm * windowed + ln * linear) / den[:, None]
        dtype = out.dtype.element_ty
        offsets = ((b * HEADS + h) * length + rows[:, None]) * VALUE_DIM + e[None, :]
        tl.store(out + offsets, _rounded(heads, dtype).to(dtype), mask=in_rows[:, None] & (e < VALUE_DIM)[None, :])
        if STATS:  # what the backward reads: each query's m_t and normaliser
            stat = (b * HEADS + h) * length + rows
            tl.store(peak_out + stat, tl.where(peak == float("-inf"), 0.0, peak), mask=in_rows)
            tl.store(den_out + stat, den, mask=in_rows)

    @triton.jit
    def _window_linear_dq_kernel(
        q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, grad, peak, rden, delta,
        dq, dfq, window_grad, linear_grad, top,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_fqb, stride_fqh, stride_fqt, stride_fkb, stride_fkh, stride_fkt, stride_mask,
        length, total, chunks, scaling, softcap,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, VALUE_DIM: tl.constexpr, WIDTH: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_VALUE: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
        WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
        LOW_FEATURES: tl.constexpr,
    ):
        """The forward's program (b * HEADS + h, n) backwards: its queries' dq and dfq, over the same prefix state and key
        tiles; per query, the sums over its window keys of da_s exp(sigma_s - m_t) (window_grad: sm_weight's gradient)
        and over its linear keys of da_s fq_t . fk_s (linear_grad), and its window's top key (-1: none), which takes
        m_t's gradient, -sm_weight * window_grad (the first of equal tops: torch's amax splits it among them)."""
        scaling, softcap = _float32(scaling), _float32(softcap)
        b, h, j, head, d, e, f, rows, in_rows, first, t, q_tile, fq_tile = _query_block(
            q, fq, stride_qb, stride_qh, stride_qt, stride_fqb, stride_fqh, stride_fqt, length, total, HEADS, KV_HEADS, DIM,
            WIDTH, BLOCK_DIM, BLOCK_VALUE, BLOCK_WIDTH, BLOCK, INTERPRETED, LOW_FEATURES,
        )
        sm = tl.load(sm_weight + h)
        ln = tl.load(ln_weight + h)
        query = (b * HEADS + h) * length + rows
        do_tile = _operand(tl.load(grad + query[:, None] * VALUE_DIM + e[None, :], mask=in_rows[:, None] & (e < VALUE_DIM)[None, :], other=0.0), grad.dtype.element_ty, INTERPRETED)
        m = tl.load(peak + query, mask=in_rows, other=0.0)
        r = tl.load(rden + query, mask=in_rows, other=0.0)
        D = tl.load(delta + query, mask=in_rows, other=0.0)
        lowest = first - WINDOW + 1
        start = tl.where(lowest > 0, lowest, 0) // CHUNK * CHUNK
        state = (head * chunks + start // CHUNK) * WIDTH + f
        S = tl.load(prefix_S + state[:, None] * VALUE_DIM + e[None, :], mask=(f < WIDTH)[:, None] & (e < VALUE_DIM)[None, :], other=0.0)
        # The keys before `start`, through the prefix state: d(fq_t) = ln (S do_t - z D_t) / den_t.
        through_state = (tl.dot(do_tile.to(tl.float32) * r[:, None], tl.trans(S), input_precision=PRECISION)
                         - (D * r)[:, None] * tl.load(prefix_z + state, mask=f < WIDTH, other=0.0)[None, :])
        linear_sum = tl.sum(fq_tile * through_state, 1)
        d_fq = ln * through_state
        d_q = tl.zeros([BLOCK, BLOCK_DIM], dtype=tl.float32)
        window_sum = tl.zeros([BLOCK], dtype=tl.float32)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_key = tl.full([BLOCK], -1, tl.int32)
        TILES: tl.constexpr = (WINDOW + CHUNK + 2 * BLOCK - 3) // BLOCK
        for tile in range(TILES):
            s = start + tile * BLOCK
            if s < first + BLOCK:
                k_tile, v_tile, fk_tile, in_window, in_linear = _key_tile(
                    k, v, fk, mask, b, j, t, s, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                    stride_fkb, stride_fkh, stride_fkt, stride_mask, total, d, e, f, DIM, VALUE_DIM, WIDTH, BLOCK, WINDOW,
                    INTERPRETED, LOW_FEATURES,
                )
                scores, slope = _scores(q_tile, k_tile, scaling, softcap, SOFTCAP, PRECISION)
                scores = tl.where(in_window, scores, float("-inf"))
                tile_best = tl.max(scores, 1)
                tile_key = (s + tl.argmax(scores, 1)).to(tl.int32)
                better = tile_best > best
                best = tl.where(better, tile_best, best)
                best_key = tl.where(better, tile_key, best_key)
                # da_s = (do_t . v_s - D_t) / den_t for every key weight a_s.
                da = (tl.dot(do_tile, tl.trans(v_tile), input_precision=PRECISION) - D[:, None]) * r[:, None]
                unit = tl.where(in_window, tl.exp(scores - m[:, None]), 0.0)
                window_sum += tl.sum(da * unit, 1)
                d_scores = da * unit * slope * (sm * scaling)
                d_q += tl.dot(_operand(d_scores, k.dtype.element_ty, INTERPRETED), k_tile, input_precision=PRECISION)
                d_linear = tl.where(in_linear, da, 0.0)
                linear_sum += tl.sum(d_linear * tl.dot(fq_tile, tl.trans(fk_tile), input_precision=PRECISION), 1)
                d_fq += ln * tl.dot(_features(d_linear, k.dtype.element_ty, LOW_FEATURES, INTERPRETED), fk_tile, input_precision=PRECISION)
        # m_t's gradient, -sm * window_sum, goes to its top key's score.
        found = best_key >= 0
        top_k = _tile(k, b, j, tl.where(found, best_key, 0), stride_kb, stride_kh, stride_kt, d, in_rows & found, DIM).to(tl.float32)
        if SOFTCAP:
            capped = tl.where(found, best, 0.0) / softcap
            top_slope = 1.0 - capped * capped
        else:
            top_slope = 1.0
        d_q -= (sm * window_sum * top_slope * scaling)[:, None] * top_k
        in_d = in_rows[:, None] & (d < DIM)[None, :]
        tl.store(dq + query[:, None] * DIM + d[None, :], d_q, mask=in_d)
        tl.store(dfq + query[:, None] * WIDTH + f[None, :], d_fq, mask=in_rows[:, None] & (f < WIDTH)[None, :])
        tl.store(window_grad + query, window_sum, mask=in_rows)
        tl.store(linear_grad + query, linear_sum, mask=in_rows)
        tl.store(top + query, best_key, mask=in_rows)

    @triton.jit
    def _window_linear_dk_kernel(
        q, k, v, fq, fk, mask, sm_weight, ln_weight, grad, peak, rden, delta, window_grad, top,
        dk, dv, dfk,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_fqb, stride_fqh, stride_fqt, stride_fkb, stride_fkh, stride_fkt, stride_mask,
        length, total, chunks, scaling, softcap,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, VALUE_DIM: tl.constexpr, WIDTH: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_VALUE: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
        WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
        LOW_FEATURES: tl.constexpr,
    ):
        """Program (b * KV_HEADS + j, n): the keys n * BLOCK .. (n + 1) * BLOCK - 1 of kv head j of sequence b, their dk,
        dv and dfk from every query block of every query head of the group whose tiles hold them (the forward's loop:
        tiles from the block's prefix state to its last query); the keys before a block's prefix state reach it through
        that state, whose gradient the caller takes."""
        scaling, softcap = _float32(scaling), _float32(softcap)
        b = (tl.program_id(0) // KV_HEADS).to(tl.int64)  # offsets past 2^31 elements (`_query_block`)
        j = tl.program_id(0) % KV_HEADS
        GROUPS: tl.constexpr = HEADS // KV_HEADS
        d, e, f = tl.arange(0, BLOCK_DIM), tl.arange(0, BLOCK_VALUE), tl.arange(0, BLOCK_WIDTH)
        s = tl.program_id(1) * BLOCK
        cols = s + tl.arange(0, BLOCK)
        in_cols = cols < total
        real = tl.load(mask + b * stride_mask + cols, mask=in_cols, other=0) != 0
        k_tile = _operand(_tile(k, b, j, cols, stride_kb, stride_kh, stride_kt, d, in_cols, DIM), k.dtype.element_ty, INTERPRETED)
        v_tile = _operand(_tile(v, b, j, cols, stride_vb, stride_vh, stride_vt, e, in_cols, VALUE_DIM), v.dtype.element_ty, INTERPRETED)
        fk_tile = _features(_tile(fk, b, j, cols, stride_fkb, stride_fkh, stride_fkt, f, in_cols, WIDTH).to(tl.float32), k.dtype.element_ty, LOW_FEATURES, INTERPRETED)
        d_k = tl.zeros([BLOCK, BLOCK_DIM], dtype=tl.float32)
        d_v = tl.zeros([BLOCK, BLOCK_VALUE], dtype=tl.float32)
        d_fk = tl.zeros([BLOCK, BLOCK_WIDTH], dtype=tl.float32)
        # The query blocks whose tiles hold these keys start after s - BLOCK and before s + CHUNK + WINDOW - 1: at most
        # BLOCKS of them from the first, `lowest`.
        context = total - length
        after = s - BLOCK + 1 - context
        lowest = tl.where(after > 0, after + BLOCK - 1, 0) // BLOCK
        BLOCKS: tl.constexpr = (WINDOW + CHUNK + 2 * BLOCK - 2) // BLOCK
        for g in range(GROUPS):
            h = j * GROUPS + g
            sm = tl.load(sm_weight + h)
            ln = tl.load(ln_weight + h)
            for i in range(BLOCKS):
                n = lowest + i
                first = context + n * BLOCK
                earliest = first - WINDOW + 1
                start = tl.where(earliest > 0, earliest, 0) // CHUNK * CHUNK
                if (n * BLOCK < length) & (start <= s) & (s < first + BLOCK):
                    rows = n * BLOCK + tl.arange(0, BLOCK)
                    in_rows = rows < length
                    t = first + tl.arange(0, BLOCK)
                    q_raw = _tile(q, b, h, rows, stride_qb, stride_qh, stride_qt, d, in_rows, DIM)
                    q_tile = _operand(q_raw, q.dtype.element_ty, INTERPRETED)
                    fq_tile = _features(_tile(fq, b, h, rows, stride_fqb, stride_fqh, stride_fqt, f, in_rows, WIDTH).to(tl.float32), q.dtype.element_ty, LOW_FEATURES, INTERPRETED)
                    query = (b * HEADS + h) * length + rows
                    do_tile = _operand(tl.load(grad + query[:, None] * VALUE_DIM + e[None, :], mask=in_rows[:, None] & (e < VALUE_DIM)[None, :], other=0.0), grad.dtype.element_ty, INTERPRETED)
                    m = tl.load(peak + query, mask=in_rows, other=0.0)
                    r = tl.load(rden + query, mask=in_rows, other=0.0)
                    D = tl.load(delta + query, mask=in_rows, other=0.0)
                    top_gain = sm * tl.load(window_grad + query, mask=in_rows, other=0.0)
                    top_key = tl.load(top + query, mask=in_rows, other=-1)
                    distance = t[:, None] - cols[None, :]
                    in_window = (distance >= 0) & (distance < WINDOW) & real[None, :]
                    in_linear = (distance >= WINDOW) & real[None, :]
                    scores, slope = _scores(q_tile, k_tile, scaling, softcap, SOFTCAP, PRECISION)
                    unit = tl.where(in_window, tl.exp(tl.where(in_window, scores, float("-inf")) - m[:, None]), 0.0)
                    linear = tl.where(in_linear, tl.dot(fq_tile, tl.trans(fk_tile), input_precision=PRECISION), 0.0)
                    da = (tl.dot(do_tile, tl.trans(v_tile), input_precision=PRECISION) - D[:, None]) * r[:, None]
                    d_sigma = sm * da * unit - tl.where(cols[None, :] == top_key[:, None], top_gain[:, None], 0.0)
                    d_scores = d_sigma * slope * scaling
                    d_k += tl.dot(tl.trans(_operand(d_scores, q.dtype.element_ty, INTERPRETED)), q_tile, input_precision=PRECISION)
                    weights = (sm * unit + ln * linear) * r[:, None]
                    d_v += tl.dot(tl.trans(_operand(weights, grad.dtype.element_ty, INTERPRETED)), do_tile, input_precision=PRECISION)
                    d_fk += ln * tl.dot(tl.trans(_features(tl.where(in_linear, da, 0.0), q.dtype.element_ty, LOW_FEATURES, INTERPRETED)), fq_tile, input_precision=PRECISION)
        key = (b * KV_HEADS + j) * total + cols
        tl.store(dk + key[:, None] * DIM + d[None, :], d_k, mask=in_cols[:, None] & (d < DIM)[None, :])
        tl.store(dv + key[:, None] * VALUE_DIM + e[None, :], d_v, mask=in_cols[:, None] & (e < VALUE_DIM)[None, :])
        tl.store(dfk + key[:, None] * WIDTH + f[None, :], d_fk, mask=in_cols[:, None] & (f < WIDTH)[None, :])

    @triton.jit
    def _chunk_sums_kernel(
        fk, v, mask, S, z, prefix_S, prefix_z, stride_fkb, stride_fkh, stride_fkt, stride_vb, stride_vh, stride_vt, stride_mask,
        chunks, KV_HEADS: tl.constexpr, WIDTH: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_FEATURES: tl.constexpr,
        BLOCK_VALUE: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Program (b * KV_HEADS + j, c, n): features n * BLOCK_FEATURES onwards of entry c of kv head j's prefix states,
        before the running sums: the carried (S, z) for c = 0, else the sums of fk^T v and fk over chunk c - 1's keys (its
        real ones where MASKED), in float32 (PRECISION "tf32x3" or "ieee")."""
        head = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        f = tl.program_id(2) * BLOCK_FEATURES + tl.arange(0, BLOCK_FEATURES)
        e = tl.arange(0, BLOCK_VALUE)
        in_f, in_e = f < WIDTH, e < VALUE_DIM
        entry = head * chunks + c
        into_S = prefix_S + (entry * WIDTH + f[:, None]) * VALUE_DIM + e[None, :]
        in_S = in_f[:, None] & in_e[None, :]
        if c == 0:
            tl.store(into_S, tl.load(S + (head * WIDTH + f[:, None]) * VALUE_DIM + e[None, :], mask=in_S, other=0.0), mask=in_S)
            tl.store(prefix_z + entry * WIDTH + f, tl.load(z + head * WIDTH + f, mask=in_f, other=0.0), mask=in_f)
        else:
            b, j = head // KV_HEADS, head % KV_HEADS
            keys = (c - 1) * CHUNK + tl.arange(0, CHUNK)
            fk_tile = tl.load(
                fk + b * stride_fkb + j * stride_fkh + keys[:, None] * stride_fkt + f[None, :], mask=in_f[None, :], other=0.0
            ).to(tl.float32)
            if MASKED:
                fk_tile = tl.where((tl.load(mask + b * stride_mask + keys) != 0)[:, None], fk_tile, 0.0)
            v_tile = tl.load(v + b * stride_vb + j * stride_vh + keys[:, None] * stride_vt + e[None, :], mask=in_e[None, :], other=0.0)
            sums = tl.dot(tl.trans(fk_tile), v_tile.to(tl.float32), input_precision=PRECISION)
            tl.store(into_S, sums, mask=in_S)
            tl.store(prefix_z + entry * WIDTH + f, tl.sum(fk_tile, 0), mask=in_f)

    @triton.jit
    def _running(x, head, start, width, chunks, TILE: tl.constexpr, LANES: tl.constexpr):
        """x's entries start .. start + LANES - 1 (of `width` a chunk) of row `head`, summed along the chunks in place,
        TILE chunks at a time."""
        lanes = start + tl.arange(0, LANES)
        in_lanes = lanes < width
        carry = tl.zeros([LANES], dtype=tl.float32)
        for first in range(0, chunks, TILE):
            rows = first + tl.arange(0, TILE)
            where = x + (head * chunks + rows[:, None]) * width + lanes[None, :]
            inside = (rows < chunks)[:, None] & in_lanes[None, :]
            sums = tl.cumsum(tl.load(where, mask=inside, other=0.0), 0) + carry[None, :]
            tl.store(where, sums, mask=inside)
            carry = tl.sum(tl.where((rows == TILE - 1 + first)[:, None], sums, 0.0), 0)

    @triton.jit
    def _running_sums_kernel(prefix_S, prefix_z, chunks, lanes_S, WIDTH: tl.constexpr, VALUE_DIM: tl.constexpr, TILE: tl.constexpr, LANES: tl.constexpr):
        """Program (b * KV_HEADS + j, n): the running sums along the chunks of entries n * LANES onwards of kv head j's
        prefix S (its first `lanes_S` programs) or of its z (the rest), in place."""
        head = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1)
        if n < lanes_S:
            _running(prefix_S, head, n * LANES, WIDTH * VALUE_DIM, chunks, TILE, LANES)
        else:
            _running(prefix_z, head, (n - lanes_S) * LANES, WIDTH, chunks, TILE, LANES)

    def _prefix_fake(fk, v, mask, S, z, block, masked):
        chunks = math.ceil(fk.shape[2] / block)
        return S.new_empty(*S.shape[:2], chunks, *S.shape[2:]), z.new_empty(*z.shape[:2], chunks, z.shape[-1])

    PREFIX_OP, _prefix_kernels = _registered(_prefix_launch, set(), _prefix_fake)
    # The custom op (which a compiled model calls) and the function that launches the kernel in eager code.
    OP, window_prefill = _registered(
        _prefill, set(), lambda q, k, v, *rest: q.new_empty(*q.shape[:3], v.shape[-1], dtype=v.dtype)
    )

    def _train_fake(q, k, v, fq, fk, *rest):
        stat = q.new_empty(q.shape[:3], dtype=torch.float32)
        return q.new_empty(*q.shape[:3], v.shape[-1], dtype=torch.float32), stat, torch.empty_like(stat)

    def _backward_fake(grad, out, q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, *rest):
        return tuple(torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v, fq, fk, prefix_S, prefix_z, sm_weight, ln_weight))

    # Training: the forward and the backward as custom ops, eager and compiled alike, the backward registered as the
    # forward's gradient. Opaque to the compiler, which takes their outputs' shapes from the fakes.
    TRAIN_OP = _operator(_train, set(), _train_fake)
    BACKWARD_OP = _operator(_backward, set(), _backward_fake)

    def _keep(ctx, inputs, output):
        q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, *options = inputs
        ctx.save_for_backward(q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, *output)
        ctx.options = options

    def _gradients(ctx, grad, _peak, _den):
        q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, out, peak, den = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):  # a backward called inside autocast (on CPU, in its thread)
            grads = BACKWARD_OP(grad, out, q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, peak, den, *ctx.options)
        inputs = (q, k, v, fq, fk, None, prefix_S, prefix_z, sm_weight, ln_weight)
        return (*(None if x is None else g.to(x.dtype) for g, x in zip(grads[:5] + (None,) + grads[5:], inputs)), None, None, None)

    TRAIN_OP.register_autograd(_gradients, setup_context=_keep)
else:
    OP = window_prefill = TRAIN_OP = PREFIX_OP = _prefix_kernels = None
