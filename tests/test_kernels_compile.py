"""Every Triton kernel of linearize's own (the fused decode steps, triton_step.py; hedgehog_swa's prefill and its
backward and prefix states, triton_window.py; a prefill's short convolution, triton_conv.py; Hedgehog's feature maps,
triton_features.py; RoPE, triton_rope.py) compiled for a GPU (sm_90) on the CPU:
Triton's compiler and its bundled ptxas need no GPU. In the `core` subset: the newest run compiles them with the newest
Triton the ranges allow (3.9 on 2026-12-07), the oldest with Triton 3.6, the one the lent GPUs run (35 s on 2 cores)."""

import os
import subprocess
import sys

import pytest
import torch

from linearize.hf import triton_step
from tests.test_triton_step import MIXERS, needs_triton


def compile_kernels() -> None:
    """Compile every step's kernel for sm_90 (bf16, 8 warps) at SmolLM2's shape, window 64 (hedgehog_swa: 256 too), and
    hedgehog_swa's prefill kernels (triton_window.py, forward and backward, its blocks and warps) likewise, on the CPU:
    Triton's compiler and its bundled ptxas need no GPU. Their float arguments are typed float32, as a launch from Python
    passes them: the kernels launch inside custom ops, eager and compiled alike (inductor, which launched them itself when
    they were `triton_op`s, passed float64, and the kernels cast their float arguments since). Run where TRITON_INTERPRET
    is unset."""
    import itertools

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from linearize.hf import triton_conv, triton_features, triton_kept, triton_rope, triton_window

    states = {"conv", "recurrent", "state", "ssm", "S", "z", "window_fk", "features", "partial"}
    # The gated delta rule's caches shared by a kv head's query heads move on in a launch of their own (with the window,
    # and without it, as qwen3_5_gdn).
    # hedgehog_swa+options: its decay and feature maps before RoPE (by default, neither). hedgehog_swa's step runs as
    # three kernels, its ring's rows split (partial), combined per query head, then the ring's row written and the
    # oldest key folded (ring_write): a window's ring, and with kept keys ("kept") in `ops_kept`'s layout, 512 kept keys
    # and a ring of window + 63 positions.
    kernels = [(name, 64) for name in MIXERS if name != "hedgehog_swa"] + [("kv_shift", 64), ("kv_shift", 1)]
    rows = (("window", 64), ("window", 256), ("options", 64), ("kept", 256))
    kernels += [(f"{kernel}+{kind}", window) for kernel in ("partial", "combine", "ring_write") for kind, window in rows]
    for name, window in kernels:
        qwen = name == "qwen3_5_gdn"  # gated_deltanet's kernel in qwen3_5's variant, without a window
        options, ring = name.endswith("+options"), name.endswith("+kept")
        kernel = getattr(triton_step, "_gated_deltanet_kernel" if qwen else f"_{name.split('+')[0]}_kernel")
        rows = 512 + window + 63 if ring else window
        chunk = min(triton.next_power_of_2(rows), triton_step.WINDOW_CHUNK // 64)
        constants = dict(
            HAS_DECAY=options, LINEAR_ROPE=not options, ROWS=rows, FOLD=not ring, SPLITS=triton.cdiv(rows, chunk),
            BLOCK_SPLITS=triton.next_power_of_2(triton.cdiv(rows, chunk)),
            HEADS=9, KV_HEADS=3, DIM=64, KEEP=window - 1, ROT=64, BLOCK_DIM=64, BLOCK_WINDOW=window, HAS_REAL=True,
            WINDOW=not qwen and window > 1, SOFTCAP=True, HIDDEN=576, BLOCK_HIDDEN=256, TAPS=4, BLOCK_TAPS=4, FEATURES=64,
            BLOCK_FEATURES=64, CHUNK=chunk, QWEN=qwen, BLOCK_KEEP=triton.next_power_of_2(max(window - 1, 1)),
        )
        signature = {}
        for param in kernel.params:
            if param.is_constexpr:
                signature[param.name] = "constexpr"
            elif param.name.startswith("stride") or param.name == "kept":
                signature[param.name] = "i32"
            elif param.name == "at":
                signature[param.name] = "*i64"
            elif param.name in ("scaling", "softcap", "gate_normalizer", "eps"):
                signature[param.name] = "fp32"
            else:
                signature[param.name] = "*i1" if param.name in ("real", "window_mask", "mask") else "*fp32" if param.name in states else "*bf16"
        given = {param.name: constants[param.name] for param in kernel.params if param.is_constexpr}
        # as `hedgehog_swa_step` launches them: 4 warps, a window's write and fold 8
        warps = (8 if not ring else 4) if name.startswith("ring_write") else 4 if name.startswith(("partial", "combine")) else 8
        triton.compile(ASTSource(kernel, signature, constexprs=given), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    # The prefill's forward (bf16, with and without the statistics its backward reads, and fp32) and its two backward
    # kernels (bf16 and fp32), each with its blocks and warps, and the feature products' operands as `low_features` picks
    # them (a training step: the statistics' forward and the backward).
    halves = {"q", "k", "v", "out", "grad"}
    low = triton_window.low_features
    prefill = [
        (triton_window._window_linear_kernel, "bf16", *triton_window.FORWARD[torch.bfloat16], {"STATS": stats, "LOW_FEATURES": low(torch.bfloat16, stats)})
        for stats in (False, True)
    ]
    prefill += [(triton_window._window_linear_kernel, "fp32", *triton_window.FORWARD[torch.float32], {"STATS": True, "LOW_FEATURES": low(torch.float32, True)})]
    prefill += [
        (kernel, name, *triton_window.BACKWARD[dtype], {"LOW_FEATURES": low(dtype, True)})
        for kernel in (triton_window._window_linear_dq_kernel, triton_window._window_linear_dk_kernel)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    ]
    for (kernel, dtype, block, warps, own), window in itertools.product(prefill, (64, 256)):
        signature = {
            param.name: "constexpr" if param.is_constexpr else "*i1" if param.name == "mask" else "*i32" if param.name == "top"
            else "fp32" if param.name in ("scaling", "softcap") else f"*{dtype}" if param.name in halves
            else "i32" if param.name.startswith("stride") or param.name in ("length", "total", "chunks") else "*fp32"
            for param in kernel.params
        }
        constants = dict(
            HEADS=9, KV_HEADS=3, DIM=64, VALUE_DIM=64, WIDTH=128, BLOCK_DIM=64, BLOCK_VALUE=64, BLOCK_WIDTH=128, BLOCK=block,
            CHUNK=triton_window.CHUNK, WINDOW=window, SOFTCAP=True, PRECISION="ieee" if dtype == "fp32" else "tf32", INTERPRETED=False,
            **own,
        )
        triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    # The kept keys' prefill (triton_kept.py): bf16 q, k, v, float32 feature maps and sums, SmolLM2's heads, window 256,
    # 128 kept keys, blocks of 64, and fp32, each with its tiles and warps.
    kernel = triton_kept._kept_window_kernel
    for dtype, (key_tile, warps) in (("bf16", triton_kept.TILES[torch.bfloat16]), ("fp32", triton_kept.TILES[torch.float32])):
        signature = {
            param.name: "constexpr" if param.is_constexpr else "*i1" if param.name in ("key_mask", "kept_real") else "*i64" if param.name == "refs"
            else "fp32" if param.name in ("scaling", "softcap") else f"*{dtype}" if param.name in ("q", "keys", "values", "out")
            else "i32" if param.name.startswith("stride") or param.name in ("length", "first_block", "offset") else "*fp32"
            for param in kernel.params
        }
        constants = dict(
            HEADS=9, KV_HEADS=3, DIM=64, VALUE_DIM=64, WIDTH=128, KEEP=128, ROWS=128 + 4096, QUERIES=60, BLOCK=64, BLOCK_Q=64,
            KEY_TILE=key_tile, WINDOW=256, BLOCK_DIM=64, BLOCK_VALUE=64, BLOCK_WIDTH=128, SOFTCAP=True,
            PRECISION="ieee" if dtype == "fp32" else "tf32", INTERPRETED=False,
        )
        triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    # The prefix states of an inference prefill (triton_window.py): bf16 v, float32 feature maps, state and sums.
    kernel = triton_window._chunk_sums_kernel
    signature = {param.name: "constexpr" if param.is_constexpr else "*bf16" if param.name == "v" else "*i1" if param.name == "mask"
                 else "i32" if param.name.startswith("stride") or param.name == "chunks" else "*fp32" for param in kernel.params}
    for masked in (False, True):
        constants = dict(KV_HEADS=3, WIDTH=128, VALUE_DIM=64, BLOCK_FEATURES=triton_window.SUM_FEATURES, BLOCK_VALUE=64, CHUNK=triton_window.CHUNK, MASKED=masked,
                         PRECISION=triton_window.SUM_PRECISION)
        triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    kernel = triton_window._running_sums_kernel
    signature = {param.name: "constexpr" if param.is_constexpr else "i32" if param.name in ("chunks", "lanes_S") else "*fp32" for param in kernel.params}
    constants = dict(WIDTH=128, VALUE_DIM=64, TILE=triton_window.SCAN_TILE, LANES=triton_window.SCAN_LANES)
    triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    # RoPE on a prefill's q and k (triton_rope.py), forward and backward: bf16, SmolLM2's heads, full and partial width.
    kernel = triton_rope._rope_kernel
    signature = {param.name: "constexpr" if param.is_constexpr else "i32" if param.name.startswith("stride") or param.name == "length"
                 else "*bf16" for param in kernel.params}
    for rot, backward in itertools.product((64, 32), (False, True)):
        constants = dict(HEADS=9, KV_HEADS=3, DIM=64, ROT=rot, BLOCK_DIM=64, BLOCK=triton_rope.BLOCK, BACKWARD=backward)
        triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": triton_rope.WARPS})
    # Hedgehog's feature maps of a prefill (triton_features.py): bf16 x and weights, float32 output, SmolLM2's heads.
    kernel = triton_features._feature_kernel
    signature = {param.name: "constexpr" if param.is_constexpr else "*fp32" if param.name == "out" else "i32" if param.name.startswith("stride")
                 or param.name == "length" else "*bf16" for param in kernel.params}
    constants = dict(HEADS=9, DIM=64, FEATURES=64, BLOCK_DIM=64, BLOCK_FEATURES=64, BLOCK=triton_features.BLOCK, PRECISION=triton_features.PRECISION)
    triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": triton_features.WARPS})
    # The prefill's short convolution (triton_conv.py): bf16 inputs, float32 taps and output, SmolLM2's kernel of 4.
    kernel = triton_conv._conv_kernel
    signature = {"seq": "*bf16", "taps": "*fp32", "out": "*fp32", "length": "i32", "channels": "i32", "K": "constexpr", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"}
    constants = dict(K=4, BLOCK_T=triton_conv.BLOCK_T, BLOCK_C=triton_conv.BLOCK_C)
    triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": triton_conv.WARPS})


@needs_triton
@pytest.mark.core
def test_every_kernel_compiles_for_a_gpu():
    """The interpreter runs code that Triton's compiler refuses (a loop-carried variable whose type changes, as one
    did in hedgehog_swa's kernel): compiled in a subprocess, since the kernels here are interpreted."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = "from tests.test_kernels_compile import compile_kernels; compile_kernels()"
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


