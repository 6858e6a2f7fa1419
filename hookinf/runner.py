"""Runs ``loss_fn`` over data inside one watch and yields the captured steps: the data path of the one-call helpers.

A :class:`Runner` owns a :class:`~hookinf.Watch` over the tracked layers that compresses in its hooks (the bound
compressor is its :class:`~hookinf.pipeline.FactorMap`) and whose one consumer is a
:class:`~hookinf.pipeline.Collect` queue. ``Runner.step(batch)``
runs ``loss_fn`` on one batch, differentiates the summed loss with respect to the tracked layers' outputs (so no
weight gradient is formed and ``.grad`` is never touched; see :meth:`hookinf.Watch.gradient_targets` and
:func:`hookinf.autograd.differentiate`), checks what came back and returns the (compressed) step;
``Runner.steps(data, description)`` does it for every batch of a pass, and yields a
:class:`~hookinf.GradientStore`'s stored gradients instead when ``data`` is one. The helpers feed those steps to
their consumers: accumulators, the gradient logger, the scoring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import ExitStack, contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from hookinf.autograd import differentiate
from hookinf.capture import Step, store_step
from hookinf.compress import Compressor, from_config, require_compressor
from hookinf.distributed import Group, resolve_ranks, unwrap
from hookinf.distributed_scores import store_rows
from hookinf.errors import CaptureError, ConfigurationError, DataError
from hookinf.hooks import Watch
from hookinf.losses import SampledLoss, Sampler, sums_examples
from hookinf.pipeline import Collect
from hookinf.preconditioned import PreconditionedStore
from hookinf.progress import PassProgress
from hookinf.selection import ModuleSpec, select
from hookinf.shapes import fingerprint
from hookinf.store import GradientStore
from hookinf.weights import weights_hash

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch)`` → per-example losses ``[B]`` (or their sum, a scalar, declared with
:func:`hookinf.summed`)."""


