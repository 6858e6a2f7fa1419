"""Logging compressed per-example gradients into a :class:`~hookinf.store.GradientStore`.

:class:`GradientLogger` consumes captured steps (from :func:`log`'s own loop, or from a :func:`hookinf.watch`
around the user's loop), compresses them with a bound compressor, buffers them and flushes a shard every
``flush_every`` examples — so an interruption loses at most the examples since the last flush.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from hookinf.capture import Step
from hookinf.compress import BoundCompressor, Compressor, require_compressor
from hookinf.curvature import LayerShape, fingerprint
from hookinf.errors import ConfigurationError, DataError
from hookinf.passes import DataPasses, LossFn, eval_mode
from hookinf.progress import PassProgress
from hookinf.store import GradientStore, StoreError
from hookinf.watch import ModuleSpec, Watch

IdsFn = Callable[[Any], Sequence[int] | Tensor]
"""``ids(batch)`` → the ids of the batch's examples."""


class GradientLogger:
    """Compresses steps and appends them to a store in shards.

    Args:
        path: the store's directory (created, or resumed when it holds a compatible store).
        compress: the compressor (its configuration and seed are recorded in the store).
        shapes: the tracked layers' (uncompressed) shapes, in model order.
        dtype: the dtype gradients are stored in.
        flush_every: write a shard whenever this many examples are buffered.
        bound: ``compress`` already bound to ``shapes`` (a watch shares its own), else it is bound here.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        compress: Compressor,
        shapes: Mapping[str, LayerShape],
        dtype: torch.dtype,
        flush_every: int = 4096,
        bound: BoundCompressor | None = None,
    ) -> None:
        if compress is None:
            raise ConfigurationError("a gradient store needs compress= (e.g. hookinf.LoGra(16, 16)).")
        require_compressor(compress)
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ConfigurationError(f"flush_every={flush_every!r} must be a positive integer.")
        self.bound: BoundCompressor = bound if bound is not None else compress.bind(shapes)
        self.store = GradientStore.create(
            path,
            compressor=compress.config(),
            layers=self.bound.shapes,
            original=shapes,
            dtype=dtype,
            fingerprint=fingerprint(shapes),
        )
        self.flush_every = flush_every
        self._stored = set(self.store.ids.tolist())  # already in the store when logging (re)started: skipped
        self._logged: set[int] = set()  # logged in this run: seeing one again is an error
        self._ids: list[Tensor] = []
        self._grads: dict[str, list[Tensor]] = {name: [] for name in shapes}
        self._held = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hookinf-store")
        self._in_flight: Future[None] | None = None
        self.closed = False

    def is_stored(self, example_id: int) -> bool:
        """Whether ``example_id`` was in the store when logging (re)started (so it is skipped)."""
        return example_id in self._stored

    def add(self, ids: Tensor, step: Step, compressed: Step | None = None) -> None:
        """Compresses ``step`` (unless given ``compressed``) and buffers the examples whose ids are not stored yet."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if ids.numel() != step.batch_size:
            raise DataError(f"{ids.numel()} ids were given for a batch of {step.batch_size} examples.")
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
        if compressed is None:
            compressed = self.bound.compress(step)
        everything = all(keep)
        fresh = torch.tensor(keep, dtype=torch.bool)
        for name, capture in compressed.layers.items():
            flat = capture.gradients().flatten(1).detach()
            self._grads[name].append(flat if everything else flat[fresh])
        self._ids.append(ids if everything else ids[fresh])
        self._logged.update(i for i, k in zip(values, keep, strict=True) if k)
        self._held += sum(keep)
        if self._held >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Hands the buffered examples to the writer thread as one shard (nothing when the buffer is empty).

        Shards are written (and fsynced) in a background thread so the training step does not wait on the disk;
        at most one shard is in flight — a second flush waits for the first, which bounds memory.
        """
        self._raise_writer_error()
        if not self._held:
            return
        ids = torch.cat(self._ids)
        grads = {name: torch.cat(parts) for name, parts in self._grads.items()}
        self._ids, self._grads, self._held = [], {name: [] for name in self._grads}, 0
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


def batch_size(batch: Any) -> int:
    """The number of examples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, Tensor):
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
        return torch.arange(position, position + batch_size(batch), dtype=torch.int64)
    out = torch.as_tensor(ids(batch), dtype=torch.int64).reshape(-1)
    return out


def model_dtype(modules: Iterable[nn.Module]) -> torch.dtype:
    """The dtype of the tracked parameters (the stored gradients keep it)."""
    for module in modules:
        for param in module.parameters(recurse=False):
            return param.dtype
    return torch.float32


def log(
    model: nn.Module,
    train: Iterable[Any],
    loss_fn: LossFn,
    *,
    compress: Compressor,
    path: str | os.PathLike[str],
    ids: IdsFn | None = None,
    modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
    flush_every: int = 4096,
    progress: bool = True,
) -> GradientStore:
    """Logs every training example's compressed gradient into a store at ``path`` (resuming a partial one).

    Args:
        model: the model (left unchanged; run in eval mode).
        train: batches of training examples (iterated once; a generator is fine).
        loss_fn: ``loss_fn(model, batch)`` returning per-example losses ``[B]`` or their sum.
        compress: the compressor (``hookinf.LoGra(16, 16)``, ``hookinf.Dropout(r=...)``, ``hookinf.Gaussian(r)``).
        path: the store's directory. When it already holds a store of the same compressor and model, logging
            resumes: batches whose ids are all stored are skipped without running the model, and the store ends
            with every id exactly once.
        ids: ``ids(batch)`` → the batch's example ids (ints); by default an example's id is its position in
            ``train``.
        modules: which layers to track (see :func:`hookinf.watch`).
        flush_every: a shard is written at least every this many examples (what an interruption can lose).
        progress: show a rich progress bar.

    Returns:
        The :class:`GradientStore`; pass it as ``train`` to :func:`hookinf.influence` / :func:`self_influence`.
    """
    with eval_mode(model), Watch(model, modules=modules, loss_reduction="sum") as w:
        passes = DataPasses(model, w, loss_fn, progress=False, compress=None)
        logger = GradientLogger(path, compress, passes.shapes, model_dtype(w.modules.values()), flush_every)
        total = len(train) if isinstance(train, Sized) else None
        position = 0
        with PassProgress("log gradients", total, enabled=progress) as bar:
            for batch in train:
                example_ids = batch_ids(batch, ids, position)
                position += int(example_ids.numel())
                if all(logger.is_stored(i) for i in example_ids.tolist()):
                    bar.advance(0)
                    continue
                step = passes.step(batch, "log")
                logger.add(example_ids, step)
                bar.advance(step.batch_size)
        logger.close()
    return logger.store
