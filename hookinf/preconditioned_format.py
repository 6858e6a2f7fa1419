"""The records of a preconditioned store on disk: its manifest, the run in progress, and a store's identity.

A preconditioned store (:mod:`hookinf.preconditioned`) is a directory::

    gradients/      a gradient store of the preconditioned gradients (hookinf.store)
    run.json        RunRecord: what the run writing gradients/ computes; written before its first row, removed
                    once manifest.json is written
    manifest.json   PreconditionedRecord, written last: the store is complete exactly when it is there

``run.json``: ``format`` ``"hookinf.preconditioned-run"``, ``version`` 1, ``curvature`` (its hash) and ``method``,
``dtype`` (the stored dtype), ``origin`` (the source store's :class:`StoreIdentity`), ``source`` (its path, for
reference only), sealed by ``config_sha256``. A second :func:`hookinf.precondition_store` resumes ``gradients/``
only when it would compute the very same rows: the same curvature hash, dtype and source content.

``manifest.json``: ``format`` ``"hookinf.preconditioned-store"``, ``version`` 1, ``method``, ``curvature``,
``damping``, ``lambdas`` (``λ_l`` as applied), ``examples``, ``source``, ``origin`` (absent in manifests written
before it was recorded), sealed by ``config_sha256``.

A :class:`StoreIdentity` names a gradient store's content without reading its gradients: its number of rows, a
digest of its ids (in storage order) and a digest of its shards' row counts and SHA-256s (recorded in its manifest
when each shard was written). Two stores with the same identity hold the same bytes; a store written again with
other values, other ids or more rows has another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from hookinf.curvature import Curvature
from hookinf.ids import Ids
from hookinf.io import seal, tensor_bytes
from hookinf.store import GradientStore

FORMAT = "hookinf.preconditioned-store"
RUN_FORMAT = "hookinf.preconditioned-run"
MANIFEST = "manifest.json"
RUN = "run.json"
GRADIENTS = "gradients"


def curvature_hash(curvature: Curvature) -> str:
    """A 16-hex-digit SHA-256 of a curvature's method, damping, compressor, layers and every statistic's bytes."""
    digest = hashlib.sha256()
    head = {
        "method": curvature.method,
        "damping": [curvature.damping.relative, curvature.damping.absolute],
        "num_examples": curvature.num_examples,
        "compressor": None if curvature.compressor is None else curvature.compressor.config(),
        "layers": {name: shape.to_json() for name, shape in curvature.layers.items()},
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    for key, tensor in sorted(curvature.tensors.items()):
        host = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{host.dtype}:{list(host.shape)}".encode())
        digest.update(tensor_bytes(host))
    return digest.hexdigest()[:16]


def ids_digest(ids: Ids) -> str:
    """A 16-hex-digit SHA-256 of ids in their order (integer ids by their int64 bytes, strings as a JSON list)."""
    digest = hashlib.sha256()
    if isinstance(ids, torch.Tensor):
        digest.update(b"int:")
        digest.update(tensor_bytes(ids.to(device="cpu", dtype=torch.int64).contiguous()))
    else:
        digest.update(b"str:")
        digest.update(json.dumps(list(ids), ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class StoreIdentity:
    """What identifies a gradient store's content (see the module docstring).

    Attributes:
        rows: how many examples it holds.
        ids: :func:`ids_digest` of its ids in storage order.
        content: a 16-hex-digit SHA-256 of its shards' ``(count, sha256)`` in storage order (a shard of an old store
            without a recorded checksum counts by its file name and size).
    """

    rows: int
    ids: str
    content: str

    @classmethod
    def of(cls, store: GradientStore) -> StoreIdentity:
        """The identity of ``store`` (reads its ids, not its gradients)."""
        shards = [[s.count, s.sha256 if s.sha256 is not None else f"{s.file}:{s.size}"] for s in store.shards]
        content = hashlib.sha256(json.dumps(shards).encode("ascii")).hexdigest()[:16]
        return cls(len(store), ids_digest(store.ids), content)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"rows": self.rows, "ids": self.ids, "content": self.content}

    @classmethod
    def parse(cls, data: Any) -> StoreIdentity:
        """Parses :meth:`to_json`'s form.

        Raises:
            ValueError: a field is missing or of the wrong type.
        """
        if not isinstance(data, dict) or not isinstance(data.get("rows"), int):
            raise ValueError(f"a store identity is {{'rows': int, 'ids': str, 'content': str}}, not {data!r}")
        if not all(isinstance(data.get(key), str) for key in ("ids", "content")):
            raise ValueError(f"a store identity is {{'rows': int, 'ids': str, 'content': str}}, not {data!r}")
        return cls(data["rows"], data["ids"], data["content"])

    def differences(self, other: StoreIdentity) -> list[str]:
        """What differs from ``other``, as ``"what: this → other"`` phrases (empty when the two are the same)."""
        if self.rows != other.rows:
            return [f"rows: {self.rows} → {other.rows}"]
        if self.ids != other.ids:
            return [f"ids digest: {self.ids} → {other.ids}"]
        if self.content != other.content:
            return [f"gradients (the same ids): content digest {self.content} → {other.content}"]
        return []


def _sealed(fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "config_sha256": seal(fields)}


def _unsealed(data: Any, format_name: str) -> dict[str, Any]:
    """The fields of a sealed record of ``format_name``, version 1, checked against their checksum.

    Raises:
        ValueError: another format, a newer version, or an edit against its checksum.
    """
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise ValueError(f"format is {data.get('format') if isinstance(data, dict) else data!r}, not {format_name!r}")
    if data.get("version") != 1:
        raise ValueError(f"version {data.get('version')!r} is not one this hookinf reads (1): upgrade hookinf")
    fields = {key: value for key, value in data.items() if key != "config_sha256"}
    if data.get("config_sha256") != seal(fields):
        raise ValueError("the record does not match its checksum config_sha256: it was edited or damaged")
    return fields


@dataclass(frozen=True)
class PreconditionedRecord:
    """What a preconditioned store's manifest records.

    Attributes:
        method: the curvature's method (``"exact"``, ``"ekfac"``, ...).
        curvature: :func:`curvature_hash` of the curvature applied.
        damping: the damping rule, ``{"relative": ..., "absolute": ...}``.
        lambdas: ``λ_l`` per layer, as applied.
        examples: how many examples the store holds.
        source: the path of the gradient store it was computed from (for reference only).
        origin: the source store's identity when it was read (``None`` in manifests written before it was kept).
    """

    method: str
    curvature: str
    damping: dict[str, float | None]
    lambdas: dict[str, float]
    examples: int
    source: str
    origin: StoreIdentity | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON form, sealed by ``config_sha256``."""
        fields = {
            "format": FORMAT,
            "version": 1,
            "method": self.method,
            "curvature": self.curvature,
            "damping": self.damping,
            "lambdas": self.lambdas,
            "examples": self.examples,
            "source": self.source,
            **({"origin": self.origin.to_json()} if self.origin is not None else {}),
        }
        return _sealed(fields)

    @classmethod
    def parse(cls, data: Any) -> PreconditionedRecord:
        """Parses and checks the manifest's JSON form.

        Raises:
            ValueError: another format, a newer version, or an edit against its checksum.
            KeyError: a field is missing.
        """
        fields = _unsealed(data, FORMAT)
        lambdas = {str(name): float(value) for name, value in fields["lambdas"].items()}
        origin = StoreIdentity.parse(fields["origin"]) if "origin" in fields else None
        return cls(
            str(fields["method"]), str(fields["curvature"]), dict(fields["damping"]), lambdas,
            int(fields["examples"]), str(fields["source"]), origin,
        )  # fmt: skip


