"""Atomic writes (complete files or none, with the permissions a plain write would give), the safetensors writer,
the header check, leftover temporaries and the writer lock."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hookinf.errors import StoreError
from hookinf.io import (
    Sink,
    file_digest,
    plain_name,
    remove_temporaries,
    safetensors_header,
    write_atomically,
    write_json,
    write_safetensors,
)
from hookinf.lock import WriterLock


@pytest.fixture
def umask_027():  # type: ignore[no-untyped-def]
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_written_files_get_the_umask_permissions_not_the_temporary_files(tmp_path: Path, umask_027: int) -> None:
    write_json(tmp_path / "a.json", {})
    write_safetensors(tmp_path / "b.safetensors", {"x": torch.zeros(2)})
    for name in ("a.json", "b.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask_027, name  # 0o640, not mkstemp's 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old", encoding="utf-8")

    def failing(sink: Sink) -> None:
        sink.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, failing)
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# ---------------------------------------------------------------------------------------------------- safetensors files
def test_written_safetensors_read_back_bit_exactly_with_safetensors_own_reader(tmp_path: Path) -> None:
    tensors = {
        "f64": torch.randn(3, 2, dtype=torch.float64),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.tensor([1, -2, 3]),
        "u8": torch.tensor([1, 2, 250], dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(7.0),
        "strided": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
    }
    digest = write_safetensors(tmp_path / "t.safetensors", tensors)
    assert digest == file_digest(tmp_path / "t.safetensors")
    loaded = load_file(str(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as handle:  # memory-mapped reads
        mapped = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    for name, tensor in tensors.items():
        for got in (loaded[name], mapped[name]):
            assert got.dtype == tensor.dtype, name
            assert torch.equal(got, tensor), name
    header = safetensors_header(tmp_path / "t.safetensors")
    assert set(header) == set(tensors)
    assert header["f64"]["shape"] == [3, 2]


@pytest.mark.parametrize("damage", ["truncated", "extended", "tiny", "not-json"])
def test_a_header_that_does_not_fit_the_file_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"x": torch.zeros(10)})
    data = path.read_bytes()
    damaged = {
        "truncated": data[:-1],
        "extended": data + b"\0",
        "tiny": data[:5],
        "not-json": data[:8] + b"{" * (len(data) - 8),
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the damage
        safetensors_header(path)


def test_a_failed_stream_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def failing(sink: Sink) -> None:
        sink.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, failing)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_only_temporaries_of_the_named_targets_are_removed(tmp_path: Path) -> None:
    names = [".manifest.json.x1.tmp", ".shard-000001.safetensors.y2.tmp", ".other.z3.tmp", "shard-000001.tmp"]
    for name in names:
        (tmp_path / name).write_text("")
    assert sorted(remove_temporaries(tmp_path, ("manifest.json", "shard-"))) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


@pytest.mark.parametrize(
    ("name", "plain"),
    [("shard-1.safetensors", True), ("../x", False), ("a/b", False), (".hidden", False), ("", False), (3, False)],
)
def test_plain_names(name: object, plain: bool) -> None:
    assert plain_name(name) is plain


def test_a_writer_lock_is_exclusive_names_its_holder_and_is_released(tmp_path: Path) -> None:
    lock = WriterLock.acquire(tmp_path)
    holder = json.loads((tmp_path / "writer.lock").read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    with pytest.raises(StoreError, match=f"pid {os.getpid()} on host {re.escape(socket.gethostname())}"):
        WriterLock.acquire(tmp_path)
    lock.release()
    lock.release()  # idempotent
    again = WriterLock.acquire(tmp_path)
    assert again.held
    again.release()
    assert not again.held
    dropped = WriterLock.acquire(tmp_path)
    del dropped  # a store dropped without close() does not keep its store locked
    gc.collect()
    WriterLock.acquire(tmp_path).release()
