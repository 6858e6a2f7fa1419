"""Logging compressed per-example gradients into a :class:`~hookinf.store.GradientStore`.

:class:`GradientLogger` is a :class:`~hookinf.pipeline.Consumer`: it takes already compressed steps carrying their
examples' ids (from :func:`hookinf.log`'s own loop, a :func:`hookinf.watch` around the user's loop, or the Trainer
callback), buffers them and flushes a shard every ``flush_every`` examples — so an interruption loses at most the
examples since the last flush.

The store is opened (created, or resumed) on first use — when the watch is entered, or when :func:`hookinf.log`
asks which ids are stored — not when the logger is built, and it holds the store's writer lock until
:meth:`GradientLogger.close`. A write that fails in the background writer thread is raised, as the
:class:`~hookinf.errors.StoreError` naming the store and chained from the ``OSError``, at the next flush or at
close; close always releases the lock and stops the thread, so the store resumes in the same process.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookinf.capture import FiniteCheck, Step
from hookinf.compress import BoundCompressor
from hookinf.errors import CaptureError, ConfigurationError, DataError, HookinfWarning, StoreError
from hookinf.ids import IdKind, Ids, as_ids, concat, id_kind, id_values, take
from hookinf.shapes import fingerprint
from hookinf.store import GradientStore
from hookinf.transfer import HostCopier, HostCopy
from hookinf.weights import WeightsRecord, check_resume, weights_hash

IdsFn = Callable[[Any], Sequence[int] | Sequence[str] | Tensor]
"""``ids(batch)`` → the ids of the batch's examples (integers or strings)."""


