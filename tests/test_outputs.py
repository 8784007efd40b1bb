"""Output folders appear whole or not at all, with the user's permissions, and clean up after killed runs."""

import os

import pytest

from linearize.hf.errors import LinearizeError
from linearize.outputs import atomic_folder


def test_a_folder_appears_only_when_complete_with_the_users_permissions(tmp_path):
    out = tmp_path / "model"
    leftover = tmp_path / ".model.partial-abc123"  # what a killed save of the same output leaves
    (leftover / "big").mkdir(parents=True)
    other = tmp_path / ".other.partial-xyz"  # another output's staging folder is not ours to remove
    other.mkdir()
    mask = os.umask(0o022)
    try:
        with atomic_folder(out) as staging:
            assert not out.exists() and not leftover.exists()
            (staging / "weights").write_text("w")
    finally:
        os.umask(mask)
    assert (out / "weights").read_text() == "w" and other.is_dir()
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-xyz", "model"]


def test_a_failed_save_leaves_nothing_and_an_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_folder(out):
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(LinearizeError, match="already exists; pass --overwrite"):
        with atomic_folder(out):
            pass
    with atomic_folder(out, overwrite=True) as staging:
        (staging / "new").write_text("n")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
