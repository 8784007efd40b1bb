"""Rotate-half RoPE on a prefill's q and k in one Triton kernel, and its backward in the same kernel.

On the PyTorch path (`attention.apply_rotary`) RoPE is about a dozen ATen calls for q and k (products, a negation, a
concatenation of halves, a sum), each a pass over q or k: on an H200 at 32K tokens of SmolLM2's heads, 0.39 ms a layer
against 3.24 ms for the teacher's whole attention (BENCHMARKS.md, twenty-fourth session), on every converted layer that
rotates (`hedgehog_swa`'s window, every mixer's sliding window, kept softmax layers of `swa`). The kernel reads q and k
once and writes them once.

One program per (sequence, head of q or of k, block of BLOCK rows), q's heads first: with rot = cos.shape[-1], each
of the first rot lanes d of a row becomes x_d cos_d - x_{d + rot/2} sin_d (first half) or x_d cos_d + x_{d - rot/2} sin_d
(second half), the rest are copied. Rounded as the PyTorch path rounds: x cos, the turned half times sin and their sum
each in the input dtype. Its output keeps q's and k's strides (a projection's (B, T, H, D) memory seen as (B, H, T, D)).

The backward is the transposed rotation, the same kernel with BACKWARD: each rotated lane d of the gradient g becomes
g_d cos_d + g_{d + rot/2} sin_{d + rot/2} (first half) or g_d cos_d - g_{d - rot/2} sin_{d - rot/2}, rounded as autograd
through the PyTorch path rounds it. The custom op `OP` carries it (`register_autograd`); where nothing needs a gradient
the kernel is launched directly. cos and sin take no gradient: where they require one, the PyTorch path runs.

Shipped as remote code beside saved models, as triton_step.py: where Triton is missing, or `LINEARIZE_FUSED_STEP=off`
or `LINEARIZE_KERNELS=torch`, the PyTorch path runs.
"""

from typing import Optional

import torch
from torch import Tensor

from .triton_step import DTYPES, MAX_HEAD_DIM, TRITON_PROBLEM, fused_kernel_problem

if TRITON_PROBLEM is None:  # Triton as triton_step imported it: transformers' remote-code check skips relative imports
    from .triton_step import _registered, _rounded, tl, triton

# Rows a program takes, and its warps: a 64 x 64 tile, loaded twice (its lanes and their partners).
BLOCK = 64
WARPS = 4


