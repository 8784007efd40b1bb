"""The KD loss over the vocabulary, timed and checked: linearize's chunked form beside Liger-Kernel's fused linear JSD.

Issue 17 asks for a KL over the vocabulary that never holds batch x sequence x vocabulary in float32, and for
Liger-Kernel's fused linear losses where they measure faster than a hand-written kernel. Every variant here computes
what `lora_kd` trains on with `ce_weight: 0`: the mean over tokens of KL(teacher || student) at `--temperature`, from
the two models' last hidden states (tokens, hidden) through one frozen output head (vocabulary, hidden), forward and
backward to the student's hidden states:
- `linearize`: `kd.kd_losses` with a `KDHead` of `--chunks` tokens, its KL in one Triton kernel (`triton_kl`);
- `linearize_torch`: the same with that kernel switched off (`LINEARIZE_FUSED_STEP=off`): the PyTorch path;
- `liger`: Liger-Kernel's `LigerFusedLinearJSDFunction` at beta 0, which is that KL (its own chunking); times the
  temperature squared, as `lora_kd` scales it;
- `full`: the head applied to every token at once and `kd_losses` on the logits (what the chunked forms avoid);
- `top_k` and `top_k_torch`: a step on cached teacher logits (`teacher_top_k: --top-k`), the KL over the teacher's
  top k and its rest read back, with the top-k kernel (`triton_kl.sparse_kl_rows`) and on the PyTorch path;
- `caching` and `caching_torch`: a step that caches, the teacher's top k taken from its hidden states through the head
  (`teacher_logits.top_k`, with its kernel or in PyTorch) and then that KL.
The sparse variants are checked against `top_k_torch` (their KL is over k + 1 outcomes, not the vocabulary's).
Liger-Kernel's fused linear KL takes the teacher as a (tokens, vocabulary) probability tensor, which `lora_kd` never
holds, so it is not a variant. Liger-Kernel is not a dependency: without it the `liger` row says why it is absent.

`--precision autocast` (the default) is how `lora_kd` runs on a GPU: float32 hidden states and head under bfloat16
autocast; `bfloat16` and `float32` give every tensor that dtype. Each row: the median milliseconds of forward +
backward over `--repeats` calls after `--warmup`, the peak memory above the inputs (CUDA), and the loss's and the
gradient's largest difference from `linearize_torch`'s, relative to its largest entry.

    python benchmarks/kd_loss_speed.py --arch llama-3.2-1b --tokens 16384 --chunks 1024,4096 --out /tmp/kd_loss.json
    PYTHONPATH=/tmp/liger python benchmarks/kd_loss_speed.py ...          # liger-kernel unpacked there (a carried wheel)
    TRITON_INTERPRET=1 python benchmarks/kd_loss_speed.py --device cpu --arch tiny --tokens 256 --repeats 1 --warmup 0 \
        --out /tmp/kd_loss_cpu.json                                       # the script and the kernels checked on a CPU
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

from linearize.distillation.kd import KDHead, kd_losses
from linearize.distillation.teacher_logits import top_k
from linearize.hf.triton_step import SWITCH

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ARCHS  # noqa: E402
from window_kernels import difference, timed  # noqa: E402

VARIANTS = ("linearize", "linearize_torch", "liger", "full", "top_k", "top_k_torch", "caching", "caching_torch")
REFERENCE = "linearize_torch"
SPARSE_REFERENCE = "top_k_torch"  # the reference of the sparse variants (those named top_k* and caching*)
SEQ_LEN = 2048  # tokens per window: the rows are (tokens / SEQ_LEN) windows


def liger_problem() -> str | None:
    """Why Liger-Kernel's fused linear JSD cannot run here (None when it can)."""
    try:
        from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction  # noqa: F401
    except Exception as error:  # ImportError, or Triton without a GPU and without its interpreter
        return f"liger-kernel is not importable ({type(error).__name__}: {str(error)[:100]}); pip install liger-kernel"
    return None


def sparse(variant: str) -> bool:
    return variant.startswith(("top_k", "caching"))


def chunked(variant: str) -> bool:
    return variant.startswith("linearize") or sparse(variant)


def loss_of(variant: str, student: torch.Tensor, teacher, weight: torch.Tensor, ids: torch.Tensor, chunk: int, temperature: float, k: int) -> torch.Tensor:
    """The variant's mean KL (times the temperature squared) of student hidden states (rows, length, hidden); `teacher`
    is the teacher's hidden states, or for `top_k*` its cached top k."""
    head = KDHead(weight, None, chunk, ce_grad=False)
    if variant.startswith("caching"):
        teacher = top_k(teacher, k, temperature, head)
    if chunked(variant):
        return kd_losses(student, teacher, ids, temperature, head=head)[0]
    if variant == "full":
        return kd_losses(student @ weight.t(), teacher @ weight.t(), ids, temperature)[0]
    from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction

    flat = student.reshape(-1, student.shape[-1])
    return LigerFusedLinearJSDFunction.apply(flat, weight, teacher.reshape(flat.shape), weight, None, 0.0, -100, temperature) * temperature**2


