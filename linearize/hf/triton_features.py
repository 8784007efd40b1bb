"""Hedgehog's feature maps over a prefill (`mixer_hedgehog.HedgehogFeatureMap`) in one Triton kernel.

On the PyTorch path phi(x) = [softmax(xW + b), softmax(-(xW + b))] of (B, H, T, D) is about thirteen ATen calls (a
float32 copy of x, of W and of b, a batched matmul, two softmaxes, a negation, a concatenation, views): on an H200 at
32K tokens of SmolLM2's heads, 0.62 ms and 0.46 ms of host time a layer for q's and k's maps together, against 3.4 ms
for the teacher's whole attention (BENCHMARKS.md, twenty-fourth session). The kernel reads x once and writes the
float32 map once.

One program per (sequence, head, block of BLOCK rows): x's rows and the head's W (D, F) in float32, their product in
float32 (`PRECISION`), plus b, then each half's softmax over its F lanes,
written side by side into out (B, H, T, 2F), contiguous.

Inference only: where gradients are on and x or W requires grad, the PyTorch path runs (autograd through it), so
training and serving compute the same maps to float32's rounding. Registered as a custom op, which a compiled forward
calls; eager calls launch it directly. Shipped as remote code beside saved models, as triton_step.py: where Triton is
missing, or `LINEARIZE_FUSED_STEP=off` or `LINEARIZE_KERNELS=torch`, the PyTorch path runs.
"""

from typing import Optional

import torch
from torch import Tensor

from .triton_step import DTYPES, MAX_HEAD_DIM, TRITON_PROBLEM, fused_kernel_problem

if TRITON_PROBLEM is None:  # Triton as triton_step imported it: transformers' remote-code check skips relative imports
    from .triton_step import _registered, tl, triton

# Rows a program takes, its warps, and xW's products: "tf32x3" (three tf32 products on tensor cores, each operand split
# in two) keeps float32's accuracy (its error against float64 was float32 matmul's, emulated on the CPU). On an H200
# (SmolLM2's 9 query and 3 kv heads, bf16, BENCHMARKS.md, twenty-fifth session) q's and k's maps took 0.17-0.19 ms at
# 32K in blocks of 128 rows on 8 warps, against 0.31-0.33 ms for blocks of 64 on 4 warps with "ieee" products (float32
# on CUDA cores), and 0.10-0.14 against 0.16-0.19 ms at 4K.
BLOCK = 128
WARPS = 8
PRECISION = "tf32x3"


def feature_map_problem(x: Tensor, weight: Tensor, bias: Tensor) -> Optional[str]:
    """Why `feature_maps` does not take these tensors (None when it does): the switches, Triton, the device, gradients,
    dtypes and sizes. On CPU tensors it runs only with LINEARIZE_FUSED_STEP=on under Triton's interpreter (the tests)."""
    problem = fused_kernel_problem(x, "the fused feature map")
    if problem is not None:
        return problem
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return "gradients are on: the PyTorch path runs, for autograd"
    if x.dtype not in DTYPES or weight.dtype not in DTYPES or bias.dtype not in DTYPES:
        return f"the fused feature map takes float16/bfloat16/float32 tensors, got {x.dtype}, {weight.dtype} and {bias.dtype}"
    if max(x.shape[-1], weight.shape[-1]) > MAX_HEAD_DIM:
        return f"the fused feature map takes head and feature dimensions up to {MAX_HEAD_DIM}"
    return None


def feature_maps(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """[softmax(xW + b), softmax(-(xW + b))] (B, H, T, 2F) in float32, for x (B, H, T, D), weight (H, D, F) and bias
    (H, 1, F) (module docstring); `feature_map_problem` says whether the kernel takes them.

        fq = feature_maps(q, feature_q.weight, feature_q.bias)
    """
    return _maps(x if x.stride(-1) == 1 else x.contiguous(), weight.contiguous(), bias.contiguous())


if TRITON_PROBLEM is None:

    @triton.jit
    def _half(y, in_f):
        """Softmax of each row of y over its first F lanes (in_f), 0 past them."""
        y = tl.where(in_f[None, :], y, float("-inf"))
        e = tl.exp(y - tl.max(y, 1)[:, None])
        return e / tl.sum(e, 1)[:, None]

    @triton.jit
    def _feature_kernel(
        x, weight, bias, out, stride_xb, stride_xh, stride_xt, length,
        HEADS: tl.constexpr, DIM: tl.constexpr, FEATURES: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_FEATURES: tl.constexpr,
        BLOCK: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = (tl.program_id(0) // HEADS).to(tl.int64)
        h = tl.program_id(0) % HEADS
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        d, f = tl.arange(0, BLOCK_DIM), tl.arange(0, BLOCK_FEATURES)
        in_rows, in_d, in_f = rows < length, d < DIM, f < FEATURES
        x_tile = tl.load(
            x + b * stride_xb + h * stride_xh + rows[:, None].to(tl.int64) * stride_xt + d[None, :],
            mask=in_rows[:, None] & in_d[None, :], other=0.0,
        ).to(tl.float32)
        w = tl.load(weight + h * DIM * FEATURES + d[:, None] * FEATURES + f[None, :], mask=in_d[:, None] & in_f[None, :], other=0.0)
        y = tl.dot(x_tile, w.to(tl.float32), input_precision=PRECISION)
        y += tl.load(bias + h * FEATURES + f, mask=in_f, other=0.0).to(tl.float32)[None, :]
        row_start = ((b * HEADS + h) * length + rows[:, None].to(tl.int64)) * (2 * FEATURES)
        inside = in_rows[:, None] & in_f[None, :]
        tl.store(out + row_start + f[None, :], _half(y, in_f), mask=inside)
        tl.store(out + row_start + FEATURES + f[None, :], _half(-y, in_f), mask=inside)

    def _launch(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        batch, heads, length, dim = x.shape
        features = weight.shape[-1]
        out = torch.empty(batch, heads, length, 2 * features, dtype=torch.float32, device=x.device)
        _feature_kernel[(batch * heads, triton.cdiv(length, BLOCK))](
            x, weight, bias, out, x.stride(0), x.stride(1), x.stride(2), length,
            HEADS=heads, DIM=dim, FEATURES=features, BLOCK_DIM=max(triton.next_power_of_2(dim), 16),
            BLOCK_FEATURES=max(triton.next_power_of_2(features), 16), BLOCK=BLOCK, PRECISION=PRECISION, num_warps=WARPS,
        )
        return out

    def _maps_fake(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return x.new_empty(*x.shape[:3], 2 * weight.shape[-1], dtype=torch.float32)

    OP, _maps = _registered(_launch, set(), _maps_fake)