def rotary_problem(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Optional[str]:
    """Why `rotary` does not take these tensors (None when it does): the switches, Triton, the device, gradients, dtypes
    and shapes. On CPU tensors it runs only with LINEARIZE_FUSED_STEP=on under Triton's interpreter (the tests)."""
    problem = fused_kernel_problem(q, "the fused RoPE")
    if problem is not None:
        return problem
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return "cos and sin require gradients: the PyTorch path runs, for autograd"
    if q.dtype not in DTYPES or any(t.dtype != q.dtype for t in (k, cos, sin)):
        return f"the fused RoPE takes q, k, cos and sin of one dtype, float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {cos.dtype} and {sin.dtype}"
    batch, _, length, dim = q.shape
    if q.dim() != 4 or k.dim() != 4 or k.shape[0] != batch or k.shape[2:] != q.shape[2:] or dim > MAX_HEAD_DIM:
        return f"the fused RoPE takes q and k (B, heads, T, D) of one B, T and D up to {MAX_HEAD_DIM}, got {tuple(q.shape)} and {tuple(k.shape)}"
    rot = cos.shape[-1]
    if cos.dim() != 3 or sin.shape != cos.shape or cos.shape[0] not in (1, batch) or cos.shape[1] != length or rot % 2 or rot > dim:
        return f"the fused RoPE takes cos and sin (B or 1, T, an even width up to D), got {tuple(cos.shape)} and {tuple(sin.shape)}"
    return None


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q and k (B, H, T, D) and (B, Hkv, T, D) with RoPE on their first cos.shape[-1] lanes, for cos and sin (B or 1, T,
    rot) as transformers' rotary embeddings give them (module docstring); `rotary_problem` says whether the kernel takes
    them. Differentiable in q and k.

        q, k = rotary(q, k, cos, sin)
    """
    cos, sin = cos.contiguous(), sin.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return OP(q, k, cos, sin, False)
    return rotate(q, k, cos, sin, False)


if TRITON_PROBLEM is None:

    @triton.jit
    def _rope_kernel(
        q, k, cos, sin, q_out, k_out, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_ob, stride_oh, stride_ot, stride_pb, stride_ph, stride_pt, stride_cb, length,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, ROT: tl.constexpr, BLOCK_DIM: tl.constexpr,
        BLOCK: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        """Program (b * (HEADS + KV_HEADS) + head, n): rows n * BLOCK onwards of q's head `head` of sequence b, or of k's
        head `head - HEADS` (module docstring). q_out has q's strides (stride_o*), k_out k's (stride_p*)."""
        b = (tl.program_id(0) // (HEADS + KV_HEADS)).to(tl.int64)
        head = tl.program_id(0) % (HEADS + KV_HEADS)
        rows = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        if head < HEADS:
            source = q + b * stride_qb + head * stride_qh + rows[:, None] * stride_qt
            target = q_out + b * stride_ob + head * stride_oh + rows[:, None] * stride_ot
        else:
            source = k + b * stride_kb + (head - HEADS) * stride_kh + rows[:, None] * stride_kt
            target = k_out + b * stride_pb + (head - HEADS) * stride_ph + rows[:, None] * stride_pt
        d = tl.arange(0, BLOCK_DIM)
        in_rows = rows < length
        first, in_rot = d < ROT // 2, d < ROT
        partner = tl.where(first, d + ROT // 2, d - ROT // 2)
        x = tl.load(source + d[None, :], mask=in_rows[:, None] & (d < DIM)[None, :], other=0.0).to(tl.float32)
        turned = tl.load(source + partner[None, :], mask=in_rows[:, None] & in_rot[None, :], other=0.0).to(tl.float32)
        angles = b * stride_cb + rows[:, None] * ROT
        c = tl.load(cos + angles + d[None, :], mask=in_rows[:, None] & in_rot[None, :], other=0.0).to(tl.float32)
        s = tl.load(sin + angles + (partner if BACKWARD else d)[None, :], mask=in_rows[:, None] & in_rot[None, :], other=0.0).to(tl.float32)
        dtype = q.dtype.element_ty
        straight = _rounded(x * c, dtype)
        turned = _rounded(tl.where((first != BACKWARD)[None, :], -turned, turned) * s, dtype)
        y = tl.where(in_rot[None, :], _rounded(straight + turned, dtype), x)
        tl.store(target + d[None, :], y.to(dtype), mask=in_rows[:, None] & (d < DIM)[None, :])

    def _launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
        batch, heads, length, dim = q.shape
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # q's and k's strides
        _rope_kernel[(batch * (heads + k.shape[1]), triton.cdiv(length, BLOCK))](
            q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            0 if cos.shape[0] == 1 else length * cos.shape[-1], length,
            HEADS=heads, KV_HEADS=k.shape[1], DIM=dim, ROT=cos.shape[-1], BLOCK_DIM=max(triton.next_power_of_2(dim), 16),
            BLOCK=BLOCK, BACKWARD=backward, num_warps=WARPS,
        )
        return q_out, k_out

    def _fake(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
        return torch.empty_like(q), torch.empty_like(k)

    OP, rotate = _registered(_launch, set(), _fake)

    def _keep(ctx, inputs, output):
        ctx.save_for_backward(inputs[2], inputs[3])

    def _gradients(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return (*OP(grad_q, grad_k, cos, sin, True), None, None, None)

    OP.register_autograd(_gradients, setup_context=_keep)
else:
    OP = rotate = None
