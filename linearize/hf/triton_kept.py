"""The scoring of a `hedgehog_swa` prefill with kept keys (`ops_kept`) in one Triton kernel, for inference.

`ops_kept` computes in PyTorch what is cheap and sequential: the keys' recall errors, the kept set of every query block
and the sums every block reads. What grows with the prefill's length is scoring its queries: here one program per
(sequence, query head, block of keep_block queries) scores, by softmax with an online max, the block's window (the
w + B - 1 keys of U, `ops_kept`'s undecided keys, ending with its last query, causal) and its N kept keys (read through
their indices), reads its sums through the feature maps (fq S, fq z), and puts both under one normaliser:
(sm * sum a v + ln * fq S) / (sm * sum a + ln * fq z), as `ops_kept._heads` (the PyTorch path, and its reference)
does. Query head i reads kv head i // (H // Hkv) directly.

Arithmetic is float32; q.k and the weights times the values run on tensor cores as `triton_window`'s forward runs them
(bf16/fp16 operands as they are, the weights cast to v's dtype, float32 in "ieee"), and fq S in tf32 (ieee in
float32). It has no backward: a prefill that autograd records takes the PyTorch path. Shipped as remote code next to
saved models, as triton_step.py; it shares its switches (`LINEARIZE_FUSED_STEP`, `LINEARIZE_KERNELS`).
"""

from typing import Optional

import torch
from torch import Tensor

from .triton_step import DTYPES, MAX_HEAD_DIM, TRITON_PROBLEM, fused_kernel_problem

if TRITON_PROBLEM is None:  # Triton as triton_step imported it: transformers' remote-code check skips relative imports
    from .triton_step import INTERPRETED, _float32, _registered, _rounded, tl, triton
    from .triton_window import _operand, _scores

# Keys a tile holds (window and kept keys alike) and the warps of a program, by q's dtype; a program's queries are a
# block of keep_block (64 in the recipes), padded to a power of two of at least 16 for the tensor cores. Compiled for
# sm_90 at SmolLM2's shape (window 256, 128 kept keys, blocks of 64), 16-bit inputs take 208 registers a thread on 8
# warps and spill none (on 4 warps 112 bytes); float32 (its products not on tensor cores) spills 2.2 KB on 8 warps with
# tiles of 64 keys, none on 16 with tiles of 32 (128 registers). Not yet timed on a GPU.
TILES = {torch.float16: (64, 8), torch.bfloat16: (64, 8), torch.float32: (32, 16)}


def kept_prefill_problem(q: Tensor, keys: Tensor, values: Tensor, fq: Tensor) -> Optional[str]:
    """Why `kept_window_prefill` does not take these tensors (None when it does): the device and the switches, autograd,
    dtypes and sizes. q, fq (B, H, T, *); keys, values (B, Hkv, rows, *)."""
    problem = fused_kernel_problem(q, "the kept keys' prefill kernel")
    if problem is not None:
        return problem
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, keys, values, fq)):
        return "the kept keys' prefill kernel has no backward; it runs under torch.no_grad() or torch.inference_mode()"
    if q.dtype not in DTYPES or keys.dtype != q.dtype or values.dtype != q.dtype or fq.dtype not in DTYPES:
        return f"the kept keys' prefill kernel takes q, k, v of one dtype among float16/bfloat16/float32, got {q.dtype}, {keys.dtype}, {values.dtype}"
    if max(q.shape[-1], values.shape[-1]) > MAX_HEAD_DIM or fq.shape[-1] > 2 * MAX_HEAD_DIM:
        return f"the kept keys' prefill kernel takes head dimensions up to {MAX_HEAD_DIM} and feature maps up to {2 * MAX_HEAD_DIM} wide"
    return None


def kept_window_prefill(
    q: Tensor, fq: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor, refs: Tensor, kept_real: Tensor, block_S: Tensor,
    block_z: Tensor, sm_weight, ln_weight, *, keep: int, first_block: int, offset: int, window: int, block: int, scaling: float,
    softcap: Optional[float],
) -> Tensor:
    """The heads (B, H, T, V) in values' dtype of T queries (q, fq (B, H, T, *)), as `ops_kept._heads` takes them: keys,
    values (B, Hkv, N + M, *) the kept slots then U's M rows, key_mask (B, M) U's real keys, refs (B, Hkv, Q, N) each
    query block's kept keys (indices into keys) and kept_real which of them are real, block_S (B, Hkv, Q, 2F, V) and
    block_z (B, Hkv, Q, 2F) its sums (float32); query block c holds U's rows (first_block + c) B .. + B - 1, query t at
    row offset + t of them. sm_weight, ln_weight: numbers or per-query-head tensors (H,). Through the custom op `OP`
    inside torch.compile, the kernel launched directly in eager code (`triton_step._registered`)."""
    heads = q.shape[1]
    sm, ln = (torch.as_tensor(w, dtype=torch.float32, device=q.device).expand(heads).contiguous() for w in (sm_weight, ln_weight))
    return kept_prefill(
        q, fq, keys, values, key_mask, refs, kept_real, block_S.float(), block_z.float(), sm, ln, keep, first_block, offset, window,
        block, scaling, softcap,
    )