@dataclass(frozen=True)
class RunRecord:
    """What a :func:`~hookinf.precondition_store` run computes: the rows it writes are a function of these alone.

    Attributes:
        curvature: the curvature's hash.
        method: the curvature's method.
        dtype: the stored dtype (``"float64"``, ...).
        origin: the source store's identity.
        source: the source store's path (for reference only: a moved store is the same store).
    """

    curvature: str
    method: str
    dtype: str
    origin: StoreIdentity
    source: str

    def to_json(self) -> dict[str, Any]:
        """``run.json``'s form, sealed by ``config_sha256``."""
        fields = {
            "format": RUN_FORMAT,
            "version": 1,
            "curvature": self.curvature,
            "method": self.method,
            "dtype": self.dtype,
            "origin": self.origin.to_json(),
            "source": self.source,
        }
        return _sealed(fields)

    @classmethod
    def parse(cls, data: Any) -> RunRecord:
        """Parses and checks ``run.json``'s form.

        Raises:
            ValueError: another format, a newer version, an edit against its checksum, or a malformed field.
            KeyError: a field is missing.
        """
        fields = _unsealed(data, RUN_FORMAT)
        origin = StoreIdentity.parse(fields["origin"])
        return cls(str(fields["curvature"]), str(fields["method"]), str(fields["dtype"]), origin, str(fields["source"]))

    def differences(self, other: RunRecord) -> list[str]:
        """How ``other`` differs from this run, as ``"what: this → other"`` phrases; empty when it does not."""
        found = []
        if self.curvature != other.curvature:
            found.append(f"curvature: {self.method} {self.curvature} → {other.method} {other.curvature}")
        if self.dtype != other.dtype:
            found.append(f"dtype: {self.dtype} → {other.dtype}")
        found += [f"source store {what}" for what in self.origin.differences(other.origin)]
        return found
