"""A `hedgehog_swa` prefill in one chunked Triton kernel: Hedgehog linear attention plus a sliding softmax window under
one shared normaliser (LoLCATs), the forward pass only.

The arithmetic is `ops_window.chunk_window_linear`'s (its docstring, and `naive_window_linear`, the reference): for
query t, keys in (t - window, t] weigh exp(q.k * scaling - m_t) * sm_weight (m_t: the largest of their scores, after
the softcap where there is one; 0 where none of them is real), older keys (fq_t . fk_s) * ln_weight, the carried state
(S, z) is read by fq with ln_weight, and the output is the weighted values over the weights; pad keys (key_mask False)
weigh nothing. In PyTorch, at every CHUNK keys, the prefix sums of fk^T v and fk (pads masked) from the carried state
on (a batched matmul and a cumsum). Then one program per (sequence, query head, block of BLOCK queries): it reads the
prefix state at the last chunk boundary c <= t0 - window + 1 (t0: its first query), before which every key is linear
for each of its queries, then walks the key tiles (BLOCK keys) from c to its last query, giving each (query, key) its
linear weight or its window's softmax weight. The window's part is kept with an online max (its accumulators
rescaled as the max grows), the linear part never rescaled, and the two are added under one normaliser at the end.
Query head i reads kv head i // (H // Hkv) directly: the caller does not repeat k, v and fk.

Arithmetic is float32 and the output in v's dtype. The products q.k, fq.fk and fq S run on tensor cores: bf16/fp16
q and k as they are, the float32 feature maps in tf32, the weights cast to v's dtype before they meet the values (as
flash attention casts them); in float32 every product is float32 (input_precision "ieee"). Compiled for sm_90 with
ptxas (bf16, BLOCK 32, 8 warps), at SmolLM2's shape (head dim 64, feature dim 64: 2F = 128) the kernel takes 191
registers a thread and spills none, at window 64 and 256 (fp16 alike; float32 spills 32 bytes); blocks of 64 spill 52
bytes with 8 warps and 88 with 4. At head dim 128 (2F = 256) it spills 1.8 KB.

Only the forward pass: with gradients (training) `hedgehog_swa` keeps the PyTorch path; a backward kernel is for later.
A prefill that continues a state (a cache's second call of several tokens) has the state's window keys prepended in
PyTorch, and the next state (S, z per kv head and the window's tail, `ops_window.window_tail`) is taken in PyTorch too,
one matmul.

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
from .kernel_dispatch import mode as kernel_mode
from .ops_window import _next_state, _with_context
from .triton_step import DTYPES, INTERPRETED, MAX_HEAD_DIM, SWITCH, TRITON_PROBLEM, switch

if TRITON_PROBLEM is None:  # Triton as triton_step imported it: transformers' remote-code check skips relative imports
    from .triton_step import _float32, _registered, _rounded, _wrapped, tl, triton

# Queries a program takes and keys a tile holds, and the warps that take them: compiled for sm_90 at SmolLM2's shape,
# blocks of 64 spill with 4 or 8 warps, of 32 with 8 warps not (module docstring).
BLOCK = 32
WARPS = 8
# Keys per prefix state: the float32 states (2F x V per kv head) take CHUNK times less memory than a state per key
# (SmolLM2: 512 bytes a key and kv head, about what its k, v and fk take), for half a tile more work a program.
CHUNK = 64
# A program holds its queries' feature maps and a key tile's (BLOCK x 2F, float32): up to 2 * MAX_HEAD_DIM features.
MAX_FEATURES = 2 * MAX_HEAD_DIM


def window_prefill_problem(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int) -> Optional[str]:
    """Why a `hedgehog_swa` prefill does not take the kernel (None when it does): the switches, then `kernel_problem`.
    On CPU tensors it runs only with LINEARIZE_FUSED_STEP=on under Triton's interpreter (the tests)."""
    chosen = switch()
    if chosen == "off" or kernel_mode() == "torch":
        return f"turned off ({SWITCH}={chosen}, LINEARIZE_KERNELS={kernel_mode()})"
    if not (q.is_cuda or chosen == "on"):
        return f"the fused prefill runs on CUDA tensors (on CPU tensors with {SWITCH}=on under TRITON_INTERPRET=1)"
    return kernel_problem(q, k, v, fq, fk, window)