def _launch(
    q: Tensor, fq: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor, refs: Tensor, kept_real: Tensor, block_S: Tensor,
    block_z: Tensor, sm: Tensor, ln: Tensor, keep: int, first_block: int, offset: int, window: int, block: int, scaling: float,
    softcap: Optional[float],
) -> Tensor:
    """`kept_window_prefill`'s launch, its weights as float32 tensors (H,)."""
    batch, heads, length, dim = q.shape
    kv_heads, rows = keys.shape[1], keys.shape[2]
    value_dim, width = values.shape[-1], fq.shape[-1]
    queries = refs.shape[2]
    q, fq = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, fq))
    keys, values, key_mask, refs, kept_real, block_S, block_z = (
        x.contiguous() for x in (keys, values, key_mask, refs, kept_real, block_S, block_z)
    )
    out = torch.empty(batch, heads, length, value_dim, dtype=values.dtype, device=q.device)
    key_tile, warps = TILES[q.dtype]
    _kept_window_kernel[(batch * heads, queries)](
        q, fq, keys, values, key_mask, refs, kept_real, block_S, block_z, sm, ln, out,
        q.stride(0), q.stride(1), q.stride(2), fq.stride(0), fq.stride(1), fq.stride(2), length, first_block, offset,
        scaling, 1.0 if softcap is None else softcap,
        HEADS=heads, KV_HEADS=kv_heads, DIM=dim, VALUE_DIM=value_dim, WIDTH=width, KEEP=keep, ROWS=rows, QUERIES=queries,
        BLOCK=block, BLOCK_Q=max(triton.next_power_of_2(block), 16), KEY_TILE=key_tile, WINDOW=window,
        BLOCK_DIM=max(triton.next_power_of_2(dim), 16), BLOCK_VALUE=max(triton.next_power_of_2(value_dim), 16),
        BLOCK_WIDTH=max(triton.next_power_of_2(width), 16), SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRETED=INTERPRETED, num_warps=warps,
    )
    return out


