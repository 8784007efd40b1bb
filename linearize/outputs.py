"""Output folders that appear only when complete: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path

from .hf.errors import LinearizeError


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output folder unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LinearizeError(f"output {str(path)!r} exists and is a file; choose a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LinearizeError(f"output folder {str(path)!r} already exists; pass --overwrite or choose another --out")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed.

    Staging folders that an earlier, killed run of the same output left behind are removed first, and the folder
    gets the permissions any folder the user makes gets (mkdtemp's are private).
    """
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{glob_escape(path.name)}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, retired / path.name)
        os.replace(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, path)