def measure(variant, student, teacher, weight, ids, chunk, temperature, k, precision, device, repeats, warmup) -> dict:
    """One row: the variant's loss and gradient, then its time and peak memory."""
    # On a CPU the kernels run only when asked for (under Triton's interpreter); on CUDA by default.
    switch = {SWITCH: "off"} if variant.endswith("_torch") else {SWITCH: "on"} if device == "cpu" and chunked(variant) else {}
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "autocast" else nullcontext()
    leaf = student.detach().requires_grad_()
    if variant.startswith("top_k"):  # the cache's content, read back: made once, outside the timing, on the PyTorch path
        with autocast, mock.patch.dict(os.environ, {SWITCH: "off"}):
            teacher = top_k(teacher, k, temperature, KDHead(weight, None, chunk))

    def step():
        leaf.grad = None
        with autocast:
            loss = loss_of(variant, leaf, teacher, weight, ids, chunk, temperature, k)
        loss.backward()
        return loss

    with mock.patch.dict(os.environ, switch):
        loss = step().detach().float()
        grad = leaf.grad.float()
        ms, peak = timed(step, repeats, warmup, device)
    return {"variant": variant, "chunk": chunk if chunked(variant) else None, "top_k": k if sparse(variant) else None,
            "ms": round(ms, 3), "peak_mib": round(peak, 1), "loss": loss.item(), "grad": grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--arch", default="llama-3.2-1b", choices=sorted(ARCHS), help="the head's shape: vocabulary x hidden")
    parser.add_argument("--tokens", type=int, default=16384, help=f"tokens a step, in windows of {SEQ_LEN} (fewer: one window)")
    parser.add_argument("--chunks", default="1024", help="comma-separated token chunks of linearize's variants (lora_kd's kl_chunk)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, among {', '.join(VARIANTS)}")
    parser.add_argument("--precision", default="autocast", choices=["autocast", "bfloat16", "float32"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=256, help="the teacher's entries a token of the sparse variants")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check the script (kernels under TRITON_INTERPRET=1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before them (the first compiles)")
    parser.add_argument("--tolerance", type=float, default=2e-2, help="largest relative difference allowed from linearize_torch")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS) or REFERENCE not in variants or (any(map(sparse, variants)) and SPARSE_REFERENCE not in variants):
        raise SystemExit(
            f"--variants takes {', '.join(VARIANTS)} and needs {REFERENCE} (the reference), and {SPARSE_REFERENCE} with any sparse one; got {args.variants}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kd_loss_speed.py times CUDA kernels; run it on a machine with a CUDA GPU (or check it with --device cpu)")
    if args.device == "cpu" and args.precision == "bfloat16":
        raise SystemExit("--precision bfloat16 is for a GPU; on a CPU check the script with --precision float32 or autocast")
    vocab, hidden = ARCHS[args.arch]["vocab_size"], ARCHS[args.arch]["hidden_size"]
    dtype = torch.bfloat16 if args.precision == "bfloat16" else torch.float32
    g = torch.Generator(args.device).manual_seed(0)
    rows, length = max(args.tokens // SEQ_LEN, 1), min(args.tokens, SEQ_LEN)
    # Hidden states of the size a model's last norm gives, and a head of an embedding's scale: logits of a few units.
    student, teacher = (torch.randn(rows, length, hidden, generator=g, device=args.device).to(dtype) for _ in range(2))
    weight = (torch.randn(vocab, hidden, generator=g, device=args.device) * hidden**-0.5).to(dtype)
    ids = torch.randint(0, vocab, (rows, length), generator=g, device=args.device)
    missing = {}
    if "liger" in variants and (problem := liger_problem()) is not None:
        missing["liger"] = problem
        variants.remove("liger")
    results = []
    references = [name for name in (REFERENCE, SPARSE_REFERENCE) if name in variants]
    for variant in references + [v for v in variants if v not in references]:
        for chunk in map(int, args.chunks.split(",")) if chunked(variant) else [None]:
            results.append(
                measure(variant, student, teacher, weight, ids, chunk, args.temperature, args.top_k, args.precision, args.device, args.repeats, args.warmup)
            )
    reference = {name: next(row for row in results if row["variant"] == name) for name in references}
    for row in results:
        against = reference[SPARSE_REFERENCE if sparse(row["variant"]) else REFERENCE]
        row["loss_difference"] = abs(row["loss"] - against["loss"]) / abs(against["loss"])
        row["grad_difference"] = difference(row["grad"], against["grad"]) if row is not against else 0.0
        print(f"{row['variant']:<16} chunk {row['chunk'] or '-':>5}  {row['ms']:9.2f} ms  {row['peak_mib']:9.1f} MiB  "
              f"loss {row['loss']:.5f} (diff {row['loss_difference']:.1e}), grad diff {row['grad_difference']:.1e}", flush=True)
    for row in results:
        row.pop("grad")
    for name, why in missing.items():
        print(f"{name:<16} absent: {why}")
    try:
        liger_version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        liger_version = None
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "liger_kernel": liger_version,
        "arch": args.arch, "vocab": vocab, "hidden": hidden, "tokens": rows * length, "precision": args.precision,
        "temperature": args.temperature, "repeats": args.repeats, "rows": results, "absent": missing,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    worst = max(max(r["loss_difference"], r["grad_difference"]) for r in results)
    if worst > args.tolerance:
        raise SystemExit(f"the variants differ by {worst:.2e} > --tolerance {args.tolerance:g}; see {args.out}")
    print(f"wrote {args.out}; largest difference {worst:.1e}")


if __name__ == "__main__":
    main()
