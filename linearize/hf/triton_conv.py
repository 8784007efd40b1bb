"""A prefill's short causal convolution (`convolve_heads`) in one Triton kernel.

On the PyTorch path a depthwise causal convolution of kernel K over (B, T, C) is K shifted products and K - 1 sums,
each a pass over a (B, T, C) float32 tensor: at 32K tokens of SmolLM2's 960 channels, about 2 GB of memory traffic
where the inputs and the output take 190 MB. The kernel reads each input once (its K shifted rows from the same
tiles, in cache) and writes the float32 output once.

It takes the time-major sequence that `convolve_heads` builds, seq (B, T + K - 1, C): the K - 1 cached inputs, then
the T new ones, left pads already moved in front as zeros, in the inputs' dtype; and the taps (K, C) in the
accumulation dtype (float32). out[b, t, c] = sum_j seq[b, t + j, c] * taps[j, c], summed over j in order, each
product in float32, as the PyTorch path sums them (the compiler may fuse a product and its sum into one rounding:
within an ulp of float32 of the PyTorch path). One program per (sequence, block of BLOCK_T steps, block of BLOCK_C
channels).

Inference only: where gradients are on and an input requires grad, the PyTorch path runs (autograd through its
products), so training and serving compute the same sums. The kernel is registered as a custom op, which a compiled
forward calls; eager calls launch it directly. Shipped as remote code beside saved models, as triton_step.py: where
Triton is missing, or `LINEARIZE_FUSED_STEP=off` or `LINEARIZE_KERNELS=torch`, the PyTorch path runs.
"""

from typing import Optional

import torch
from torch import Tensor

from .triton_step import TRITON_PROBLEM, fused_kernel_problem

if TRITON_PROBLEM is None:  # Triton as triton_step imported it: transformers' remote-code check skips relative imports
    from .triton_step import _registered, tl, triton

# Steps and channels a program takes: 32 x 128 float32 accumulators over 4 warps, 32 a thread.
BLOCK_T = 32
BLOCK_C = 128
WARPS = 4
INPUTS = (torch.float16, torch.bfloat16, torch.float32)


def conv_prefill_problem(seq: Tensor, taps: Tensor) -> Optional[str]:
    """Why `causal_conv` does not take this prefill (None when it does): the switches, Triton, the device, gradients,
    dtypes. On CPU tensors it runs only with LINEARIZE_FUSED_STEP=on under Triton's interpreter (the tests)."""
    problem = fused_kernel_problem(seq, "the fused convolution")
    if problem is not None:
        return problem
    if torch.is_grad_enabled() and (seq.requires_grad or taps.requires_grad):
        return "gradients are on: the PyTorch path runs, for autograd"
    if seq.dtype not in INPUTS or taps.dtype != torch.float32:
        return f"the fused convolution takes float16/bfloat16/float32 inputs and float32 taps, got {seq.dtype} and {taps.dtype}"
    return None


def causal_conv(seq: Tensor, taps: Tensor, length: int) -> Tensor:
    """out (B, length, C) float32, out[:, t] = sum_j seq[:, t + j] * taps[j], for seq (B, length + K - 1, C) and taps
    (K, C) (module docstring); `conv_prefill_problem` says whether the kernel takes them.

        out = causal_conv(seq, weight.float().t(), seq.shape[1] - weight.shape[1] + 1)
    """
    return _conv(seq.contiguous(), taps.contiguous(), length)


if TRITON_PROBLEM is None:

    @triton.jit
    def _conv_kernel(seq, taps, out, length, channels, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(2)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_c = c < channels
        inside = (t[:, None] < length) & in_c[None, :]
        rows = seq + b.to(tl.int64) * (length + K - 1) * channels
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for j in tl.static_range(K):
            tap = tl.load(taps + j * channels + c, mask=in_c, other=0.0)
            x = tl.load(rows + (t[:, None] + j).to(tl.int64) * channels + c[None, :], mask=inside, other=0.0).to(tl.float32)
            acc += x * tap[None, :]
        tl.store(out + (b.to(tl.int64) * length + t[:, None]) * channels + c[None, :], acc, mask=inside)

    def _launch(seq: Tensor, taps: Tensor, length: int) -> Tensor:
        batch, _, channels = seq.shape
        out = torch.empty(batch, length, channels, dtype=torch.float32, device=seq.device)
        grid = (triton.cdiv(length, BLOCK_T), triton.cdiv(channels, BLOCK_C), batch)
        _conv_kernel[grid](seq, taps, out, length, channels, K=taps.shape[0], BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=WARPS)
        return out

    def _conv_fake(seq: Tensor, taps: Tensor, length: int) -> Tensor:
        return seq.new_empty(seq.shape[0], length, seq.shape[2], dtype=torch.float32)

    OP, _conv = _registered(_launch, set(), _conv_fake)
