"""The on-disk format of a gradient store: its manifest, its shards' names, and the checks made when it opens.

``manifest.json``::

    format, version        "hookinf.gradient-store"; 1 (2 when the ids are strings)
    compressor, layers,    the store's configuration: compressor config and seed, compressed and original layer
    original, dtype,       shapes, the stored dtype, the model's fingerprint
    fingerprint
    config_sha256          SHA-256 of the configuration above as canonical JSON (an edit or a damaged byte shows)
    ids                    "int" or "str" (null before the first shard): a store holds one kind of id
    weights                {"hash", "run"}: the weights the gradients were taken at (hookinf.weights.WeightsRecord);
                           absent in stores written before it was recorded
    shards                 [{"file", "count", "size", "sha256"}], in storage order
    merged                 the parts' shards this manifest has merged (absent when none; see hookinf.store_parts)

``shard-NNNNNN.safetensors`` holds one ``[n, r_l]`` tensor per layer in the store's dtype, and the ids: ``__ids__``
``int64 [n]``, or ``__ids_utf8__`` ``uint8`` (the UTF-8 JSON list of the ``n`` string ids). Shard numbers only grow:
a new shard takes the number after the largest one in the directory, listed or not, so it never replaces a file.
A store logged by several ranks also has parts ``rank-NNNNN/`` (stores of their own, see :mod:`hookinf.store_parts`),
whose shards the manifest lists as ``rank-NNNNN/shard-NNNNNN.safetensors`` once merged.

The shard list is not sealed: removing the entry of a damaged shard by hand is a valid recovery (its examples are
logged again on the next resume). Each listed shard's size and header are checked when the store opens; its
checksum by :meth:`hookinf.GradientStore.verify`. Manifests written before checksums existed (no ``config_sha256``,
no ``size``/``sha256``) open with those checks skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from hookinf.errors import StoreError
from hookinf.ids import IdKind, Ids, id_values, strings_from_tensor
from hookinf.io import SAFETENSORS_DTYPES, file_digest, plain_name, safetensors_header, seal
from hookinf.rich_text import shortened
from hookinf.shapes import LayerShape
from hookinf.weights import WeightsRecord

FORMAT = "hookinf.gradient-store"
MANIFEST = "manifest.json"
INT_IDS = "__ids__"
STR_IDS = "__ids_utf8__"
_CONFIG = ("format", "compressor", "layers", "original", "dtype", "fingerprint")
_SHARD = re.compile(r"shard-(\d+)\.safetensors")
PART_SHARD = re.compile(r"rank-\d{5}/shard-\d+\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Shard:
    """One flushed shard: its file name and number of examples, and the size and SHA-256 recorded when written.

    ``size`` and ``sha256`` are ``None`` for shards of stores written before they were recorded.
    """

    file: str
    count: int
    size: int | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (without the fields that are ``None``)."""
        data: dict[str, Any] = {"file": self.file, "count": self.count}
        if self.size is not None:
            data["size"] = self.size
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        return data


