"""Registers and spills of hedgehog_swa's three step kernels compiled for sm_90 (bf16, Triton's bundled ptxas, no GPU;
4 warps each, the window's write and fold 8, as the step launches them) at SmolLM2's shape: the window's ring (FOLD: the
oldest key into the sums) at window 64 and 256, with and without the decay, and 512 kept keys with window 256 (a ring
of 319). Run with TRITON_INTERPRET unset."""
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from linearize.hf import triton_step

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
states = {"S", "z", "features", "partial"}
for name in ("partial", "combine", "ring_write"):
    kernel = getattr(triton_step, f"_{name}_kernel")
    for window, kept, decay in ((64, 0, False), (256, 0, False), (256, 0, True), (256, 512, False)):
        rows = kept + window + 63 if kept else window
        chunk = min(triton.next_power_of_2(rows), triton_step.WINDOW_CHUNK // 64)
        splits = triton.cdiv(rows, chunk)
        constants = dict(
            HAS_DECAY=decay, LINEAR_ROPE=True, FOLD=kept == 0, HEADS=9, KV_HEADS=3, DIM=64, ROWS=rows, ROT=64, BLOCK_DIM=64,
            HAS_REAL=True, SOFTCAP=False, FEATURES=64, BLOCK_FEATURES=64, CHUNK=chunk, SPLITS=splits,
            BLOCK_SPLITS=triton.next_power_of_2(splits),
        )
        signature = {
            p.name: "constexpr" if p.is_constexpr else "i32" if p.name.startswith("stride") or p.name == "kept"
            else "*i64" if p.name == "at" else "fp32" if p.name in ("scaling", "softcap") else "*i1" if p.name in ("real", "mask")
            else "*fp32" if p.name in states else "*bf16"
            for p in kernel.params
        }
        given = {p.name: constants[p.name] for p in kernel.params if p.is_constexpr}
        warps = 8 if name == "ring_write" and kept == 0 else 4
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=given), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True)
        print(name, f"window={window} kept={kept} decay={decay}", [line.strip() for line in out.stderr.splitlines() if "registers" in line or "spill" in line])
