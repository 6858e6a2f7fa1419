"""Atomic writes: complete files or none, with the permissions a plain write would give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hookinf.io import atomic_write


@pytest.fixture
def umask_027():  # type: ignore[no-untyped-def]
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_written_files_get_the_umask_permissions_not_the_temporary_files(tmp_path: Path, umask_027: int) -> None:
    atomic_write(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}", encoding="utf-8"))
    atomic_write(tmp_path / "b.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))
    for name in ("a.json", "b.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask_027, name  # 0o640, not mkstemp's 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old", encoding="utf-8")

    def failing(tmp: str) -> None:
        Path(tmp).write_text("half", encoding="utf-8")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, failing)
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
