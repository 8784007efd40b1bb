"""Registers and spills a thread of `hedgehog_swa`'s fused decode step kernels (triton_step.py: the rows split,
`_partial_kernel`; their combination per query head, `_combine_kernel`; the ring's row written and the oldest key
folded, `_ring_write_kernel`), compiled for sm_90 (bf16) by Triton's bundled ptxas on the CPU, no GPU needed, with
the warps the step launches them with, at SmolLM2-135M's shape (9 query heads, 3 kv heads, head dim 64, 64 features):
the window's ring at window 64 and 256, with and without the decay, and 512 kept keys beside a window of 256 (a ring of
319). Run where TRITON_INTERPRET is unset:

    python benchmarks/step_registers.py > registers.log
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from linearize.hf import triton_step

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
FLOAT32 = {"S", "z", "features", "partial"}  # the float32 tensors; the other pointers are bf16 but for these below
CASES = ((64, 0, False), (256, 0, False), (256, 0, True), (256, 512, False))  # window, kept keys, decay


def signature(kernel) -> dict[str, str]:
    """Each parameter's Triton type as the step passes it."""
    def kind(name: str) -> str:
        if name.startswith("stride") or name == "kept":
            return "i32"
        if name == "at":
            return "*i64"
        if name in ("scaling", "softcap"):
            return "fp32"
        if name in ("real", "mask"):
            return "*i1"
        return "*fp32" if name in FLOAT32 else "*bf16"

    return {p.name: "constexpr" if p.is_constexpr else kind(p.name) for p in kernel.params}


def warps(name: str, kept: int) -> int:
    """As `triton_step.hedgehog_swa_step` launches them: 4, the window's write and fold 8."""
    return 8 if name == "ring_write" and kept == 0 else 4


def main() -> None:
    for name in ("partial", "combine", "ring_write"):
        kernel = getattr(triton_step, f"_{name}_kernel")
        for window, kept, decay in CASES:
            rows = kept + window + 63 if kept else window
            chunk = min(triton.next_power_of_2(rows), triton_step.WINDOW_CHUNK // 64)
            splits = triton.cdiv(rows, chunk)
            constants = dict(
                HAS_DECAY=decay, LINEAR_ROPE=True, FOLD=kept == 0, HEADS=9, KV_HEADS=3, DIM=64, ROWS=rows, ROT=64, BLOCK_DIM=64,
                HAS_REAL=True, SOFTCAP=False, FEATURES=64, BLOCK_FEATURES=64, CHUNK=chunk, SPLITS=splits,
                BLOCK_SPLITS=triton.next_power_of_2(splits),
            )
            given = {p.name: constants[p.name] for p in kernel.params if p.is_constexpr}
            source = ASTSource(kernel, signature(kernel), constexprs=given)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps(name, kept)})
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                ptx.write(compiled.asm["ptx"])
                ptx.flush()
                out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx.name, "-o", "/dev/null"], capture_output=True, text=True)
            used = [line.strip() for line in out.stderr.splitlines() if "registers" in line or "spill" in line]
            print(name, f"window={window} kept={kept} decay={decay} warps={warps(name, kept)}", used, flush=True)


if __name__ == "__main__":
    main()
