"""Logging compressed per-example gradients into a :class:`~hookinf.store.GradientStore`.

:class:`GradientLogger` is a :class:`~hookinf.pipeline.Consumer`: it takes already compressed steps carrying their
examples' ids (from :func:`hookinf.log`'s own loop, a :func:`hookinf.watch` around the user's loop, or the Trainer
callback), buffers them and flushes a shard every ``flush_every`` examples — so an interruption loses at most the
examples since the last flush.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookinf.capture import FiniteCheck, Step
from hookinf.compress import BoundCompressor
from hookinf.errors import CaptureError, ConfigurationError, DataError
from hookinf.shapes import fingerprint
from hookinf.store import GradientStore, StoreError

IdsFn = Callable[[Any], Sequence[int] | Tensor]
"""``ids(batch)`` → the ids of the batch's examples."""


class GradientLogger:
    """Appends compressed steps to a store in shards (a :class:`~hookinf.pipeline.Consumer`).

    Args:
        path: the store's directory (created, or resumed when it holds a compatible store).
        bound: the compressor bound to the tracked layers; the steps it consumes are in its compressed space, and
            its configuration, seed and the layers' original shapes are recorded in the store.
        dtype: the dtype gradients are stored in.
        flush_every: write a shard whenever this many examples are buffered.
    """

    def __init__(
        self, path: str | os.PathLike[str], bound: BoundCompressor, dtype: torch.dtype, flush_every: int = 4096
    ) -> None:
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ConfigurationError(f"flush_every={flush_every!r} must be a positive integer.")
        self.path = path
        self.bound = bound
        self.dtype = dtype
        self.flush_every = flush_every
        self.reopen()

    def reopen(self) -> None:
        """Opens (or resumes) the store: ids stored so far are skipped from now on."""
        self.store = GradientStore.create(
            self.path,
            compressor=self.bound.compressor.config(),
            layers=self.bound.shapes,
            original=self.bound.original,
            dtype=self.dtype,
            fingerprint=fingerprint(self.bound.original),
        )
        self._stored = set(self.store.ids.tolist())  # already in the store when logging (re)started: skipped
        self._logged: set[int] = set()  # logged in this run: seeing one again is an error
        self._parts: list[_Part] = []  # buffered steps, oldest first
        self.held = 0  # examples buffered and not yet handed to the writer
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hookinf-store")
        self._in_flight: Future[None] | None = None
        self.closed = False

    def is_stored(self, example_id: int) -> bool:
        """Whether ``example_id`` was in the store when logging (re)started (so it is skipped)."""
        return example_id in self._stored

    def consume(self, step: Step) -> None:
        """Buffers the examples of a compressed step whose ids (``step.ids``) are not stored yet.

        Raises:
            CaptureError: the step has no ids (the loop did not call ``w.tag(ids)`` before the batch's forward).
            StoreError: an id repeats within the batch or was already logged in this run.
        """
        ids = step.ids
        if ids is None:
            raise CaptureError(
                "a batch was logged without ids: call w.tag(ids) with the batch's example ids before its forward "
                "(watch(log_to=...) stores every example under its id)."
            )
        values = ids.tolist()  # python ints: set look-ups without one tensor per element
        if len(set(values)) != len(values):
            raise StoreError(f"duplicate ids in one batch: {values}; every example needs its own id.")
        again = next((i for i in values if i in self._logged), None)
        if again is not None:
            raise StoreError(
                f"id {again} was already logged in this run: every example must have its own id, and a store holds "
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
        self._parts.append(_Part(ids if everything else ids[fresh], grads, step.finite))
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
        """
        self._raise_writer_error()
        bad = next((i for i, part in enumerate(self._parts) if part.finite is not None and not part.finite.ok()), None)
        parts, self._parts, self.held = self._parts[:bad], [], 0
        if not parts:
            return
        ids = torch.cat([part.ids for part in parts])
        grads = {name: torch.cat([part.grads[name] for part in parts]) for name in self.bound.shapes}
        if self._in_flight is not None:
            self._in_flight.result()
        self._in_flight = self._writer.submit(self.store.append, ids, grads)

    def close(self) -> None:
        """Flushes what is buffered and waits until every shard is durable; re-raises a failed write."""
        try:
            self.flush()
            if self._in_flight is not None:
                self._in_flight.result()
                self._in_flight = None
        finally:
            self._writer.shutdown(wait=True)
            self.closed = True

    def _raise_writer_error(self) -> None:
        if self._in_flight is not None and self._in_flight.done():
            self._in_flight.result()  # re-raises an exception of the writer thread here
            self._in_flight = None


@dataclass(frozen=True)
class _Part:
    """One buffered step: its new examples' ids (host), their compressed gradients and the step's finiteness."""

    ids: Tensor
    grads: dict[str, Tensor]
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


def batch_ids(batch: Any, ids: IdsFn | None, position: int) -> Tensor:
    """The batch's ids: ``ids(batch)``, or positions ``position, position + 1, ...``."""
    if ids is None:
        return torch.arange(position, position + batch_size(batch), dtype=torch.int64, device="cpu")
    out = torch.as_tensor(ids(batch), dtype=torch.int64, device="cpu").reshape(-1)
    return out


def model_dtype(params: Iterable[Tensor]) -> torch.dtype:
    """The dtype of the tracked parameters (the stored gradients keep it)."""
    for param in params:
        return param.dtype
    return torch.float32
