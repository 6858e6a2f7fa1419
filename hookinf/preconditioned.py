"""Training-side preconditioning, once: a store of ``(G_l + λ_l I)⁻¹ g_l(z)`` for every stored example.

The influence of a training example ``z`` on a query ``z_q`` is ``−Σ_l g_l(z_q)ᵀ (G_l + λ_l I)⁻¹ g_l(z)``; the
damped block is symmetric, so the inverse may be applied to either side. :func:`precondition_store` applies it to
every gradient of a :class:`~hookinf.GradientStore` once (any fitted :class:`~hookinf.Curvature`: exact blocks,
K-FAC, EK-FAC) and writes the results, with the same ids, to a :class:`PreconditionedStore`. Scoring any number of
query sets against it is then a plain inner product with the raw query gradients (:func:`hookinf.top_k`, or the
FAISS index of :mod:`hookinf.faiss_index`): the curvature is never touched again.

A preconditioned store is a directory (:mod:`hookinf.preconditioned_format`): ``gradients/`` (a gradient store of
the preconditioned gradients, in the source store's compressed space, recording the same compressor, model and
weights), ``run.json`` while a run writes it, and ``manifest.json``, written last, which names the curvature by a
hash of its statistics (:func:`curvature_hash`), its method, damping and ``λ_l``. A run killed before the end leaves
no manifest, and the directory is refused by :class:`PreconditionedStore` until a run finishes it. Opening the
directory as a plain :class:`~hookinf.GradientStore` is refused too (its manifest is of another format), so
preconditioned gradients are never preconditioned a second time by :func:`hookinf.influence`.

Resuming: source shard ``i`` becomes preconditioned shard ``i``, each a function of that shard and the curvature
alone. ``run.json`` records what the run computes (the curvature's hash, the dtype, the source store's identity); a
second call that would compute the same keeps the shards written so far and goes on from the next source shard, so
the result is bit-identical to an uninterrupted run. A call with another curvature, dtype or source is refused
unless ``overwrite=True`` (as :func:`hookinf.log` refuses another run's store), which starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hookinf.compress import from_config
from hookinf.curvature import Curvature
from hookinf.distributed import Group, announcing, resolve_ranks
from hookinf.errors import HookinfWarning, StoreError
from hookinf.ids import Ids, same_ids, take
from hookinf.io import fsync_directory, remove_temporaries, write_json
from hookinf.lock import WriterLock
from hookinf.preconditioned_format import (
    FORMAT,
    GRADIENTS,
    MANIFEST,
    RUN,
    PreconditionedRecord,
    RunRecord,
    StoreIdentity,
    curvature_hash,
)
from hookinf.progress import PassProgress
from hookinf.shapes import LayerShape
from hookinf.store import GradientStore
from hookinf.store_format import read_ids, read_tensors

__all__ = ["PreconditionedRecord", "PreconditionedStore", "curvature_hash", "precondition_store"]


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
                f"finish leaves none). Run hookinf.precondition_store(store, curvature, path) again: with the same "
                f"store and curvature it resumes where the last run stopped."
            )
        try:
            self.record = PreconditionedRecord.parse(json.loads(manifest.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StoreError(
                f"{manifest}: corrupt preconditioned store manifest ({type(err).__name__}: {err})."
            ) from err
        self.gradients = GradientStore(self.path / GRADIENTS)
        self._identity: StoreIdentity | None = None
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

    def identity(self) -> StoreIdentity:
        """The identity of the preconditioned gradients (rows, ids and shard checksums; see :class:`StoreIdentity`)."""
        if self._identity is None:
            self._identity = StoreIdentity.of(self.gradients)
        return self._identity

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
    group: Group = "auto",
) -> PreconditionedStore:
    """Writes ``(G_l + λ_l I)⁻¹ g_l(z)`` of every example of ``store`` to a :class:`PreconditionedStore`, resumably.

    One pass over the store, shard by shard (memory: one shard); each source shard becomes one shard of the new
    store. The curvature must have been fitted in the store's compressed space
    (``hookinf.fit(..., compress=<the store's compressor>)``). What ``path`` holds decides what happens:

    - nothing (or an empty directory): a new store is written;
    - the unfinished store of a run with the same curvature, dtype and source (one that was interrupted): it is
      resumed — the shards written are kept (a :class:`~hookinf.HookinfWarning` says how many rows) and the rest
      are written, bit-identical to an uninterrupted run;
    - the finished store of the same curvature, dtype and source: it is returned as it is;
    - anything else (another curvature, dtype or source, finished or not): refused, unless ``overwrite``.

    Args:
        store: the gradient store.
        curvature: a fitted curvature (its own damping is applied).
        path: the new store's directory (not the source's).
        dtype: the stored dtype; default the curvature's compute dtype (float64, or float32 for Kronecker
            curvatures of float32 models).
        overwrite: replace what ``path`` holds (finished or not) with a new store, written from the start.
        progress: show a progress bar.
        group: called on every rank of a process group (``"auto"``: the default one, when initialised with more
            than one rank), rank 0 writes the store while the others wait for it in a collective (the process
            group's timeout must cover the write; or precondition once in one process), then every rank opens it.

    Returns:
        The :class:`PreconditionedStore`; pass it as ``train`` to :func:`hookinf.top_k`.

    Raises:
        StoreError: ``path`` holds another run's store (without ``overwrite``; the message names what differs), is
            the source store, is being written by another process, or cannot be written.
        CompressorMismatchError: the curvature was fitted in another compressed space.
        CurvatureError: the curvature was fitted on other layers.
        DistributedError: across ranks, rank 0 failed (its own error is raised there) or a rank died.
    """
    ranks = resolve_ranks(group)
    with announcing(ranks, "writing the preconditioned store"):
        if ranks is None or ranks.rank == 0:
            _write(store, curvature, Path(path), dtype, overwrite, progress)
    return PreconditionedStore(path)


def _write(
    store: GradientStore, curvature: Curvature, directory: Path, dtype: torch.dtype | None, overwrite: bool,
    progress: bool,
) -> None:  # fmt: skip
    """:func:`precondition_store` in this process."""
    if directory.resolve() == store.path.resolve():
        raise StoreError(f"{directory}: write the preconditioned store to another directory than its source store.")
    curvature.check_compressor(from_config(store.compressor), "the curvature")
    curvature.check_compatible(store.layers)
    out = dtype or reduce(torch.promote_types, [curvature.compute_dtype(name) for name in store.layers])
    run = RunRecord(
        curvature_hash(curvature), curvature.method, str(out).removeprefix("torch."), StoreIdentity.of(store),
        str(store.path),
    )  # fmt: skip
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"{directory}: cannot create the preconditioned store ({err.strerror or err}).") from err
    _check_not_foreign(directory)
    lock = WriterLock.acquire(directory)  # one run at a time (another is refused, named); the kernel drops it on a kill
    try:
        with _writes(directory):
            remove_temporaries(directory, (MANIFEST, RUN))
        if not overwrite and _finished(directory, run):
            return
        resume = not overwrite and _resumable(directory, run)
        if not resume:  # gradients/ is emptied before run.json names the new run: run.json never names old rows
            _remove(directory, MANIFEST, RUN)
        inner = GradientStore.create(
            directory / GRADIENTS, compressor=store.compressor, layers=store.layers, original=store.original,
            dtype=out, fingerprint=store.fingerprint, weights=store.manifest.weights, overwrite=not resume,
        )  # fmt: skip
        with inner:
            if not resume:
                with _writes(directory):
                    write_json(directory / RUN, run.to_json())
            first = _written_shards(inner, store, directory)
            _precondition_shards(store, curvature, inner, first, out, progress)
        damping = {"relative": curvature.damping.relative, "absolute": curvature.damping.absolute}
        record = PreconditionedRecord(
            curvature.method, run.curvature, damping, curvature.lambdas, len(inner), str(store.path), run.origin
        )
        with _writes(directory):
            write_json(directory / MANIFEST, record.to_json())
        _remove(directory, RUN)
    finally:
        lock.release()


def _check_not_foreign(directory: Path) -> None:
    """Refuses, even with ``overwrite``, a directory whose manifest is of another kind (a gradient store, ...).

    Raises:
        StoreError: names the format found.
    """
    try:
        found = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return  # no manifest, or one too damaged to say what it was: overwrite=True may replace it
    if found != FORMAT:
        raise StoreError(
            f"{directory}: holds a {found!r}, not a preconditioned store, and overwrite=True replaces only a "
            f"preconditioned store. Write the preconditioned store to another directory."
        )


def _finished(directory: Path, run: RunRecord) -> bool:
    """Whether ``directory`` holds the finished store of ``run`` (``False``: no finished store there).

    Raises:
        StoreError: a finished store of another curvature, dtype or source, or a damaged one.
    """
    if not (directory / MANIFEST).is_file():
        return False
    try:
        existing = PreconditionedStore(directory)
    except StoreError as err:
        raise StoreError(f"{err} Pass overwrite=True to replace it.") from err
    recorded = existing.record.origin
    dtype = str(existing.gradients.dtype).removeprefix("torch.")
    if recorded is None:
        raise StoreError(
            f"{directory}: a preconditioned store is there already, written by an earlier hookinf that did not record "
            f"its source; pass overwrite=True to replace it."
        )
    done = RunRecord(existing.record.curvature, existing.record.method, dtype, recorded, existing.record.source)
    differences = done.differences(run)
    if differences:
        raise StoreError(
            f"{directory}: a preconditioned store of another run is there already ({'; '.join(differences)}). Pass "
            f"overwrite=True to replace it, or write to another path."
        )
    _remove(directory, RUN)  # a run killed between its manifest and this cleanup left it
    return True


def _resumable(directory: Path, run: RunRecord) -> bool:
    """Whether ``directory`` holds an unfinished store of ``run`` to resume (``False``: nothing to lose there).

    Raises:
        StoreError: an unfinished store of another run, or rows with no record of the run that wrote them.
    """
    if (directory / RUN).is_file():
        try:
            recorded = RunRecord.parse(json.loads((directory / RUN).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(
                f"{directory / RUN}: unreadable record of an unfinished run ({type(err).__name__}: {err}); pass "
                f"overwrite=True to start the preconditioned store afresh."
            ) from err
        differences = recorded.differences(run)
        if differences:
            raise StoreError(
                f"{directory}: holds the unfinished preconditioned store of another run ({'; '.join(differences)}); "
                f"resuming it would mix two curvatures or sources. Pass overwrite=True to replace it, or write to "
                f"another path."
            )
        return True
    try:
        rows = len(GradientStore(directory / GRADIENTS))
    except StoreError:
        return False  # no readable gradient store: nothing listed, nothing to keep
    if rows:
        raise StoreError(
            f"{directory}: holds {rows} preconditioned rows with no record ({RUN}) of the run that wrote them; pass "
            f"overwrite=True to replace them."
        )
    return False


def _written_shards(inner: GradientStore, store: GradientStore, directory: Path) -> int:
    """How many source shards ``inner`` holds already (the first ones), checked against the source's ids.

    Raises:
        StoreError: ``inner`` does not hold exactly the rows of the source's first shards.
    """
    if not len(inner):
        return 0
    rows, first = 0, 0
    while first < len(store.shards) and rows < len(inner):
        rows += store.shards[first].count
        first += 1
    if rows != len(inner) or not same_ids(inner.ids, take(store.ids, torch.arange(rows, device="cpu"))):
        raise StoreError(
            f"{directory}: its {len(inner)} preconditioned rows are not the first shards of {store.path}; pass "
            f"overwrite=True to start afresh."
        )
    if rows:
        warnings.warn(
            f"{directory}: resuming an unfinished preconditioned store: {rows} of {len(store)} rows were written "
            f"already and are kept (pass overwrite=True to write them again).",
            HookinfWarning,
            stacklevel=4,
        )
    return first


def _precondition_shards(
    store: GradientStore, curvature: Curvature, inner: GradientStore, first: int, out: torch.dtype, progress: bool
) -> None:
    """Appends ``(G_l + λ_l I)⁻¹ g_l`` of each source shard from ``first`` on to ``inner``, one shard per shard."""
    shards = store.shards[first:]
    with PassProgress("precondition store", len(shards), enabled=progress) as bar:
        for shard in shards:
            ids = read_ids(store.path, store.manifest, shard)
            gradients = read_tensors(store.path, shard, list(store.layers))
            preconditioned = {}
            for name, shape in store.layers.items():
                matrices = gradients[name].reshape(-1, shape.out_features, shape.in_features)
                preconditioned[name] = curvature.apply(name, matrices).reshape(shard.count, -1).to(out)
            inner.append(ids, preconditioned)
            bar.advance(shard.count)


@contextlib.contextmanager
def _writes(directory: Path) -> Iterator[None]:
    """Turns a failed write of the preconditioned store's own files into a :class:`StoreError` naming it."""
    try:
        yield
    except OSError as err:
        raise StoreError(f"{directory}: cannot write the preconditioned store ({err.strerror or err}).") from err


def _remove(directory: Path, *names: str) -> None:
    """Removes the preconditioned store's files ``names`` (those missing are fine), durably."""
    with _writes(directory):
        for name in names:
            (directory / name).unlink(missing_ok=True)
        fsync_directory(directory)
