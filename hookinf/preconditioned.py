"""Training-side preconditioning, once: a store of ``(G_l + λ_l I)⁻¹ g_l(z)`` for every stored example.

The influence of a training example ``z`` on a query ``z_q`` is ``−Σ_l g_l(z_q)ᵀ (G_l + λ_l I)⁻¹ g_l(z)``; the
damped block is symmetric, so the inverse may be applied to either side. :func:`precondition_store` applies it to
every gradient of a :class:`~hookinf.GradientStore` once (any fitted :class:`~hookinf.Curvature`: exact blocks,
K-FAC, EK-FAC) and writes the results, with the same ids, to a :class:`PreconditionedStore`. Scoring any number of
query sets against it is then a plain inner product with the raw query gradients (:func:`hookinf.top_k`, or the
FAISS index of :mod:`hookinf.faiss_index`): the curvature is never touched again.

A preconditioned store is a directory: ``gradients/`` (a gradient store of the preconditioned gradients, in the
source store's compressed space, recording the same compressor, model and weights) and ``manifest.json``, written
last, which names the curvature by a hash of its statistics (:func:`curvature_hash`), its method, damping and
``λ_l``. A run killed before the end leaves no manifest, and the directory is refused until it is written again.
Opening the directory as a plain :class:`~hookinf.GradientStore` is refused too (its manifest is of another
format), so preconditioned gradients are never preconditioned a second time by :func:`hookinf.influence`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hookinf.compress import from_config
from hookinf.curvature import Curvature
from hookinf.errors import StoreError
from hookinf.ids import Ids
from hookinf.io import seal, tensor_bytes, write_json
from hookinf.progress import PassProgress
from hookinf.shapes import LayerShape
from hookinf.store import GradientStore

FORMAT = "hookinf.preconditioned-store"
MANIFEST = "manifest.json"
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
    """

    method: str
    curvature: str
    damping: dict[str, float | None]
    lambdas: dict[str, float]
    examples: int
    source: str

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
        }
        return {**fields, "config_sha256": seal(fields)}

    @classmethod
    def parse(cls, data: Any) -> PreconditionedRecord:
        """Parses and checks the manifest's JSON form.

        Raises:
            ValueError: another format, a newer version, or an edit against its checksum.
            KeyError: a field is missing.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format') if isinstance(data, dict) else data!r}, not {FORMAT!r}")
        if data.get("version") != 1:
            raise ValueError(f"version {data.get('version')!r} is not one this hookinf reads (1): upgrade hookinf")
        fields = {key: value for key, value in data.items() if key != "config_sha256"}
        if data.get("config_sha256") != seal(fields):
            raise ValueError("the manifest does not match its checksum config_sha256: it was edited or damaged")
        lambdas = {str(name): float(value) for name, value in data["lambdas"].items()}
        return cls(
            str(data["method"]), str(data["curvature"]), dict(data["damping"]), lambdas, int(data["examples"]),
            str(data["source"]),
        )  # fmt: skip


class PreconditionedStore:
    """A directory of preconditioned training gradients ``(G_l + λ_l I)⁻¹ g_l(z)`` (see the module docstring).

    Open one with ``PreconditionedStore(path)``; :func:`precondition_store` writes one.

    Attributes:
        path: the directory.
        record: what the manifest records (:class:`PreconditionedRecord`).
        gradients: the gradient store of the preconditioned gradients (``path/gradients``).

    Raises:
        StoreError: no preconditioned store at ``path`` (or an unfinished one), or a damaged one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise StoreError(
                f"{self.path}: no preconditioned store here (missing {MANIFEST}; a precondition_store that did not "
                f"finish leaves none). Run hookinf.precondition_store(store, curvature, path) again."
            )
        try:
            self.record = PreconditionedRecord.parse(json.loads(manifest.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StoreError(
                f"{manifest}: corrupt preconditioned store manifest ({type(err).__name__}: {err})."
            ) from err
        self.gradients = GradientStore(self.path / GRADIENTS)
        if len(self.gradients) != self.record.examples:
            raise StoreError(
                f"{self.path}: the manifest records {self.record.examples} examples but {GRADIENTS}/ holds "
                f"{len(self.gradients)}; run hookinf.precondition_store again."
            )

    @property
    def layers(self) -> dict[str, LayerShape]:
        """Layer → compressed shape, in model order."""
        return self.gradients.layers

    @property
    def compressor(self) -> dict[str, Any]:
        """The compressor's configuration (the source store's)."""
        return self.gradients.compressor

    @property
    def ids(self) -> Ids:
        """The id of every stored example, in storage order."""
        return self.gradients.ids

    def __len__(self) -> int:
        return len(self.gradients)

    def chunks(self, devices: Mapping[str, torch.device] | None = None) -> Iterator[tuple[Ids, dict[str, Tensor]]]:
        """Yields ``(ids, {layer: [n_k, r_l]})`` of preconditioned gradients shard by shard."""
        return self.gradients.chunks(devices)

    def check_curvature(self, curvature: Curvature) -> None:
        """Refuses a curvature other than the one the store was preconditioned with.

        Raises:
            StoreError: the curvature's hash differs from the recorded one.
        """
        if curvature_hash(curvature) != self.record.curvature:
            raise StoreError(
                f"{self.path}: the store was preconditioned with another curvature ({self.record.method}, hash "
                f"{self.record.curvature}) than the one given ({curvature.method}, hash {curvature_hash(curvature)}); "
                f"leave method= out to use the store's own, or precondition the store again with this curvature."
            )

    def __repr__(self) -> str:
        return (
            f"PreconditionedStore({str(self.path)!r}, {len(self):,} examples, {self.record.method} curvature "
            f"{self.record.curvature}, {len(self.layers)} layers)"
        )


def precondition_store(
    store: GradientStore,
    curvature: Curvature,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PreconditionedStore:
    """Writes ``(G_l + λ_l I)⁻¹ g_l(z)`` of every example of ``store`` to a new :class:`PreconditionedStore`.

    One pass over the store, shard by shard (memory: one shard). The curvature must have been fitted in the store's
    compressed space (``hookinf.fit(..., compress=<the store's compressor>)``).

    Args:
        store: the gradient store.
        curvature: a fitted curvature (its own damping is applied).
        path: the new store's directory (not the source's).
        dtype: the stored dtype; default the curvature's compute dtype (float64, or float32 for Kronecker
            curvatures of float32 models).
        overwrite: replace a preconditioned store already at ``path``.
        progress: show a progress bar.

    Returns:
        The :class:`PreconditionedStore`; pass it as ``train`` to :func:`hookinf.top_k`.

    Raises:
        StoreError: ``path`` holds a preconditioned store already (without ``overwrite``), is the source store, or
            cannot be written.
        CompressorMismatchError: the curvature was fitted in another compressed space.
        CurvatureError: the curvature was fitted on other layers.
    """
    directory = Path(path)
    if directory.resolve() == store.path.resolve():
        raise StoreError(f"{directory}: write the preconditioned store to another directory than its source store.")
    if (directory / MANIFEST).exists() and not overwrite:
        raise StoreError(f"{directory}: a preconditioned store is there already; pass overwrite=True to replace it.")
    curvature.check_compressor(from_config(store.compressor), "the curvature")
    curvature.check_compatible(store.layers)
    out = dtype or reduce(torch.promote_types, [curvature.compute_dtype(name) for name in store.layers])
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)  # the store is incomplete until the manifest is written again
    except OSError as err:
        raise StoreError(f"{directory}: cannot write the preconditioned store ({err.strerror or err}).") from err
    inner = GradientStore.create(
        directory / GRADIENTS,
        compressor=store.compressor,
        layers=store.layers,
        original=store.original,
        dtype=out,
        fingerprint=store.fingerprint,
        weights=store.manifest.weights,
        overwrite=True,
    )
    with inner, PassProgress("precondition store", len(store.shards), enabled=progress) as bar:
        for ids, gradients in store.chunks():
            preconditioned = {}
            for name, shape in store.layers.items():
                flat = gradients[name]
                matrices = flat.reshape(-1, shape.out_features, shape.in_features)
                preconditioned[name] = curvature.apply(name, matrices).reshape(flat.shape[0], -1).to(out)
            inner.append(ids, preconditioned)
            bar.advance(int(flat.shape[0]))
    damping = {"relative": curvature.damping.relative, "absolute": curvature.damping.absolute}
    record = PreconditionedRecord(
        curvature.method, curvature_hash(curvature), damping, curvature.lambdas, len(inner), str(store.path)
    )
    try:
        write_json(directory / MANIFEST, record.to_json())
    except OSError as err:
        raise StoreError(f"{directory}: cannot write {MANIFEST} ({err.strerror or err}).") from err
    return PreconditionedStore(directory)
