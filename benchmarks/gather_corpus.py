"""Gather a reproducible offline training corpus of real English prose for the quality runs.

Sources, both installable offline: the six Austen novels (a folder of .txt files, by default
`../shared/data/austen`; `persuasion.txt` is held out) and the Python 3.11 documentation's reST sources from
Debian's `python3.11-doc` package (downloaded with `apt-get download`, unpacked with `dpkg-deb -x`; every
20th file, in sorted order, is held out). Writes:

    OUT/train/austen.txt, OUT/train/python-docs.txt        training text
    OUT/heldout/persuasion.txt, OUT/heldout/python-docs.txt held-out text
    OUT/manifest.json                                      sources, versions, sizes, sha256 of each file

    python benchmarks/gather_corpus.py --out corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

DOC_PACKAGE = "python3.11-doc"
HELD_OUT_NOVEL = "persuasion.txt"


def python_docs(work: Path) -> tuple[list[Path], str]:
    subprocess.run(["apt-get", "download", DOC_PACKAGE], cwd=work, check=True, capture_output=True)
    deb = next(work.glob(f"{DOC_PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
    sources = sorted((work / "root").rglob("*.rst.txt"))
    if not sources:
        raise SystemExit(f"{deb.name} holds no .rst.txt sources")
    return sources, deb.name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--austen", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "austen"))
    parser.add_argument("--out", default="corpus")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)

    novels = sorted(Path(args.austen).glob("*.txt"))
    if not any(n.name == HELD_OUT_NOVEL for n in novels):
        raise SystemExit(f"{args.austen} has no {HELD_OUT_NOVEL}; pass --austen FOLDER with the six novels")
    (out / "train" / "austen.txt").write_text("\n\n".join(n.read_text() for n in novels if n.name != HELD_OUT_NOVEL))
    (out / "heldout" / HELD_OUT_NOVEL).write_text(Path(args.austen, HELD_OUT_NOVEL).read_text())

    with tempfile.TemporaryDirectory() as tmp:
        sources, deb = python_docs(Path(tmp))
        train = [s for i, s in enumerate(sources) if i % 20]
        heldout = [s for i, s in enumerate(sources) if not i % 20]
        (out / "train" / "python-docs.txt").write_text("\n\n".join(s.read_text() for s in train))
        (out / "heldout" / "python-docs.txt").write_text("\n\n".join(s.read_text() for s in heldout))

    files = sorted(p for p in out.rglob("*.txt"))
    manifest = {
        "austen": [n.name for n in novels],
        "held_out_novel": HELD_OUT_NOVEL,
        "python_docs_package": deb,
        "python_docs_files": {"train": len(train), "heldout": len(heldout)},
        "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name, info in manifest["files"].items():
        print(f"{name:28s} {info['bytes'] / 1e6:6.2f} MB  {info['sha256'][:12]}")


if __name__ == "__main__":
    main()
