"""Registers and spills of triton_kept's kernel compiled for sm_90 (Triton's bundled ptxas, no GPU): SmolLM2's heads, window 256, 128 kept keys, blocks of 64; by dtype, warps and key tile. Run with TRITON_INTERPRET unset."""
import subprocess, tempfile, os, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from linearize.hf import triton_kept
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
kernel = triton_kept._kept_window_kernel
for dtype, warps, key_tile in (("bf16", 4, 64), ("bf16", 8, 64), ("bf16", 4, 32), ("fp16", 8, 64), ("fp32", 8, 64), ("fp32", 8, 16), ("fp32", 16, 32), ("fp32", 16, 16)):
    signature = {p.name: "constexpr" if p.is_constexpr else "*i1" if p.name in ("key_mask", "kept_real") else "*i64" if p.name == "refs"
                 else "fp32" if p.name in ("scaling", "softcap") else f"*{dtype}" if p.name in ("q", "keys", "values", "out")
                 else "i32" if p.name.startswith("stride") or p.name in ("length", "first_block", "offset") else "*fp32" for p in kernel.params}
    constants = dict(HEADS=9, KV_HEADS=3, DIM=64, VALUE_DIM=64, WIDTH=128, KEEP=128, ROWS=128 + 4096, QUERIES=60, BLOCK=64, BLOCK_Q=64,
                     KEY_TILE=key_tile, WINDOW=256, BLOCK_DIM=64, BLOCK_VALUE=64, BLOCK_WIDTH=128, SOFTCAP=False,
                     PRECISION="ieee" if dtype == "fp32" else "tf32", INTERPRETED=False)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True)
    print(dtype, warps, key_tile, [l.strip() for l in out.stderr.splitlines() if "registers" in l or "spill" in l])
