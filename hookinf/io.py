"""Crash-safe file writes and checksums shared by curvatures, scores and gradient stores.

Every file is written to a temporary file in its target's directory (named ``.{target name}.{random}.tmp``),
fsynced and renamed over the target, and the directory is fsynced after the rename: a reader sees the old file or
the new one, never a part. :func:`write_atomically` hashes (SHA-256) what it writes as it goes, so a manifest can
record each file's size and checksum without reading it back; errors are the ``OSError`` of the failing call (a full
disk, a file-size limit, a read-only directory), for the caller to re-raise naming its target.
Safetensors files are written here too (:func:`write_safetensors`, the same bytes layout as ``safetensors``), so a
failed write is a plain ``OSError`` and the file is hashed while it streams out.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

_CHUNK = 1 << 20
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reader's own limit
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class FileDigest:
    """A file's size in bytes and the hex SHA-256 of its content."""

    size: int
    sha256: str


class Sink:
    """The temporary file a :func:`write_atomically` callback writes to; hashes and counts what goes through."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        """Appends ``data`` to the file."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._handle.write(view)
        self.size += view.nbytes

    def digest(self) -> FileDigest:
        """What was written so far: its size and SHA-256."""
        return FileDigest(self.size, self._hash.hexdigest())


def tensor_bytes(tensor: Tensor) -> memoryview:
    """A zero-copy view of a contiguous host tensor's bytes, without numpy (a bare install has none).

    The view reads the tensor's memory in place: keep ``tensor`` alive while it is used.

    Raises:
        ValueError: ``tensor`` is not a contiguous tensor on the CPU.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"tensor_bytes needs a contiguous CPU tensor; got one on {tensor.device}.")
    size = tensor.numel() * tensor.element_size()
    if size == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * size).from_address(tensor.data_ptr())).cast("B")


def write_atomically(target: Path, write: Callable[[Sink], None]) -> FileDigest:
    """Writes ``target`` through ``write(sink)`` into a temporary file, fsyncs and renames it over ``target``.

    The file gets the permissions a plain ``open(target, "w")`` would give (``0o666`` less the umask), not the
    owner-only ``0o600`` of a temporary file. A failure removes the temporary file and leaves ``target`` as it was.

    Args:
        target: the file to write (its directory must exist).
        write: called once with the :class:`Sink` to write the content to.

    Returns:
        The size and SHA-256 of what was written.

    Raises:
        OSError: the write, fsync or rename failed (disk full, file too large, no permission, ...).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            sink = Sink(handle)
            write(sink)
            handle.flush()
            os.chmod(tmp, 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
    return sink.digest()


def write_json(target: Path, data: Mapping[str, Any]) -> FileDigest:
    """Writes ``data`` as indented JSON to ``target`` atomically (see :func:`write_atomically`)."""
    text = json.dumps(data, indent=2).encode("utf-8")
    return write_atomically(target, lambda sink: sink.write(text))


def write_safetensors(target: Path, tensors: Mapping[str, Tensor]) -> FileDigest:
    """Writes ``tensors`` as a safetensors file atomically, streaming each tensor's bytes (no copy of the file).

    The layout is safetensors' own: an 8-byte little-endian header length, the JSON header (padded with spaces to a
    multiple of 8 bytes), then the tensors' bytes, largest element size first so that every tensor is aligned.

    Raises:
        OSError: the write failed.
        ValueError: a tensor has a dtype safetensors cannot hold.
    """
    prepared = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    if sys.byteorder != "little":  # pragma: no cover - safetensors' own writer swaps bytes on big-endian hosts
        data = safetensors_bytes(prepared)
        return write_atomically(target, lambda sink: sink.write(data))
    order = sorted(prepared, key=lambda name: (-prepared[name].element_size(), name))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        tensor = prepared[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which a safetensors file cannot hold")
        end = offset + tensor.numel() * tensor.element_size()
        dtype = SAFETENSORS_DTYPES[tensor.dtype]
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)

    def write(sink: Sink) -> None:
        sink.write(struct.pack("<Q", len(text)))
        sink.write(text)
        for name in order:
            if prepared[name].numel():
                sink.write(tensor_bytes(prepared[name]))

    return write_atomically(target, write)


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header (``{name: {"dtype", "shape", "data_offsets"}}``).

    Reads only the header, and checks that the tensors' data exactly fills the rest of the file.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not a whole safetensors file (truncated, extended, or not one at all).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError(f"header length {length} does not fit the file's {size} bytes")
        entries = json.loads(handle.read(length).decode("utf-8"))
    if not isinstance(entries, dict):
        raise ValueError("the header is not a JSON object")
    entries.pop("__metadata__", None)
    end = 0
    for name, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {name!r} has no valid data offsets")
        end = max(end, offsets[1])
    if 8 + length + end != size:
        raise ValueError(f"the tensors need {8 + length + end} bytes but the file has {size} (truncated or extended)")
    return entries


def file_digest(path: Path) -> FileDigest:
    """The size and SHA-256 of a file, read in chunks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(size, digest.hexdigest())


def seal(fields: Mapping[str, Any]) -> str:
    """The SHA-256 of ``fields`` as canonical JSON (sorted keys, no spaces): a manifest's checksum of itself."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def plain_name(name: object) -> bool:
    """Whether ``name`` is a plain, visible file name: no directory part, not ``.``/``..``, not hidden."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
        and os.path.basename(name) == name
    )


def remove_temporaries(directory: Path, names: Iterable[str]) -> list[str]:
    """Removes the temporary files a killed write left for targets whose names start with one of ``names``.

    Call it only where no other process writes into ``directory`` (under its writer lock, or in a directory only
    one saver uses): a temporary file of a write in progress would go too.

    Returns:
        The names of the files removed.
    """
    prefixes = tuple(f".{name}" for name in names)
    removed = []
    for entry in os.scandir(directory):
        if entry.name.startswith(prefixes) and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def fsync_directory(directory: Path) -> None:
    """Makes the renames in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # pragma: no cover - Windows
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back at once
    os.umask(mask)
    return mask