class Runner:
    """Runs passes of ``loss_fn`` over data inside one watch (in eval mode) and yields the captured steps.

    Use it as a context manager: the model is in eval mode (dropout off) and the watch's hooks are on inside.

    Args:
        model: the model (left unchanged).
        loss_fn: ``loss_fn(model, batch)`` → per-example losses ``[B]``, or their sum when declared so
            (:func:`hookinf.summed`).
        modules: which layers to track (see :func:`hookinf.watch`).
        compress: the compressor every step is compressed with (inside the watch's hooks), or ``None``.
        progress: show a rich progress bar per pass.
        group: the ranks the passes are shards of (:mod:`hookinf.distributed`); ``None``: this process alone.

    A ``DistributedDataParallel`` model is unwrapped: the hooks sit on its inner modules, named without the
    ``module.`` prefix, and ``loss_fn`` is given the inner module (DDP's gradient reducer stays out of the passes).

    Attributes:
        watch: the hook-owning watch.
        compressor: ``compress`` bound to the tracked layers, or ``None``.
        shapes: the gradient shapes steps come in (compressed when there is a compressor), in model order.
        params: the tracked layers' trainable parameters.
        ranks: the ranks of ``group``, or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        compress: Compressor | None = None,
        progress: bool = True,
        group: Group = None,
    ) -> None:
        require_compressor(compress)
        model = unwrap(model)
        self.ranks = resolve_ranks(group)
        selection = select(model, modules)
        self.model = model
        self.loss_fn = loss_fn
        self.progress = progress
        self.params = selection.parameters()
        self.devices = selection.devices
        self.compressor = compress.bind(selection.shapes) if compress is not None else None
        self.shapes = self.compressor.shapes if self.compressor is not None else selection.shapes
        self._collected = Collect()
        self.watch = Watch(
            model, modules=selection, loss_reduction="sum", consumers=[self._collected], factor_map=self.compressor
        )
        self.counts: dict[int, set[int]] = {}  # id(data) → example counts of its passes
        self._stack = ExitStack()

    def __enter__(self) -> Runner:
        with ExitStack() as stack:
            stack.enter_context(eval_mode(self.model))
            stack.enter_context(self.watch)
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.__exit__(exc_type, exc, tb)

    @property
    def compress(self) -> Compressor | None:
        """The compressor (its configuration) the steps are compressed with, or ``None``."""
        return self.compressor.compressor if self.compressor is not None else None

    def steps(
        self, data: Iterable[Any] | GradientStore, description: str, sample: Sampler | None = None
    ) -> Iterator[Step]:
        """One pass over ``data``; with ``sample``, the loss uses labels drawn from the model (sampled Fisher).

        ``sample`` is the pass's random source (one generator per device, see :class:`hookinf.losses.Sampler`): its
        generators advance over the pass's batches, so the pass's draws are one reproducible stream.

        A :class:`GradientStore` yields its stored (already compressed) gradients chunk by chunk; with :attr:`ranks`,
        only this rank's block of its rows (:func:`hookinf.distributed_scores.store_rows`), so that a pass over one
        store on every rank visits each row once.
        """
        if isinstance(data, GradientStore):
            yield from self._store_steps(data, description, sample)
            return
        seen = 0
        total = len(data) if isinstance(data, Sized) else None
        with PassProgress(description, total, enabled=self.progress) as bar:
            for batch in data:
                step = self.step(batch, description, sample)
                seen += step.batch_size
                yield step
                bar.advance(step.batch_size)
        self.counts.setdefault(id(data), set()).add(seen)

    def _store_steps(self, store: GradientStore, description: str, sample: Sampler | None) -> Iterator[Step]:
        if sample is not None:
            raise ConfigurationError(
                "fisher='sampled' needs the model's predictions on the training data, which a gradient store does not "
                "hold; fit the curvature on the data (hookinf.fit(..., compress=..., fisher='sampled')) and pass it."
            )
        self.check_store(store)
        with PassProgress(description, len(store.shards), enabled=self.progress) as bar:
            for index, (_, _, gradients) in enumerate(store_rows(store, self.devices, self.ranks)):
                step = store_step(index, gradients, store.layers)
                yield step
                bar.advance(step.batch_size)

    def check_store(self, store: GradientStore) -> None:
        """Refuses a store of another compressor, model or weights than this runner's (before reading a shard)."""
        assert self.compressor is not None
        store.check(
            compressor=self.compressor.compressor.config(),
            original=self.compressor.original,
            fingerprint=fingerprint(self.compressor.original),
        )
        store.check_weights(weights_hash(self.params))  # its gradients and this model's queries: the same weights

    def query_gradients(self, query: Iterable[Any]) -> dict[str, Tensor]:
        """``{layer: [n_query, O, I]}``: the (compressed) per-example gradients of every query example.

        Raises:
            DataError: ``query`` is empty.
        """
        raw: dict[str, list[Tensor]] = {name: [] for name in self.watch.layers}
        for step in self.steps(query, "query gradients"):
            for name, capture in step.layers.items():
                raw[name].append(capture.gradients())
        if not raw[self.watch.layers[0]]:
            raise DataError("query is empty: pass at least one batch of query examples.")
        return {name: torch.cat(parts) for name, parts in raw.items()}

    def step(self, batch: Any, description: str, sample: Sampler | None = None) -> Step:
        """Runs ``loss_fn`` on one batch, differentiates it and returns the captured (compressed) step."""
        before = self.watch.steps
        with torch.enable_grad(), self.watch.recording_outputs():
            if sample is not None:
                assert isinstance(self.loss_fn, SampledLoss)
                losses = self.loss_fn.sampled(self.model, batch, sample)
            else:
                losses = self.loss_fn(self.model, batch)
            if not isinstance(losses, Tensor) or losses.dim() > 1:
                shape = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise DataError(
                    f"loss_fn must return per-example losses of shape [B] (or their declared sum, see "
                    f"hookinf.summed); got {shape}."
                )
            if losses.dim() == 0 and not sums_examples(self.loss_fn):
                raise DataError(
                    "loss_fn returned one number for the whole batch: hookinf cannot tell a batch mean (the default "
                    "of F.cross_entropy, which would make every gradient 1/B too small) from a sum. Return one loss "
                    "per example, shape [B] — e.g. F.cross_entropy(logits, y, reduction='none') — or, if the number "
                    "is the sum of the batch's per-example losses, declare it: loss_fn=hookinf.summed(your_fn)."
                )
            if not losses.requires_grad:
                raise DataError(
                    "loss_fn returned a loss that does not require grad: does it run under torch.no_grad() or "
                    "detach the output? hookinf needs to differentiate it."
                )
            differentiate(losses.sum(), self.watch.gradient_targets() or self.params, self.model)
        if self.watch.steps == before:
            raise CaptureError(
                f"the loss of a {description} batch does not depend on any tracked layer "
                f"({', '.join(self.watch.layers)}); check loss_fn and modules=."
            )
        step = self._collected.take()
        if losses.dim() == 1 and losses.shape[0] != step.batch_size:
            raise DataError(
                f"loss_fn returned {losses.shape[0]} losses for a batch of {step.batch_size} examples; return "
                f"one loss per example (shape [B])."
            )
        return step

    def check_count(self) -> None:
        """Refuses a ``train`` that yielded a different number of examples on different passes."""
        for counts in self.counts.values():
            if len(counts) > 1:
                raise DataError(
                    f"train yielded {sorted(counts)} examples on different passes; it must yield the same examples "
                    f"in the same order each time it is iterated (no shuffling, no random augmentation of the count)."
                )


