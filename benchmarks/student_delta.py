"""A distilled student as its difference from its teacher: a few MB that come back from a GPU machine (whose calls
return files of at most 16 MiB), rebuilt here into a model folder that `from_pretrained` loads.

`save` keeps every tensor the teacher lacks (feature maps, window shares, gates) whole, and every tensor that
differs from the teacher's as low-rank factors where that is exact to `--tolerance` (LoRA KD merges rank-r updates
into the teacher's projections), else whole; tensors equal to the teacher's are left out. It checks the rebuilt
student's logits against the saved student's before it writes, and records a checksum of the teacher so that `load`
refuses a different one (a GGUF dequantised by another version of `gguf`, say).

    python benchmarks/student_delta.py save --teacher /tmp/smollm2.gguf --student /tmp/quality-v1/hybrid_long --out $OUT/delta-v1
    python benchmarks/student_delta.py load --teacher smollm2-135m --delta runs/delta-v1 --out runs/hybrid_long_seed1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import linearize

SHARD_BYTES = 15 * 2**20  # a returned file holds at most 16 MiB
MAX_RANK = 64


def teacher_key(student_key: str) -> str:
    """The teacher's name of a student tensor: the converted model wraps the teacher (`model.`) and each converted
    layer's mixer holds the teacher's attention module (`self_attn.attn.`)."""
    return student_key.removeprefix("model.").replace("self_attn.attn.", "self_attn.")


def checksum(state: dict[str, torch.Tensor]) -> float:
    return float(sum(t.double().abs().sum() for t in state.values()))


def low_rank(delta: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) with A @ B == delta to within `tolerance` of delta's largest entry, at the smallest rank up to MAX_RANK."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    scale = delta.abs().max().double()
    for rank in range(1, min(MAX_RANK, len(s)) + 1):
        a, b = u[:, :rank] * s[:rank], vh[:rank]
        if (a @ b - delta.double()).abs().max() <= tolerance * scale:
            return a.float().contiguous(), b.float().contiguous()
    return None


def save(args) -> None:
    teacher, _ = linearize.load_teacher(args.teacher, dtype=torch.float32)
    reference = teacher.state_dict()
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).eval()
    parts, summary = {}, {"whole": 0, "low_rank": 0, "same": 0, "ranks": {}}
    for name, tensor in student.state_dict().items():
        base = reference.get(teacher_key(name))
        if base is None or base.shape != tensor.shape:
            parts[f"whole::{name}"] = tensor.contiguous()
            summary["whole"] += 1
            continue
        delta = tensor - base
        if not delta.any():
            summary["same"] += 1
            continue
        factors = low_rank(delta, args.tolerance) if delta.dim() == 2 else None
        if factors is None:
            parts[f"whole::{name}"] = tensor.contiguous()
            summary["whole"] += 1
        else:
            parts[f"a::{name}"], parts[f"b::{name}"] = factors
            summary["low_rank"] += 1
            summary["ranks"][str(factors[0].shape[1])] = summary["ranks"].get(str(factors[0].shape[1]), 0) + 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards, shard, size = [], {}, 0
    for key, tensor in parts.items():
        if shard and size + tensor.nbytes > SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
        shard[key], size = tensor, size + tensor.nbytes
    shards.append(shard)
    for i, shard in enumerate(shards):
        save_file(shard, str(out / f"delta-{i}.safetensors"))
    student.config.save_pretrained(out)
    rebuilt = rebuild(teacher, out)
    ids = torch.randint(0, student.config.get_text_config().vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (rebuilt(ids).logits - student(ids).logits).abs().max().item()
    summary |= {"teacher_checksum": checksum(reference), "max_logit_error": error, "shards": len(shards)}
    (out / "delta.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)


def rebuild(teacher, folder: Path):
    """The student from `teacher` (its float32 state) and the delta in `folder`."""
    reference = teacher.state_dict()
    parts = {}
    for path in sorted(folder.glob("delta-*.safetensors")):
        parts |= load_file(str(path))
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name in model.state_dict():
        if f"whole::{name}" in parts:
            state[name] = parts[f"whole::{name}"]
        elif f"a::{name}" in parts:
            state[name] = reference[teacher_key(name)] + parts[f"a::{name}"] @ parts[f"b::{name}"]
        else:
            state[name] = reference[teacher_key(name)]
    model.load_state_dict(state)
    return model.eval()


def load(args) -> None:
    folder = Path(args.delta)
    recorded = json.loads((folder / "delta.json").read_text())["teacher_checksum"]
    teacher, tokenizer = linearize.load_teacher(args.teacher, dtype=torch.float32)
    found = checksum(teacher.state_dict())
    if abs(found - recorded) > 1e-6 * abs(recorded):
        raise SystemExit(f"this teacher's weights sum to {found:.6f}, the delta's teacher's to {recorded:.6f}: load the teacher it was saved against")
    model = rebuild(teacher, folder)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    keep = verbs.add_parser("save", help="write a saved student's difference from its teacher")
    keep.add_argument("--teacher", required=True)
    keep.add_argument("--student", required=True)
    keep.add_argument("--out", required=True)
    keep.add_argument("--tolerance", type=float, default=1e-4, help="a low-rank form's largest error, relative to the delta's largest entry")
    build = verbs.add_parser("load", help="rebuild the student from the teacher and a saved delta")
    build.add_argument("--teacher", required=True)
    build.add_argument("--delta", required=True)
    build.add_argument("--out", required=True)
    args = parser.parse_args()
    save(args) if args.verb == "save" else load(args)


if __name__ == "__main__":
    main()