@dataclass(frozen=True)
class StoreManifest:
    """A store's manifest, parsed and checked (see the module docstring for its JSON form)."""

    compressor: dict[str, Any]
    layers: dict[str, LayerShape]
    original: dict[str, LayerShape]
    dtype: torch.dtype
    fingerprint: str
    ids: IdKind | None
    shards: tuple[Shard, ...]
    weights: WeightsRecord | None = None
    merged: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON form, its configuration sealed by ``config_sha256``."""
        config = {
            "format": FORMAT,
            "compressor": self.compressor,
            "layers": {name: shape.to_json() for name, shape in self.layers.items()},
            "original": {name: shape.to_json() for name, shape in self.original.items()},
            "dtype": str(self.dtype).removeprefix("torch."),
            "fingerprint": self.fingerprint,
        }
        return {
            "format": FORMAT,
            "version": 2 if self.ids == "str" else 1,
            **config,
            "config_sha256": seal(config),
            "ids": self.ids,
            "shards": [shard.to_json() for shard in self.shards],
            **({"weights": self.weights.to_json()} if self.weights is not None else {}),
            **({"merged": list(self.merged)} if self.merged else {}),
        }

    def with_shard(self, shard: Shard, kind: IdKind) -> StoreManifest:
        """This manifest with ``shard`` (holding ids of ``kind``) listed last."""
        return replace(self, ids=kind, shards=(*self.shards, shard))

    @classmethod
    def parse(cls, data: Any) -> StoreManifest:
        """Parses and checks a manifest's JSON form.

        Raises:
            ValueError: the manifest is malformed, from a newer hookinf, edited against its checksum, or lists a
                shard twice or under a name that is not a plain ``shard-N.safetensors`` in the store's directory.
            KeyError: a field is missing.
            TypeError: a field has the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > 2:
            raise ValueError(f"version {version!r} is not one this hookinf reads (1 or 2): upgrade hookinf")
        sealed = data.get("config_sha256")
        if sealed is not None and sealed != seal({key: data[key] for key in _CONFIG}):
            raise ValueError(
                "the configuration (compressor, layers, original shapes, dtype or fingerprint) does not match its "
                "checksum config_sha256: the manifest was edited or damaged"
            )
        dtype = getattr(torch, str(data["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {data['dtype']!r} is not a torch dtype")
        shards = tuple(_shard(entry) for entry in data["shards"])
        files = [shard.file for shard in shards]
        twice = next((file for file in files if files.count(file) > 1), None)
        if twice is not None:
            raise ValueError(f"shard {twice!r} is listed twice (its ids would count twice)")
        kind = data.get("ids", "int" if shards else None)  # stores from before string ids hold integer ids
        if kind not in ("int", "str", None) or (kind is None and shards):
            raise ValueError(f"ids is {kind!r}, not 'int' or 'str'")
        layers = {str(n): LayerShape.from_json(s) for n, s in data["layers"].items()}
        original = {str(n): LayerShape.from_json(s) for n, s in data["original"].items()}
        weights = WeightsRecord.parse(data.get("weights"))
        merged = tuple(str(name) for name in data.get("merged", ()))
        if not all(PART_SHARD.fullmatch(name) for name in merged):
            raise ValueError(f"merged lists {merged!r}, not only rank-N/shard-N.safetensors files")
        fields = (dict(data["compressor"]), layers, original, dtype, str(data["fingerprint"]), kind, shards, weights)
        return cls(*fields, merged)


def _shard(entry: Any) -> Shard:
    file, count = entry["file"], entry["count"]
    if not (plain_name(file) and _SHARD.fullmatch(file)) and not (isinstance(file, str) and PART_SHARD.fullmatch(file)):
        raise ValueError(
            f"shard name {file!r} is not a plain shard-N.safetensors file of the store's directory (or of a part, "
            f"rank-N/shard-N.safetensors)"
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"shard {file!r} has count {count!r}, not a positive integer")
    size, sha256 = entry.get("size"), entry.get("sha256")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"shard {file!r} has size {size!r}, not a byte count")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise ValueError(f"shard {file!r} has sha256 {sha256!r}, not a hex SHA-256")
    return Shard(file, count, size, sha256)


def check_shard(directory: Path, manifest: StoreManifest, shard: Shard) -> None:
    """Checks a listed shard without reading its data: it exists, has the recorded size, and its header fits.

    The header must hold exactly one ``[count, r_l]`` tensor of the store's dtype per layer and the ids of the
    store's kind (``[count]`` integers, or string ids).

    Raises:
        StoreError: names the shard file and what does not match.
    """
    path = directory / shard.file
    try:
        size = os.stat(path).st_size
        if shard.size is not None and size != shard.size:
            raise ValueError(f"it has {size} bytes but was written with {shard.size} (truncated, extended or replaced)")
        header = safetensors_header(path)
    except FileNotFoundError as err:
        raise StoreError(
            f"{path}: unreadable shard (the manifest lists it but the file is missing); restore it, or remove its "
            f"entry from {directory / MANIFEST} and log again to store its examples anew."
        ) from err
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: unreadable shard ({err}); {_RECOVER.format(manifest=directory / MANIFEST)}") from err
    ids_key = STR_IDS if manifest.ids == "str" else INT_IDS
    dtype = SAFETENSORS_DTYPES.get(manifest.dtype)
    wanted: dict[str, tuple[str | None, list[int] | None]] = {
        name: (dtype, [shard.count, s.dim]) for name, s in manifest.layers.items()
    }
    wanted[ids_key] = ("U8", None) if ids_key == STR_IDS else ("I64", [shard.count])
    if set(header) != set(wanted):
        missing, extra = sorted(set(wanted) - set(header)), sorted(set(header) - set(wanted))
        raise StoreError(
            f"{path}: the shard does not match the manifest (missing tensors {missing}, unexpected {extra}); "
            f"{_RECOVER.format(manifest=directory / MANIFEST)}"
        )
    for name, (kind, shape) in wanted.items():
        entry = header[name]
        if entry.get("dtype") != kind or (shape is not None and entry.get("shape") != shape):
            raise StoreError(
                f"{path}: tensor {name!r} is {entry.get('dtype')} {entry.get('shape')} but the manifest implies "
                f"{kind} {shape if shape is not None else '[n]'} (an edited count or shape, or another store's "
                f"shard); {_RECOVER.format(manifest=directory / MANIFEST)}"
            )


_RECOVER = "restore the file, or remove its entry from {manifest} and log again to store its examples anew"


def shard_numbers(names: Iterable[str]) -> list[int]:
    """The numbers of the ``shard-N.safetensors`` names among ``names``."""
    return [int(match.group(1)) for name in names if (match := _SHARD.fullmatch(name))]


def next_shard_name(directory: Path, listed: Iterable[Shard]) -> str:
    """A shard name no file has: the number after the largest one listed or present in ``directory``."""
    numbers = shard_numbers(os.listdir(directory)) + shard_numbers(shard.file for shard in listed)
    return f"shard-{max(numbers, default=-1) + 1:06d}.safetensors"


def unlisted_shards(directory: Path, listed: Iterable[Shard]) -> list[str]:
    """Shard files in ``directory`` that the manifest does not list (left by a kill, or by a manual recovery)."""
    known = {shard.file for shard in listed}
    return sorted(name for name in os.listdir(directory) if _SHARD.fullmatch(name) and name not in known)


def read_tensors(
    directory: Path, shard: Shard, keys: Sequence[str], device: torch.device | None = None
) -> dict[str, Tensor]:
    """Tensors ``keys`` of a shard (memory-mapped), on ``device`` (default: the host).

    Raises:
        StoreError: the shard cannot be read (names it).
    """
    where = "cpu" if device is None else str(device)
    try:
        with safe_open(str(directory / shard.file), framework="pt", device=where) as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except (OSError, SafetensorError) as err:
        raise StoreError(f"{directory / shard.file}: unreadable shard ({err}).") from err


def read_ids(directory: Path, manifest: StoreManifest, shard: Shard) -> Ids:
    """A shard's ids: ``int64 [count]``, or ``count`` strings.

    Raises:
        StoreError: the shard cannot be read, or holds another number of ids than listed (names it).
    """
    if manifest.ids != "str":
        return read_tensors(directory, shard, [INT_IDS])[INT_IDS]
    try:
        values = strings_from_tensor(read_tensors(directory, shard, [STR_IDS])[STR_IDS])
    except ValueError as err:
        raise StoreError(f"{directory / shard.file}: unreadable shard ({err}).") from err
    if len(values) != shard.count:
        raise StoreError(f"{directory / shard.file}: the shard holds {len(values)} ids, not the {shard.count} listed.")
    return values


@dataclass(frozen=True)
class StoreCheck:
    """What :meth:`hookinf.GradientStore.verify` read and found whole.

    Attributes:
        shards: listed shards, all read in full.
        examples: stored examples (every id once).
        checksummed: shards whose SHA-256 matched the manifest's (the others predate recorded checksums).
        bytes: bytes read.
        unlisted: shard files in the directory that the manifest does not list (ignored by the store).
    """

    shards: int
    examples: int
    checksummed: int
    bytes: int
    unlisted: tuple[str, ...]


def verify_shards(directory: Path, manifest: StoreManifest) -> StoreCheck:
    """Reads every listed shard in full: its SHA-256 (where recorded), tensors and ids, and no id twice.

    Raises:
        StoreError: names the first shard that is damaged, or the id stored twice.
    """
    seen: set[int | str] = set()
    checksummed = total = 0
    for shard in manifest.shards:
        path = directory / shard.file
        try:
            digest = file_digest(path)
        except OSError as err:
            raise StoreError(f"{path}: unreadable shard ({err.strerror or err}).") from err
        total += digest.size
        if shard.sha256 is not None:
            if digest.sha256 != shard.sha256:
                raise StoreError(
                    f"{path}: the shard's SHA-256 differs from the one recorded when it was written (the file was "
                    f"damaged or changed); {_RECOVER.format(manifest=directory / MANIFEST)}."
                )
            checksummed += 1
        read_tensors(directory, shard, list(manifest.layers))  # every tensor's data, not only the header
        values: Sequence[int | str] = id_values(read_ids(directory, manifest, shard))
        again = next((value for value in values if value in seen), None)
        if again is not None or len(set(values)) != len(values):
            raise StoreError(f"{path}: an id ({again!r}) is stored twice; every example must be stored once.")
        seen.update(values)
    unlisted = tuple(unlisted_shards(directory, manifest.shards))
    return StoreCheck(len(manifest.shards), len(seen), checksummed, total, unlisted)


def store_repr(
    path: Path, examples: int, shards: int, compressor: dict[str, Any], layers: dict[str, LayerShape]
) -> str:
    """A store's one-line repr: the path, the counts, the compressor's kind and a few layers (first two, last one)."""
    kind = compressor.get("kind", "?")
    names = list(layers)
    picked = names if len(names) <= 3 else [names[0], names[1], names[-1]]
    labels = dict(zip(names, shortened([name or "<model>" for name in names], 40), strict=True))
    shown = [f"{labels[name]}: {layers[name].dim}" for name in picked]  # cut where the names read alike
    if len(names) > 3:
        shown.insert(2, "…")
    return (
        f"GradientStore({str(path)!r}, {examples:,} examples, {shards} shard{'' if shards == 1 else 's'}, "
        f"{kind}, {len(names)} layer{'' if len(names) == 1 else 's'} [{', '.join(shown)}])"
    )