class GradientLogger:
    """Appends compressed steps to a store in shards (a :class:`~hookinf.pipeline.Consumer`).

    Args:
        path: the store's directory (created, or resumed when it holds a compatible store, on first use).
        bound: the compressor bound to the tracked layers; the steps it consumes are in its compressed space, and
            its configuration, seed and the layers' original shapes are recorded in the store.
        params: the tracked parameters: their dtype is the stored dtype, and their values identify the weights the
            gradients are taken at (:func:`hookinf.weights.weights_hash`, recorded in the store when it is opened
            and again when it is closed, so a store logged during training records the weights it ended at).
        flush_every: write a shard whenever this many examples are buffered.
        overwrite: replace the store at ``path`` the first time it is opened (not when this logger reopens it).
        run: the token recorded with the weights (:class:`~hookinf.weights.WeightsRecord`); the ranks of one
            distributed run share rank 0's. Default: a fresh one.
        whole: the store ``path`` is a part of (one rank's part, :mod:`hookinf.store_parts`): ids stored anywhere
            in it are skipped, and its weights are checked before resuming. ``None``: ``path`` is the whole store.

    Attributes:
        closed: whether the store is closed (also before its first use); :meth:`reopen` opens it.
        held: examples buffered and not yet handed to the writer.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        bound: BoundCompressor,
        params: Sequence[Tensor],
        flush_every: int = 4096,
        *,
        overwrite: bool = False,
        run: str | None = None,
        whole: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ConfigurationError(f"flush_every={flush_every!r} must be a positive integer.")
        self.path = path
        self.bound = bound
        self.params = list(params)
        self.dtype = model_dtype(self.params)
        self.flush_every = flush_every
        self._overwrite = overwrite
        self._run = run or uuid.uuid4().hex[:16]  # this logger may resume its own store after the weights moved
        self._whole = whole
        self._store: GradientStore | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: Future[None] | None = None
        self._error: BaseException | None = None  # a failed write: raised again until close
        self._stored: set[int | str] = set()
        self._logged: set[int | str] = set()
        self._kind: IdKind | None = None
        self._parts: list[_Part] = []
        self._copier = HostCopier()
        self.held = 0
        self.closed = True
        self._opened_by: str | None = None  # set once this logger opened the store: its reopenings say nothing

    def _weights(self) -> WeightsRecord:
        return WeightsRecord(weights_hash(self.params), self._run)

    def reopen(self) -> None:
        """Opens (or resumes) the store for writing, unless it is open: ids stored so far are skipped from now on.

        A store that another logger filled says so in a :class:`~hookinf.HookinfWarning` naming how many stored
        examples are skipped.

        Raises:
            StoreError: another writer holds the store, or it cannot be created or resumed (see
                :meth:`GradientStore.create`): another run's store, at other weights, is refused.
        """
        if not self.closed:
            return
        store = GradientStore.create(
            self.path,
            compressor=self.bound.compressor.config(),
            layers=self.bound.shapes,
            original=self.bound.original,
            dtype=self.dtype,
            fingerprint=fingerprint(self.bound.original),
            weights=self._weights(),
            overwrite=self._overwrite,
        )
        self._overwrite = False  # replaced once: reopening resumes what this logger wrote
        try:
            whole = store if self._whole is None else GradientStore(self._whole)
            check_resume(whole.path, whole.manifest.weights, len(whole), self._weights())
            self._stored = set(id_values(whole.ids))  # in the (whole) store when logging (re)started: skipped
        except BaseException:
            store.close()
            raise
        if self._stored and self._run != self._opened_by:
            warnings.warn(
                f"{self.path}: resuming a gradient store that holds {len(self._stored)} examples; their ids are "
                f"skipped (pass overwrite=True to log them again).",
                HookinfWarning,
                stacklevel=2,
            )
        self._opened_by = self._run
        self._store = store
        self._kind = store.id_kind  # the kind of id the store holds, once known
        self._logged = set()  # logged in this run: seeing one again is an error
        self._parts = []  # buffered steps, oldest first
        self.held = 0
        self._error = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hookinf-store")
        self._in_flight = None
        self.closed = False

    @property
    def store(self) -> GradientStore:
        """The store (opened — created when missing — and closed again if it was never used before)."""
        if self._store is None:
            self.reopen()
            self.close()
        assert self._store is not None
        return self._store

    def is_stored(self, example_id: int | str) -> bool:
        """Whether ``example_id`` was in the store when logging (re)started (so it is skipped)."""
        self._open()
        return example_id in self._stored

    def all_stored(self, ids: Ids) -> bool:
        """Whether every one of ``ids`` was in the store when logging (re)started (the batch can be skipped)."""
        self._open()
        return all(value in self._stored for value in id_values(ids))

    def consume(self, step: Step) -> None:
        """Buffers the examples of a compressed step whose ids (``step.ids``) are not stored yet.

        Raises:
            CaptureError: the step has no ids (the loop did not call ``w.tag(ids)`` before the batch's forward).
            StoreError: an id repeats within the batch or was already logged in this run, the ids are of another
                kind than the store's, or an earlier write failed.
        """
        self._open()
        if step.ids is None:
            raise CaptureError(
                "a batch was logged without ids: call w.tag(ids) with the batch's example ids before its forward "
                "(watch(log_to=...) stores every example under its id)."
            )
        ids: Ids = as_ids(step.ids, "the batch's ids")
        values: Sequence[int | str] = id_values(ids)  # python values: set look-ups without one tensor per element
        if len(set(values)) != len(values):
            raise StoreError(f"duplicate ids in one batch: {values}; every example needs its own id.")
        if self._kind not in (None, id_kind(ids)):
            raise StoreError(
                f"{self.path}: the store holds {self._kind} ids and this batch has {id_kind(ids)} ids ({values[:3]}); "
                f"a store holds one kind of id."
            )
        again = next((i for i in values if i in self._logged), None)
        if again is not None:
            raise StoreError(
                f"id {again!r} was already logged in this run: every example must have its own id, and a store holds "
                f"one gradient per example — log one epoch per store (or give distinct ids)."
            )
        keep = [i not in self._stored for i in values]
        if not any(keep):
            return
        everything = all(keep)
        fresh = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.int64, device="cpu")
        grads: dict[str, Tensor] = {}
        for name, capture in step.layers.items():
            flat = capture.gradients().flatten(1).detach()
            grads[name] = flat if everything else flat[fresh.to(flat.device)]
        self._kind = id_kind(ids)
        # enqueued to pinned host memory on a side stream now; the writer thread waits for the copy, not this one
        self._parts.append(_Part(ids if everything else take(ids, fresh), self._copier.copy(grads), step.finite))
        self._logged.update(i for i, k in zip(values, keep, strict=True) if k)
        self.held += sum(keep)
        if self.held >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Hands the buffered steps to the writer thread as one shard, never a step whose factors are not finite.

        The steps' :class:`~hookinf.capture.FiniteCheck` are read here (the watch has read all but the newest one
        step late already, so this is one read per shard). A non-finite step and the steps after it are dropped (the
        watch raises for it). Shards are written (and fsynced) in a background thread so the training step does not
        wait on the disk; at most one shard is in flight — a second flush waits for the first, which bounds memory.

        Raises:
            StoreError: a shard written earlier failed (this and every later call raise it until :meth:`close`).
        """
        self._raise_failed(wait=False)
        bad = next((i for i, part in enumerate(self._parts) if part.finite is not None and not part.finite.ok()), None)
        parts, self._parts, self.held = self._parts[:bad], [], 0
        if not parts or self._store is None or self._writer is None:
            return
        ids = concat([part.ids for part in parts])
        self._raise_failed(wait=True)
        self._in_flight = self._writer.submit(self._write, self._store, ids, [part.grads for part in parts])

    def _write(self, store: GradientStore, ids: Ids, copies: list[HostCopy]) -> None:
        """The writer thread: waits for the steps' host copies, joins them into one shard and appends it."""
        steps = [copy.wait() for copy in copies]
        store.append(ids, {name: torch.cat([grads[name] for grads in steps]) for name in self.bound.shapes})

    def close(self) -> None:
        """Flushes what is buffered, waits until every shard is durable and releases the store's lock.

        Closing a closed logger does nothing.

        Raises:
            StoreError: a write failed (the same error every time until the store is reopened); the lock is
                released and the writer thread stopped all the same.
        """
        if self.closed:
            return
        try:
            self.flush()
            self._raise_failed(wait=True)
            if self._store is not None:
                self._store.record_weights(self._weights())  # the weights logging ended at
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            self._settle()  # a shard still in flight when flush raised: keep its error
            self._parts, self.held = [], 0
            if self._store is not None:
                self._store.close()
            self.closed = True

    def _open(self) -> None:
        if self._error is not None:
            raise self._error
        if self.closed:
            self.reopen()

    def _settle(self) -> None:
        """Records the outcome of the shard in flight once it is done (its error, if it failed)."""
        future = self._in_flight
        if future is None or not future.done():
            return
        self._in_flight = None
        error = future.exception()
        if error is not None and self._error is None:
            self._error = error

    def _raise_failed(self, *, wait: bool) -> None:
        """Raises the error of a failed write (waiting for the shard in flight first when ``wait``)."""
        if wait and self._in_flight is not None:
            self._in_flight.exception()  # waits; the error is kept by _settle
        self._settle()
        if self._error is not None:
            raise self._error


@dataclass(frozen=True)
class _Part:
    """One buffered step: its new examples' ids (host), their compressed gradients and the step's finiteness."""

    ids: Ids
    grads: HostCopy  # the compressed gradients, on their way to the host
    finite: FiniteCheck | None


def batch_size(batch: Any) -> int:
    """The number of examples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise DataError(
                "the batch's first tensor is a scalar (0-d), so it has no batch dimension to count examples along: "
                "put the examples along the first dimension of the batch's first tensor, or pass ids=lambda batch: "
                "... returning the batch's example ids."
            )
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        for item in batch:
            if isinstance(item, Tensor | Mapping | list | tuple):
                return batch_size(item)
    raise DataError(
        f"cannot tell the number of examples in a batch of type {type(batch).__name__}; pass ids=lambda batch: ... "
        f"returning the batch's example ids."
    )


def batch_ids(batch: Any, ids: IdsFn | None, position: int) -> Ids:
    """The batch's ids: ``ids(batch)`` (integers or strings, checked), or positions ``position, position + 1, ...``.

    Raises:
        DataError: ``ids(batch)`` gave a non-integer float, a boolean, or strings mixed with numbers.
    """
    if ids is None:
        return torch.arange(position, position + batch_size(batch), dtype=torch.int64, device="cpu")
    return as_ids(ids(batch), "ids(batch)")


def model_dtype(params: Iterable[Tensor]) -> torch.dtype:
    """The dtype of the tracked parameters (the stored gradients keep it)."""
    for param in params:
        return param.dtype
    return torch.float32
