"""A saved student against its `linearize export` folder, the export loaded where linearize cannot be imported.

The student (with linearize) scores a left-padded batch of two held-out passages in float32 on the CPU and
generates greedily from it with its cache. Then a fresh `python -I` process (isolated: no PYTHONPATH, no user site,
so neither linearize nor anything carried beside it; where linearize is pip-installed, that process hides it from
imports too) loads the export with `AutoModelForCausalLM.from_pretrained`, without remote code, and does the same.
`--python` runs that process in another environment, such as a clean virtual environment that has only torch and
transformers. It prints and writes (--out) the class loaded, the relative error of the logits at real positions,
whether the generated tokens are equal, and that process's torch and transformers versions; it exits 1 when they
differ.

    python benchmarks/export_check.py out/hybrid_qwen3_5 out/hybrid_qwen3_5-native --text corpus/heldout/persuasion.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize  # noqa: F401  (registers the student's architecture)
from linearize.export import FLOAT32_TOLERANCE

CHECK = """
import json, sys
class Hide:  # where linearize is pip-installed, site-packages would still find it
    def find_spec(self, name, path=None, target=None):
        if name == "linearize" or name.startswith("linearize."):
            raise ImportError("linearize is hidden in this process")
sys.meta_path.insert(0, Hide())
import torch, transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
probe = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=probe["ids"], attention_mask=probe["mask"]).logits
real = probe["mask"].bool()
error = ((logits - probe["logits"])[real].norm() / probe["logits"][real].norm()).item()
tokens = model.generate(input_ids=probe["ids"], attention_mask=probe["mask"], max_new_tokens=probe["steps"],
                        min_new_tokens=probe["steps"], do_sample=False)
print(json.dumps({"class": type(model).__name__, "logits_relative_error": error,
                  "same_generation": bool(torch.equal(tokens, probe["tokens"])),
                  "torch": torch.__version__, "transformers": transformers.__version__}))
"""


def probe_batch(tokenizer, text: str, lengths=(192, 128)):
    """Two passages of the text, of different lengths, left-padded into one batch."""
    ids = tokenizer(text[: 20 * sum(lengths)], add_special_tokens=False)["input_ids"]
    rows, start = [], 0
    for n in lengths:
        rows.append(ids[start:start + n])
        start += n
    width = max(lengths)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, mask


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", type=Path)
    parser.add_argument("native", type=Path)
    parser.add_argument("--text", type=Path, required=True, help="held-out text the probe passages come from")
    parser.add_argument("--steps", type=int, default=24, help="greedy tokens generated")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the isolated process, e.g. a clean "
                        "virtual environment's bin/python holding only torch and transformers (default: this one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).eval()
    ids, mask = probe_batch(AutoTokenizer.from_pretrained(args.student), args.text.read_text())
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=mask).logits
    tokens = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False)
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe.pt"
        torch.save({"ids": ids, "mask": mask, "logits": logits, "tokens": tokens, "steps": args.steps}, probe)
        done = subprocess.run([args.python, "-I", "-c", CHECK, str(args.native.resolve()), str(probe)], cwd=folder,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"the isolated process failed:\n{done.stderr[-2000:]}")
    result = {"student": str(args.student), "native": str(args.native), "python": args.python, "tolerance": FLOAT32_TOLERANCE,
              **json.loads(done.stdout.strip().splitlines()[-1])}
    result["passed"] = result["logits_relative_error"] < FLOAT32_TOLERANCE and result["same_generation"]
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
