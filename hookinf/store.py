"""``GradientStore``: compressed per-example gradients on disk, append-only and crash-safe.

Layout of a store directory::

    manifest.json            format, compressor config, layers (compressed and original shapes), dtype, model
                             fingerprint, and the list of shards with their example counts
    shard-000000.safetensors one tensor per layer ``[n, r_l]`` (the flattened compressed gradients) and
                             ``__ids__`` ``[n]`` (int64)

Durability: the manifest is written when logging starts; a shard is written to a temporary file, fsynced and
renamed, and only then is the manifest (also temp + rename) updated to list it. A run killed at any point leaves a
manifest that lists only whole shards; a shard file the manifest does not list is ignored and overwritten later.
Stores never see models: they hold tensors, ids and configuration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from hookinf.capture import LayerCapture, Step
from hookinf.errors import HookinfError
from hookinf.io import atomic_write
from hookinf.shapes import LayerShape

FORMAT = "hookinf.gradient-store"
VERSION = 1
_MANIFEST = "manifest.json"
_IDS = "__ids__"


class StoreError(HookinfError, RuntimeError):
    """A gradient store is missing, corrupt, or incompatible with the compressor, model or ids given."""


@dataclass(frozen=True)
class Shard:
    """One flushed shard: its file name and number of examples."""

    file: str
    count: int


class GradientStore:
    """A directory of compressed per-example gradients (see the module docstring).

    Open an existing store with ``GradientStore(path)``; :func:`hookinf.log` (or a watch with ``log_to=``) creates
    and fills one.

    Attributes:
        path: the directory.
        compressor: the compressor's configuration (``{"kind": "logra", "r_in": ..., ...}``).
        layers: layer → compressed shape, in model order.
        original: layer → uncompressed shape (identifies the model).
        dtype: the stored dtype.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest_path = self.path / _MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"{self.path}: no hookinf gradient store here (missing {_MANIFEST}).")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
            self.compressor: dict[str, Any] = dict(manifest["compressor"])
            self.layers = {n: LayerShape.from_json(s) for n, s in manifest["layers"].items()}
            self.original = {n: LayerShape.from_json(s) for n, s in manifest["original"].items()}
            dtype = getattr(torch, str(manifest["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"dtype {manifest['dtype']!r} is not a torch dtype")
            self.dtype: torch.dtype = dtype
            self.fingerprint = str(manifest["fingerprint"])
            self.shards = [Shard(str(s["file"]), int(s["count"])) for s in manifest["shards"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StoreError(f"{self.path}: corrupt gradient store manifest ({type(err).__name__}: {err}).") from err
        self._ids: Tensor | None = None

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
    ) -> GradientStore:
        """Creates an empty store (or opens a compatible existing one, to resume).

        Raises:
            StoreError: ``path`` holds a store with another compressor, model or dtype.
        """
        directory = Path(path)
        if (directory / _MANIFEST).is_file():
            store = cls(directory)
            store.check(compressor=compressor, original=original, fingerprint=fingerprint)
            if store.dtype != dtype:
                raise StoreError(f"{directory}: the store holds {store.dtype} gradients but this model gives {dtype}.")
            return store
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "compressor": dict(compressor),
            "layers": {n: s.to_json() for n, s in layers.items()},
            "original": {n: s.to_json() for n, s in original.items()},
            "dtype": str(dtype).removeprefix("torch."),
            "fingerprint": fingerprint,
            "shards": [],
        }
        _write_manifest(directory, manifest)
        return cls(directory)

    def check(self, *, compressor: Mapping[str, Any], original: Mapping[str, LayerShape], fingerprint: str) -> None:
        """Refuses a compressor or model that differs from the store's, naming what differs."""
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

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return sum(shard.count for shard in self.shards)

    @property
    def ids(self) -> Tensor:
        """``[n]`` int64: the id of every stored example, in storage order."""
        if self._ids is None:
            parts = [self._read(shard, [_IDS])[_IDS] for shard in self.shards]
            self._ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device="cpu")
        return self._ids

    def chunks(self, devices: Mapping[str, torch.device] | None = None) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Yields ``(ids [n_k], {layer: [n_k, r_l]})`` shard by shard (memory-mapped reads).

        Args:
            devices: layer → the device its gradients are wanted on (that layer's device in the model); the ids stay
                on the host. When every layer wants one device, shards are read straight to it; ``None``: the host.
        """
        targets = set((devices or {}).values())
        direct = targets.pop() if len(targets) == 1 else torch.device("cpu")
        for shard in self.shards:
            tensors = self._read(shard, list(self.layers), direct)
            ids = self._read(shard, [_IDS], torch.device("cpu"))[_IDS]
            if devices and len(set(devices.values())) > 1:  # a model split over devices: each layer to its own
                tensors = {name: tensor.to(devices.get(name, direct)) for name, tensor in tensors.items()}
            yield ids, tensors

    def _read(self, shard: Shard, keys: Sequence[str], device: torch.device | None = None) -> dict[str, Tensor]:
        where = "cpu" if device is None else str(device)
        try:
            with safe_open(str(self.path / shard.file), framework="pt", device=where) as handle:
                return {key: handle.get_tensor(key) for key in keys}
        except (OSError, SafetensorError) as err:
            raise StoreError(f"{self.path / shard.file}: unreadable shard ({err}).") from err

    # ------------------------------------------------------------------ writing
    def append(self, ids: Tensor, gradients: Mapping[str, Tensor]) -> None:
        """Writes one shard durably, then lists it in the manifest.

        Args:
            ids: ``[n]`` int64 ids, none already stored.
            gradients: layer → ``[n, r_l]``.
        """
        ids = ids.to(device="cpu", dtype=torch.int64).reshape(-1)  # host-side bookkeeping
        if ids.numel() == 0:
            return
        if torch.unique(ids).numel() != ids.numel():
            raise StoreError(f"{self.path}: duplicate ids within one shard; every example must have its own id.")
        clash = torch.isin(ids, self.ids)
        if bool(clash.any()):
            raise StoreError(
                f"{self.path}: id {int(ids[clash][0])} is already stored; ids must be unique across the store."
            )
        for name, shape in self.layers.items():
            tensor = gradients[name]
            if tuple(tensor.shape) != (ids.numel(), shape.dim):
                raise StoreError(
                    f"layer '{name}': {list(tensor.shape)} does not match [{ids.numel()}, {shape.dim}] for this store."
                )
        index = len(self.shards)
        file = f"shard-{index:06d}.safetensors"
        tensors = {name: gradients[name].detach().to(self.dtype).contiguous().cpu() for name in self.layers}
        tensors[_IDS] = ids.contiguous()
        atomic_write(self.path / file, lambda tmp: save_file(tensors, str(tmp)))
        self.shards.append(Shard(file, ids.numel()))
        manifest = json.loads((self.path / _MANIFEST).read_text(encoding="utf-8"))
        manifest["shards"] = [{"file": s.file, "count": s.count} for s in self.shards]
        _write_manifest(self.path, manifest)
        self._ids = torch.cat([self.ids, ids])

    def __repr__(self) -> str:
        kind = self.compressor.get("kind", "?")
        dims = ", ".join(f"{n}: {s.dim}" for n, s in self.layers.items())
        return f"GradientStore({str(self.path)!r}, {len(self)} examples, {len(self.shards)} shards, {kind}; {dims})"


def _write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(manifest, indent=2)
    atomic_write(directory / _MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def store_step(index: int, gradients: Mapping[str, Tensor], layers: Mapping[str, LayerShape]) -> Step:
    """Stored gradients ``{layer: [n, O'·I']}`` as a :class:`Step` whose captures reproduce them exactly.

    Each ``[O', I']`` gradient ``g`` is written in the canonical form with ``S = I'`` positions: ``a_s = e_s``
    (identity rows, an expanded view: no memory) and ``δ_s = g[:, s]``, so ``Σ_s δ_s a_sᵀ = g``. Every method that
    consumes per-example gradients (and the scoring) then reads stored gradients like captured ones.
    """
    captures: dict[str, LayerCapture] = {}
    batch = 0
    for name, shape in layers.items():
        flat = gradients[name]
        batch = int(flat.shape[0])
        matrices = flat.reshape(batch, shape.out_features, shape.in_features)
        eye = torch.eye(shape.in_features, dtype=flat.dtype, device=flat.device).expand(batch, -1, -1)
        captures[name] = LayerCapture(name=name, a=eye, delta=matrices.transpose(1, 2), adapter=None)
    return Step(index=index, batch_size=batch, layers=captures)