def kernel_problem(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int) -> Optional[str]:
    """Why `window_linear_prefill` cannot take these tensors (None when it can): Triton, the device, gradients, dtypes
    and sizes. q, fq (B, H, T, *); k, v, fk (B, Hkv, T, *), H a multiple of Hkv."""
    if TRITON_PROBLEM is not None:
        return TRITON_PROBLEM
    if not (q.is_cuda or INTERPRETED):
        return "the fused prefill runs on CUDA tensors (on CPU tensors under TRITON_INTERPRET=1)"
    if torch.is_grad_enabled():
        return "the fused prefill has no backward; it runs under torch.no_grad() or torch.inference_mode()"
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
    or per-query-head tensors (H,). Returns (o (B, H, T, V) in v's dtype, the next state or None).

        with torch.no_grad():
            o, state = window_linear_prefill(q, k, v, fq, fk, window=64, scaling=0.125, state=state, output_state=True)
    """
    problem = kernel_problem(q, k, v, fq, fk, window)
    if problem is not None:
        raise LinearizeError(f"{problem}; for anything else call ops_window.chunk_window_linear (the PyTorch path)")
    k_all, v_all, fk_all, mask, S, z = _with_context(q, k, v, fk, key_mask, state)
    o = window_prefill(q, k_all, v_all, fq, fk_all, mask, S, z, _weights(sm_weight, q.shape[1], q), _weights(ln_weight, q.shape[1], q), window, scaling, softcap)
    return o, (_next_state(k_all, v_all, fk_all, mask, S, z, window) if output_state else None)


def prefix_states(fk: Tensor, v: Tensor, mask: Tensor, S: Tensor, z: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(S, z) before each chunk of `block` keys: the carried S (B, Hkv, 2F, V) and z (B, Hkv, 2F) plus the sums of
    fk^T v and fk over the real keys of the chunks before it; float32, (B, Hkv, chunks, 2F, V) and (B, Hkv, chunks, 2F)."""
    b, hkv, total, width = fk.shape
    chunks = math.ceil(total / block)
    pad = chunks * block - total
    real = torch.nn.functional.pad(mask, (0, pad)).view(b, 1, chunks, block, 1)
    # The last chunk's sum reaches no boundary: only the first chunks - 1 are summed.
    fkc = (torch.nn.functional.pad(fk, (0, 0, 0, pad)).view(b, hkv, chunks, block, width) * real)[:, :, :-1].to(torch.float32)
    vc = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, hkv, chunks, block, -1)[:, :, :-1].to(torch.float32)
    prefix_S = torch.cat((S[:, :, None], fkc.transpose(-1, -2) @ vc), dim=2).cumsum_(2)
    prefix_z = torch.cat((z[:, :, None], fkc.sum(3)), dim=2).cumsum_(2)
    return prefix_S, prefix_z