if TRITON_PROBLEM is None:

    @triton.jit
    def _online(peak, total, weighted, scores, valid, v_tile, dtype: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
        """The online softmax of a block of queries after one more tile of keys: running peaks, normalisers and weighted
        values (not yet divided), rescaled as the peaks grow; `valid` marks the (query, key) pairs that count."""
        scores = tl.where(valid, scores, float("-inf"))
        new_peak = tl.maximum(peak, tl.max(scores, 1))
        base = tl.where(new_peak == float("-inf"), 0.0, new_peak)
        rescale = tl.exp(peak - base)
        a = tl.where(valid, tl.exp(scores - base[:, None]), 0.0)
        weighted = weighted * rescale[:, None] + tl.dot(_operand(a, dtype, INTERPRETED), v_tile, input_precision=PRECISION)
        return new_peak, total * rescale + tl.sum(a, 1), weighted

    @triton.jit
    def _kept_window_kernel(
        q, fq, keys, values, key_mask, refs, kept_real, block_S, block_z, sm_weight, ln_weight, out,
        stride_qb, stride_qh, stride_qt, stride_fqb, stride_fqh, stride_fqt, length, first_block, offset, scaling, softcap,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, VALUE_DIM: tl.constexpr, WIDTH: tl.constexpr,
        KEEP: tl.constexpr, ROWS: tl.constexpr, QUERIES: tl.constexpr, BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr,
        KEY_TILE: tl.constexpr, WINDOW: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_VALUE: tl.constexpr, BLOCK_WIDTH: tl.constexpr,
        SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    ):
        """Program (b * HEADS + h, c): query head h of sequence b, its query block c (module docstring)."""
        scaling, softcap = _float32(scaling), _float32(softcap)
        b = (tl.program_id(0) // HEADS).to(tl.int64)
        h = tl.program_id(0) % HEADS
        head = b * KV_HEADS + h // (HEADS // KV_HEADS)
        c = tl.program_id(1)
        r = tl.arange(0, BLOCK_Q)
        d, e, f = tl.arange(0, BLOCK_DIM), tl.arange(0, BLOCK_VALUE), tl.arange(0, BLOCK_WIDTH)
        t = c * BLOCK + r - offset  # each row's query in the call
        in_rows = (r < BLOCK) & (t >= 0) & (t < length)
        q_rows = b * stride_qb + h * stride_qh + t[:, None] * stride_qt
        q_tile = tl.load(q + q_rows + d[None, :], mask=in_rows[:, None] & (d < DIM)[None, :], other=0.0)
        q_tile = _operand(q_tile, q.dtype.element_ty, INTERPRETED)
        peak = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_Q], dtype=tl.float32)
        weighted = tl.zeros([BLOCK_Q, BLOCK_VALUE], dtype=tl.float32)
        dtype = values.dtype.element_ty
        # The window: U's rows from the block's first - WINDOW + 1 to its last, each query reading those up to its own.
        start = (first_block + c) * BLOCK
        query = start + r
        for tile in range((WINDOW + BLOCK - 1 + KEY_TILE - 1) // KEY_TILE):
            u = start - WINDOW + 1 + tile * KEY_TILE + tl.arange(0, KEY_TILE)
            in_u = (u >= 0) & (u < start + BLOCK)
            real = tl.load(key_mask + b * (ROWS - KEEP) + u, mask=in_u, other=0) != 0
            at = (head * ROWS + KEEP + u)[:, None]
            k_tile = _operand(tl.load(keys + at * DIM + d[None, :], mask=in_u[:, None] & (d < DIM)[None, :], other=0.0), dtype, INTERPRETED)
            v_tile = _operand(tl.load(values + at * VALUE_DIM + e[None, :], mask=in_u[:, None] & (e < VALUE_DIM)[None, :], other=0.0), dtype, INTERPRETED)
            valid = (u[None, :] <= query[:, None]) & (real & in_u)[None, :]
            scores, _ = _scores(q_tile, k_tile, scaling, softcap, SOFTCAP, PRECISION)
            peak, total, weighted = _online(peak, total, weighted, scores, valid, v_tile, dtype, PRECISION, INTERPRETED)
        # The block's kept keys, through their indices.
        for tile in range((KEEP + KEY_TILE - 1) // KEY_TILE):
            n = tile * KEY_TILE + tl.arange(0, KEY_TILE)
            in_n = n < KEEP
            slot = (head * QUERIES + c) * KEEP + n
            real = (tl.load(kept_real + slot, mask=in_n, other=0) != 0) & in_n
            at = (head * ROWS + tl.load(refs + slot, mask=in_n, other=0))[:, None]
            k_tile = _operand(tl.load(keys + at * DIM + d[None, :], mask=in_n[:, None] & (d < DIM)[None, :], other=0.0), dtype, INTERPRETED)
            v_tile = _operand(tl.load(values + at * VALUE_DIM + e[None, :], mask=in_n[:, None] & (e < VALUE_DIM)[None, :], other=0.0), dtype, INTERPRETED)
            scores, _ = _scores(q_tile, k_tile, scaling, softcap, SOFTCAP, PRECISION)
            peak, total, weighted = _online(peak, total, weighted, scores, real[None, :] & in_rows[:, None], v_tile, dtype, PRECISION, INTERPRETED)
        # The sums of every key the block reads through the feature maps, after the softmax (fewer tiles held at once).
        fq_rows = b * stride_fqb + h * stride_fqh + t[:, None] * stride_fqt
        fq_tile = tl.load(fq + fq_rows + f[None, :], mask=in_rows[:, None] & (f < WIDTH)[None, :], other=0.0).to(tl.float32)
        sums = (head * QUERIES + c) * WIDTH + f
        S = tl.load(block_S + sums[:, None] * VALUE_DIM + e[None, :], mask=(f < WIDTH)[:, None] & (e < VALUE_DIM)[None, :], other=0.0)
        linear = tl.dot(fq_tile, S, input_precision=PRECISION)
        linear_total = tl.sum(fq_tile * tl.load(block_z + sums, mask=f < WIDTH, other=0.0)[None, :], 1)
        sm = tl.load(sm_weight + h)
        ln = tl.load(ln_weight + h)
        heads = (sm * weighted + ln * linear) / tl.maximum(sm * total + ln * linear_total, 1e-30)[:, None]
        offsets = ((b * HEADS + h) * length + t[:, None]) * VALUE_DIM + e[None, :]
        tl.store(out + offsets, _rounded(heads, dtype).to(dtype), mask=in_rows[:, None] & (e < VALUE_DIM)[None, :])

    # The custom op (which a compiled model calls; opaque to the compiler, its output's shape from the fake) and the
    # function that launches the kernel in eager code.
    OP, kept_prefill = _registered(
        _launch, set(), lambda q, fq, keys, values, *rest: q.new_empty(*q.shape[:3], values.shape[-1], dtype=values.dtype)
    )
else:
    OP = kept_prefill = None
