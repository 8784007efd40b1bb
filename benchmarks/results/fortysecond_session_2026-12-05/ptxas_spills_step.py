"""Registers and spills of hedgehog_swa's step kernel compiled for sm_90 (bf16, 8 warps, Triton's bundled ptxas, no GPU), the ring's position read on the device (at): the window at 64 and 256, and the ring of kept keys (RING). Run with TRITON_INTERPRET unset."""
import subprocess, tempfile, os, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from linearize.hf import triton_step
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
kernel = triton_step._hedgehog_swa_kernel
states = {"S", "z", "window_fk"}
for window, ring in ((64, False), (256, False), (256, True)):
    rows = 128 + window + 63 if ring else window - 1
    constants = dict(HAS_DECAY=False, LINEAR_ROPE=True, RING=ring, HEADS=9, KV_HEADS=3, DIM=64, KEEP=rows, ROT=64, BLOCK_DIM=64, BLOCK_WINDOW=window,
                     HAS_REAL=True, WINDOW=True, SOFTCAP=False, FEATURES=64, BLOCK_FEATURES=64, CHUNK=64)
    signature = {p.name: ("constexpr" if p.is_constexpr else "i32" if p.name.startswith("stride") or p.name == "kept" else "*i64" if p.name == "at" else "fp32" if p.name in ("scaling", "softcap")
                          else "*i1" if p.name in ("real", "window_mask") else "*fp32" if p.name in states else "*bf16") for p in kernel.params}
    given = {p.name: constants[p.name] for p in kernel.params if p.is_constexpr}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=given), target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True)
    print(window, ring, [l.strip() for l in out.stderr.splitlines() if "registers" in l or "spill" in l])