def _prefill(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, mask: Tensor, S: Tensor, z: Tensor, sm_weight: Tensor,
    ln_weight: Tensor, window: int, scaling: float, softcap: Optional[float],
) -> Tensor:
    """The heads (B, H, T, V) in v's dtype of a prefill of T queries against the `total` keys k, v, fk (B, Hkv, total, *)
    of which mask (B, total) marks the real ones, the last T the queries' own; S, z: the state before the first key."""
    batch, heads, length, dim = q.shape
    kv_heads, total, width, value_dim = k.shape[1], k.shape[2], fk.shape[-1], v.shape[-1]
    q, k, v, fq, fk = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, fq, fk))
    mask = mask.contiguous()
    prefix_S, prefix_z = prefix_states(fk, v, mask, S.to(torch.float32), z.to(torch.float32), CHUNK)
    out = torch.empty(batch, heads, length, value_dim, dtype=v.dtype, device=v.device)
    _wrapped(_window_linear_kernel)[(batch * heads, triton.cdiv(length, BLOCK))](
        q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        fq.stride(0), fq.stride(1), fq.stride(2), fk.stride(0), fk.stride(1), fk.stride(2), mask.stride(0),
        length, total, prefix_S.shape[2], scaling, 1.0 if softcap is None else softcap,
        HEADS=heads, KV_HEADS=kv_heads, DIM=dim, VALUE_DIM=value_dim, WIDTH=width,
        BLOCK_DIM=max(triton.next_power_of_2(dim), 16), BLOCK_VALUE=max(triton.next_power_of_2(value_dim), 16),
        BLOCK_WIDTH=max(triton.next_power_of_2(width), 16), BLOCK=BLOCK, CHUNK=CHUNK, WINDOW=window, SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRETED=INTERPRETED, num_warps=WARPS,
    )
    return out


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
    def _window_linear_kernel(
        q, k, v, fq, fk, mask, prefix_S, prefix_z, sm_weight, ln_weight, out,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_fqb, stride_fqh, stride_fqt, stride_fkb, stride_fkh, stride_fkt, stride_mask,
        length, total, chunks, scaling, softcap,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, VALUE_DIM: tl.constexpr, WIDTH: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_VALUE: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
        WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    ):
        """Program (b * HEADS + h, n): query head h of sequence b, its queries n * BLOCK .. (n + 1) * BLOCK - 1 (module
        docstring). The queries are the last `length` of the `total` keys."""
        scaling, softcap = _float32(scaling), _float32(softcap)
        b = tl.program_id(0) // HEADS
        h = tl.program_id(0) % HEADS
        j = h // (HEADS // KV_HEADS)
        head = b * KV_HEADS + j
        d, e, f = tl.arange(0, BLOCK_DIM), tl.arange(0, BLOCK_VALUE), tl.arange(0, BLOCK_WIDTH)
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_rows = rows < length
        first = total - length + tl.program_id(1) * BLOCK  # the block's first query, as a key position
        t = first + tl.arange(0, BLOCK)
        q_tile = _operand(_tile(q, b, h, rows, stride_qb, stride_qh, stride_qt, d, in_rows, DIM), q.dtype.element_ty, INTERPRETED)
        fq_tile = _tile(fq, b, h, rows, stride_fqb, stride_fqh, stride_fqt, f, in_rows, WIDTH).to(tl.float32)
        # Every key before the last chunk boundary at or before first - WINDOW + 1 is linear for each query here: the
        # prefix state there reads them all.
        lowest = first - WINDOW + 1
        start = tl.where(lowest > 0, lowest, 0) // CHUNK * CHUNK
        state = (head * chunks + start // CHUNK) * WIDTH + f
        S = tl.load(prefix_S + state[:, None] * VALUE_DIM + e[None, :], mask=(f < WIDTH)[:, None] & (e < VALUE_DIM)[None, :], other=0.0)
        linear = tl.dot(fq_tile, S, input_precision=PRECISION)
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
                cols = s + tl.arange(0, BLOCK)
                in_cols = cols < total
                real = tl.load(mask + b * stride_mask + cols, mask=in_cols, other=0) != 0
                k_tile = _operand(_tile(k, b, j, cols, stride_kb, stride_kh, stride_kt, d, in_cols, DIM), k.dtype.element_ty, INTERPRETED)
                v_tile = _operand(_tile(v, b, j, cols, stride_vb, stride_vh, stride_vt, e, in_cols, VALUE_DIM), v.dtype.element_ty, INTERPRETED)
                fk_tile = _tile(fk, b, j, cols, stride_fkb, stride_fkh, stride_fkt, f, in_cols, WIDTH).to(tl.float32)
                distance = t[:, None] - cols[None, :]
                in_window = (distance >= 0) & (distance < WINDOW) & real[None, :]
                in_linear = (distance >= WINDOW) & real[None, :]
                scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION) * scaling
                if SOFTCAP:
                    fall = tl.exp(-2.0 * tl.abs(scores / softcap))
                    scores = tl.where(scores < 0, -1.0, 1.0) * (1.0 - fall) / (1.0 + fall) * softcap
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
        heads = (sm * windowed + ln * linear) / tl.maximum(sm * window_total + ln * linear_total, 1e-30)[:, None]
        dtype = out.dtype.element_ty
        offsets = ((b * HEADS + h) * length + rows[:, None]) * VALUE_DIM + e[None, :]
        tl.store(out + offsets, _rounded(heads, dtype).to(dtype), mask=in_rows[:, None] & (e < VALUE_DIM)[None, :])

    # The custom op (which a compiled model calls) and the function that launches the kernel in eager code.
    OP, window_prefill = _registered(_prefill, set())
else:
    OP = window_prefill = None
