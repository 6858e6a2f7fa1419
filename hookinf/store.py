"""``GradientStore``: compressed per-example gradients on disk, append-only, crash-safe and checked.

A store is a directory: ``manifest.json``, one ``shard-NNNNNN.safetensors`` per flush, and ``writer.lock`` (see
:mod:`hookinf.store_format` for the format and :mod:`hookinf.lock` for the lock); a store logged by several ranks
also has one part per rank, which it reads until they are merged (:mod:`hookinf.store_parts`).

Durability: a shard is written to a temporary file, fsynced and renamed to a name no file has, and only then is the
manifest (also temporary file + rename) updated to list it with its size and SHA-256. A run killed at any point
leaves a manifest that lists only whole shards; a shard file it does not list is ignored (never overwritten), and
the temporary files a kill leaves are removed when the store is next opened for writing.

Checks: opening a store checks the manifest (its configuration against its checksum, each shard listed once under a
plain name) and each listed shard's size and header; :meth:`GradientStore.verify` also reads every shard and checks
its SHA-256. Writing needs the store's writer lock: a second writer is refused, naming the first.
Stores never see models: they hold tensors, ids and configuration.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from hookinf.errors import StoreError
from hookinf.ids import IdKind, Ids, as_ids, concat, empty_ids, id_count, id_kind, id_values, strings_to_tensor
from hookinf.io import remove_temporaries, write_json, write_safetensors
from hookinf.lock import WriterLock
from hookinf.shapes import LayerShape
from hookinf.store_format import (
    INT_IDS,
    MANIFEST,
    STR_IDS,
    Shard,
    StoreCheck,
    StoreManifest,
    next_shard_name,
    read_ids,
    read_tensors,
    store_repr,
    unlisted_shards,
    verify_shards,
)
from hookinf.store_parts import load_view, remove_parts
from hookinf.weights import WeightsRecord, check_resume, check_scoring

__all__ = ["GradientStore", "StoreCheck", "StoreError"]


class GradientStore:
    """A directory of compressed per-example gradients (see the module docstring).

    Open an existing store with ``GradientStore(path)`` (for reading: no lock); :func:`hookinf.log` (or a watch with
    ``log_to=``) creates and fills one through :meth:`create`.

    Attributes:
        path: the directory.
        compressor: the compressor's configuration (``{"kind": "logra", "r_in": ..., ...}``).
        layers: layer → compressed shape, in model order.
        original: layer → uncompressed shape (identifies the model).
        dtype: the stored dtype.
        fingerprint: the model's fingerprint (its tracked layers' names and shapes).
        shards: the listed shards, in storage order.

    Raises:
        StoreError: no store at ``path``, or a damaged one (the message names the file).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock: WriterLock | None = None
        self._load()

    def _load(self) -> None:
        """Reads and checks the manifest (with its parts' unmerged shards) and the listed shards' sizes and headers."""
        self._set(load_view(self.path))
        self._ids: Ids | None = None

    def _set(self, manifest: StoreManifest) -> None:
        self.manifest = manifest
        self.compressor: dict[str, Any] = manifest.compressor
        self.layers = manifest.layers
        self.original = manifest.original
        self.dtype: torch.dtype = manifest.dtype
        self.fingerprint = manifest.fingerprint
        self.shards: list[Shard] = list(manifest.shards)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        compressor: Mapping[str, Any],
        layers: Mapping[str, LayerShape],
        original: Mapping[str, LayerShape],
        dtype: torch.dtype,
        fingerprint: str,
        weights: WeightsRecord | None = None,
        overwrite: bool = False,
    ) -> GradientStore:
        """Opens a store for writing: creates an empty one, or opens a compatible existing one to resume.

        The returned store holds the writer lock until :meth:`close` (or the end of a ``with`` block around it);
        temporary files that killed writers left are removed.

        Args:
            path: the store's directory (created when missing).
            compressor: the compressor's configuration; a store holds one.
            layers: layer → compressed shape, in model order.
            original: layer → uncompressed shape.
            dtype: the stored dtype.
            fingerprint: the tracked layers' fingerprint (:func:`hookinf.shapes.fingerprint`).
            weights: the weights the gradients about to be logged are taken at; recorded in the manifest. A store
                holding gradients taken at other weights, by another logger (another run), is refused.
            overwrite: replace what ``path`` holds (its manifest and shards; nothing else in the directory) with an
                empty store first.

        Raises:
            StoreError: another writer holds the store (named), the directory cannot be written, or it holds a store
                with another compressor, model, dtype or weights.
        """
        directory = Path(path)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"{directory}: cannot create the store's directory ({err.strerror or err}).") from err
        lock = WriterLock.acquire(directory)
        try:
            _clean(directory)
            if overwrite or not (directory / MANIFEST).is_file():
                empty = StoreManifest(dict(compressor), dict(layers), dict(original), dtype, fingerprint, None, ())
                try:
                    _write_manifest(directory, replace(empty, weights=weights))  # lists no shard: then remove them
                    for leftover in unlisted_shards(directory, ()):
                        (directory / leftover).unlink()
                    remove_parts(directory)
                except OSError as err:
                    raise StoreError(f"{directory}: cannot create the store ({err.strerror or err}).") from err
            store = cls(directory)
            store._lock = lock  # its writes (the weights record) happen under this lock
            store.check(compressor=compressor, original=original, fingerprint=fingerprint)
            if store.dtype != dtype:
                raise StoreError(f"{directory}: the store holds {store.dtype} gradients but this model gives {dtype}.")
            if weights is not None:
                check_resume(directory, store.manifest.weights, len(store), weights)
                store.record_weights(weights)
        except BaseException:
            lock.release()
            raise
        return store

    def check(self, *, compressor: Mapping[str, Any], original: Mapping[str, LayerShape], fingerprint: str) -> None:
        """Refuses a compressor or model that differs from the store's, naming what differs.

        Raises:
            StoreError: the compressor's configuration or a layer differs.
        """
        if dict(compressor) != self.compressor:
            raise StoreError(
                f"{self.path}: the store was logged with compressor {self.compressor}, not {dict(compressor)}; use "
                f"the same compressor (and seed) to resume or to score against it."
            )
        if fingerprint != self.fingerprint:
            for name, shape in original.items():
                if self.original.get(name) != shape:
                    raise StoreError(
                        f"{self.path}: layer '{name}' differs between the model and the store (the store was logged "
                        f"from another model or another selection of layers)."
                    )
            raise StoreError(
                f"{self.path}: the model's tracked layers differ from the store's ({list(self.original)})."
            )

    def check_weights(self, weights_hash: str) -> None:
        """Refuses a model at other weights than the gradients were taken at (:func:`hookinf.weights.check_scoring`)."""
        check_scoring(self.path, self.manifest.weights, weights_hash)

    def record_weights(self, weights: WeightsRecord) -> None:
        """Records in the manifest the weights the stored gradients were (last) taken at, under the writer lock.

        Written only when the weights' hash changes. A store that holds gradients but no record (written before
        records existed) keeps none: its gradients' weights are unknown.

        Raises:
            StoreError: the manifest cannot be written, or another writer holds the store.
        """
        recorded = self.manifest.weights
        if (recorded is not None and recorded.hash == weights.hash) or (recorded is None and self.shards):
            return  # the same weights (whichever logger recorded them), or unknown ones: nothing to write
        with self._writing():
            manifest = replace(self.manifest, weights=weights)
            try:
                _write_manifest(self.path, manifest)
            except OSError as err:
                raise StoreError(
                    f"{self.path}: cannot record the weights in {MANIFEST} ({err.strerror or err}); the store keeps "
                    f"the {len(self)} examples it holds."
                ) from err
            self._set(manifest)

    def close(self) -> None:
        """Releases the writer lock (idempotent); the store stays readable."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return sum(shard.count for shard in self.shards)

    @property
    def id_kind(self) -> IdKind | None:
        """``"int"`` or ``"str"``: the kind of ids the store holds (``None`` while it holds none)."""
        return self.manifest.ids

    @property
    def ids(self) -> Ids:
        """The id of every stored example, in storage order: ``int64 [n]``, or a list of ``n`` strings."""
        if self._ids is None:
            self._ids = concat([self._read_ids(shard) for shard in self.shards]) if self.shards else self._no_ids()
        return self._ids

    def _no_ids(self) -> Ids:
        return empty_ids(self.manifest.ids or "int")

    def chunks(self, devices: Mapping[str, torch.device] | None = None) -> Iterator[tuple[Ids, dict[str, Tensor]]]:
        """Yields ``(ids, {layer: [n_k, r_l]})`` shard by shard (memory-mapped reads).

        Args:
            devices: layer → the device its gradients are wanted on (that layer's device in the model); the ids stay
                on the host. When every layer wants one device, shards are read straight to it; ``None``: the host.
        """
        targets = set((devices or {}).values())
        direct = targets.pop() if len(targets) == 1 else torch.device("cpu")
        for shard in self.shards:
            tensors = self._read(shard, list(self.layers), direct)
            ids = self._read_ids(shard)
            if devices and len(set(devices.values())) > 1:  # a model split over devices: each layer to its own
                tensors = {name: tensor.to(devices.get(name, direct)) for name, tensor in tensors.items()}
            yield ids, tensors

    def _read_ids(self, shard: Shard) -> Ids:
        return read_ids(self.path, self.manifest, shard)

    def _read(self, shard: Shard, keys: Sequence[str], device: torch.device | None = None) -> dict[str, Tensor]:
        return read_tensors(self.path, shard, keys, device)

    def verify(self) -> StoreCheck:
        """Reads every listed shard in full: its SHA-256 (where recorded), tensors and ids, and no id twice.

        Opening the store checked only the shards' sizes and headers; this reads all their bytes.

        Returns:
            What was checked (:class:`~hookinf.store_format.StoreCheck`).

        Raises:
            StoreError: names the first shard that is damaged, or the id stored twice.
        """
        return verify_shards(self.path, self.manifest)

    # ------------------------------------------------------------------ writing
    def append(self, ids: Ids | Sequence[int] | Sequence[str], gradients: Mapping[str, Tensor]) -> None:
        """Writes one shard durably, then lists it in the manifest.

        A store opened by :meth:`create` writes under the lock it holds; one opened for reading takes the lock for
        this call (and re-reads the manifest under it).

        Args:
            ids: ``[n]`` ids, none already stored: integers or strings, of the kind the store already holds.
            gradients: layer → ``[n, r_l]``.

        Raises:
            StoreError: an id repeats or is stored already, the ids are of the other kind, a shape does not match,
                another writer holds the store, or the write failed (chained from the ``OSError``; the store keeps
                what it held before).
        """
        ids = as_ids(ids, "GradientStore.append(ids)")
        values = id_values(ids)
        if not values:
            return
        if len(set(values)) != len(values):
            raise StoreError(f"{self.path}: duplicate ids within one shard; every example must have its own id.")
        for name, shape in self.layers.items():
            tensor = gradients[name]
            if tuple(tensor.shape) != (len(values), shape.dim):
                raise StoreError(
                    f"layer '{name}': {list(tensor.shape)} does not match [{len(values)}, {shape.dim}] for this store."
                )
        with self._writing():
            kind = id_kind(ids)
            if self.manifest.ids not in (None, kind):
                raise StoreError(
                    f"{self.path}: the store holds {self.manifest.ids} ids and these are {kind} ids; a store holds "
                    f"one kind of id (convert them, or log into another store)."
                )
            clash = self._stored_already(ids)
            if clash is not None:
                raise StoreError(f"{self.path}: id {clash!r} is already stored; ids must be unique across the store.")
            self._write_shard(ids, kind, gradients)

    def _stored_already(self, ids: Ids) -> int | str | None:
        """The first of ``ids`` that the store holds already, or ``None``."""
        stored = self.ids
        if isinstance(ids, Tensor) and isinstance(stored, Tensor):
            clash = torch.isin(ids, stored)
            return int(ids[clash][0]) if bool(clash.any()) else None
        known = set(id_values(stored))
        return next((value for value in id_values(ids) if value in known), None)

    def _write_shard(self, ids: Ids, kind: IdKind, gradients: Mapping[str, Tensor]) -> None:
        file = next_shard_name(self.path, self.shards)
        tensors = {name: gradients[name].detach().to(self.dtype).contiguous().cpu() for name in self.layers}
        if isinstance(ids, Tensor):
            tensors[INT_IDS] = ids.contiguous()
        else:
            tensors[STR_IDS] = strings_to_tensor(ids)
        try:
            digest = write_safetensors(self.path / file, tensors)
        except OSError as err:
            raise StoreError(
                f"{self.path}: cannot write shard {file} ({err.strerror or err}); the store keeps the {len(self)} "
                f"examples stored before. Fix the cause (e.g. free disk space) and log again to resume."
            ) from err
        manifest = self.manifest.with_shard(Shard(file, id_count(ids), digest.size, digest.sha256), kind)
        try:
            _write_manifest(self.path, manifest)
        except OSError as err:
            with contextlib.suppress(StoreError):  # the rename may have happened: believe the disk
                self._load()
            raise StoreError(
                f"{self.path}: cannot update {MANIFEST} to list shard {file} ({err.strerror or err}); the store keeps "
                f"the {len(self)} examples stored before. Fix the cause (e.g. free disk space) and log again to resume."
            ) from err
        old = self.ids
        self._set(manifest)
        self._ids = concat([old, ids])

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Holds the writer lock for the block: the store's own, or one taken for it (re-reading the manifest)."""
        if self._lock is not None and self._lock.held:
            yield
            return
        lock = WriterLock.acquire(self.path)
        try:
            _clean(self.path)
            self._load()
            yield
        finally:
            lock.release()

    def __repr__(self) -> str:
        """One short line: the path, the counts, the compressor's kind and a few layers (first two, last one)."""
        return store_repr(self.path, len(self), len(self.shards), self.compressor, self.layers)


def _clean(directory: Path) -> None:
    """Removes what killed writers left (temporary files); under the writer lock."""
    try:
        remove_temporaries(directory, (MANIFEST, "shard-"))
    except OSError as err:
        raise StoreError(f"{directory}: cannot remove leftover temporary files ({err.strerror or err}).") from err


def _write_manifest(directory: Path, manifest: StoreManifest) -> None:
    """Writes the manifest atomically.

    Raises:
        OSError: the write failed.
    """
    write_json(directory / MANIFEST, manifest.to_json())