def check_reiterable(data: Iterable[Any] | GradientStore, what: str) -> None:
    """Refuses data that would not give the same examples in the same order on every pass, or no batches at all."""
    if isinstance(data, GradientStore):
        return
    if isinstance(data, PreconditionedStore):
        raise DataError(
            f"{what} is a PreconditionedStore: its rows are already multiplied by a curvature's inverse, so only "
            f"hookinf.top_k (or a FaissIndex) scores them. To fit or score from the same gradients, pass its source "
            f"store, hookinf.GradientStore({data.record.source!r}) (with method=<the curvature it was preconditioned "
            f"with> to score with the same curvature)."
        )
    if isinstance(data, DataLoader) and order_changes(data):
        raise DataError(
            f"{what} is a DataLoader whose order changes between passes (shuffle=True or a random sampler); "
            f"hookinf iterates it more than once and column j of the scores must be the same example each time. "
            f"Use shuffle=False and a sequential sampler."
        )
    try:
        iterator = iter(data)
    except TypeError:
        raise DataError(
            f"{what} cannot be iterated (it is of type {type(data).__name__}): pass batches of examples (a list of "
            f"batches or a DataLoader) or a hookinf.GradientStore."
        ) from None
    if iterator is data:
        raise DataError(
            f"{what} is an iterator that can be consumed only once; pass a list of batches or a DataLoader."
        )


def order_changes(loader: DataLoader[Any]) -> bool:
    """Whether two passes over ``loader`` would visit the examples in different orders (indices only)."""
    if isinstance(loader.sampler, RandomSampler):
        return True
    if isinstance(loader.dataset, IterableDataset):
        return False
    order: Iterable[Any] = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    return list(order) != list(order)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Runs the block with every module in eval mode (dropout off), restoring each module's own flag after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def gradient_chunks(steps: Iterable[Step], size: int) -> Iterator[dict[str, Tensor]]:
    """Per-example gradients ``{layer: [n, O, I]}`` of consecutive steps, about ``size`` examples at a time."""
    held: dict[str, list[Tensor]] = {}
    count = 0
    for step in steps:
        for name, grads in step.gradients().items():
            held.setdefault(name, []).append(grads)
        count += step.batch_size
        if count >= size:
            yield {name: torch.cat(parts) for name, parts in held.items()}
            held, count = {}, 0
    if count:
        yield {name: torch.cat(parts) for name, parts in held.items()}


def store_compressor(train: Iterable[Any] | GradientStore, compress: Compressor | None) -> Compressor | None:
    """The compressor to use: a store's own (``compress``, when also given, must be the same)."""
    if not isinstance(train, GradientStore):
        return compress
    stored = from_config(train.compressor)
    if compress is not None and compress.config() != train.compressor:
        raise ConfigurationError(
            f"compress={compress.config()} differs from the store's compressor {train.compressor}; leave compress= "
            f"out when scoring against a store (its own compressor is used)."
        )
    return stored
