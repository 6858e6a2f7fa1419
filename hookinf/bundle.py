"""A saved directory of one safetensors file and the JSON manifest naming it, replaced all-or-nothing and checked.

Curvatures (:meth:`hookinf.Curvature.save`) and scores (:meth:`hookinf.Scores.save`) are saved this way:

1. the tensors go to ``{stem}-{digest}.safetensors``, named by a hash of their content, so a save never replaces
   the file the current manifest names (each file by temporary file, fsync, rename);
2. the manifest — the caller's fields plus the tensor file's name, ``tensors_size`` and ``tensors_sha256``, and
   ``manifest_sha256``, the SHA-256 of all the rest — replaces ``manifest.json`` with one rename: the commit;
3. only then are the earlier tensor files and the temporary files of killed saves removed.

Killed before the manifest's rename, the directory holds the previous save whole (and at most an unused file, which
the next save removes); killed after it, the new one. Loading checks the manifest against ``manifest_sha256`` and the
tensor file against its size and SHA-256 before using them, and refuses a tensor file name that is not a plain file
of the directory. Manifests written before these fields existed load with the checks skipped, except that a tensor
file named ``{stem}-{digest}`` must still hold tensors of that digest. One process saves into a directory at a time:
two concurrent saves into one directory can remove each other's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from hookinf.io import file_digest, plain_name, remove_temporaries, seal, tensor_bytes, write_json, write_safetensors

MANIFEST = "manifest.json"
_SEAL = "manifest_sha256"


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its manifest (the caller's fields and the file's) and its tensors.

    Attributes:
        manifest: the manifest's JSON object.
        tensors: name → tensor (on the host).
        checksummed: whether the manifest and the tensor file were checked against recorded checksums (``False`` for
            saves from before checksums were recorded).
    """

    manifest: dict[str, Any]
    tensors: dict[str, Tensor]
    checksummed: bool


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """A 16-hex-digit hash of tensors' names and bytes (the content part of a tensor file's name)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        tensor = tensors[key].detach().cpu().contiguous()
        h.update(tensor_bytes(tensor))
    return h.hexdigest()[:16]


def save_bundle(
    directory: Path, stem: str, tensors: Mapping[str, Tensor], fields: Mapping[str, Any], legacy: Sequence[str] = ()
) -> None:
    """Saves ``tensors`` and a manifest of ``fields`` into ``directory`` (created when missing), all-or-nothing.

    Args:
        directory: the directory.
        stem: the tensor file's name stem (``"curvature"``, ``"scores"``).
        tensors: what to save.
        fields: the manifest's own fields (format, version, ...).
        legacy: fixed tensor file names of older formats, removed once the new manifest is in place.

    Raises:
        OSError: a write failed (the directory keeps the previous save).
        ValueError: a tensor has a dtype safetensors cannot hold.
    """
    directory.mkdir(parents=True, exist_ok=True)
    prepared = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    name = f"{stem}-{tensor_digest(prepared)}.safetensors"
    digest = write_safetensors(directory / name, prepared)
    manifest = {**fields, "tensors": name, "tensors_size": digest.size, "tensors_sha256": digest.sha256}
    write_json(directory / MANIFEST, {**manifest, _SEAL: seal(manifest)})
    for entry in os.scandir(directory):
        stale = entry.name.startswith(f"{stem}-") and entry.name.endswith(".safetensors") and entry.name != name
        if (stale or entry.name in legacy) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
    remove_temporaries(directory, (MANIFEST, f"{stem}-"))


def load_bundle(directory: Path, fmt: str, stem: str, legacy: str | None = None) -> Bundle:
    """Loads and checks a bundle saved by :func:`save_bundle` (or by an older hookinf).

    Args:
        directory: the directory.
        fmt: the ``format`` the manifest must have.
        stem: the tensor file's name stem.
        legacy: the tensor file of manifests that name none (an older format).

    Returns:
        The manifest and tensors.

    Raises:
        OSError: a file cannot be read.
        ValueError: the manifest is not one of ``fmt``, does not match its checksum, names a file outside the
            directory, or the tensor file does not match its recorded size, SHA-256 or name (the message names the
            file).
    """
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{manifest_path}: format is {found!r}, not {fmt!r}")
    sealed = manifest.pop(_SEAL, None)
    if sealed is not None and sealed != seal(manifest):
        raise ValueError(f"{manifest_path}: the manifest does not match its checksum {_SEAL} (edited or damaged)")
    name = manifest.get("tensors", legacy)
    if not plain_name(name):
        raise ValueError(f"{manifest_path}: the tensor file {name!r} is not a plain file name in {directory}")
    path = directory / str(name)
    size, sha256 = manifest.get("tensors_size"), manifest.get("tensors_sha256")
    if size is not None or sha256 is not None:
        digest = file_digest(path)
        if digest.size != size or digest.sha256 != sha256:
            what = f"{digest.size} bytes, not {size}" if digest.size != size else "its SHA-256 differs"
            raise ValueError(f"{path}: the file does not match the manifest ({what}): it was damaged or changed")
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a whole safetensors file ({err})") from err
    named = re.fullmatch(rf"{re.escape(stem)}-([0-9a-f]{{16}})\.safetensors", path.name)
    if sha256 is None and named is not None and tensor_digest(tensors) != named.group(1):
        raise ValueError(f"{path}: the tensors do not match the hash in the file's name: it was damaged or changed")
    return Bundle(manifest, tensors, checksummed=sealed is not None and sha256 is not None)
