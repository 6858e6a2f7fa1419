"""One epoch's capture under a ``transformers.Trainer``: the watch, its pipeline and the micro-batches in flight.

:class:`EpochCapture` is what :class:`~hookinf.integrations.HookinfCallback` opens for the chosen epoch. It builds
the same parts as :func:`hookinf.watch`: a :class:`~hookinf.Watch` over the tracked layers whose pipeline rescales
each micro-batch's step (compressed in the watch's hooks) by the Trainer's measured loss weight (a
:class:`~hookinf.pipeline.Rescale` transform), then hands it to the method's accumulator and the gradient logger.
The callback's model hooks report each micro-batch's forward (its ids, its ``num_items_in_batch``, the loss the
model returned) here.

**The Trainer's loss scale is measured, not guessed.** The Trainer differentiates ``w × (the model's loss)``, with
a weight ``w`` that depends on its configuration: ``1/k`` for a micro-batch of an optimizer step of ``k``
micro-batches when the loss is taken to be a per-micro-batch mean, ``1`` when the model received
``num_items_in_batch`` (transformers 5's ``Trainer.training_step``: ``loss / current_gradient_accumulation_steps``
unless ``model_accepts_loss_kwargs and num_items_in_batch is not None``), times a mixed-precision loss scale, and
so on. A tensor hook on the loss the model returns receives exactly ``∂(differentiated loss)/∂(model's loss) = w``
in the backward pass. Only the model's own reduction over its examples (``loss_reduction``: a mean over the
micro-batch, a sum, or a sum divided by ``num_items_in_batch``) has to be declared. Every micro-batch's output
gradients are then multiplied by ``normaliser / w``, which makes them gradients of each example's own loss —
what hookinf's own passes capture.

**Several ranks** (a DDP Trainer under ``torchrun``, the callback's ``group``): the ranks meet only where every rank
is in the callback together — at the epoch's beginning (:func:`~hookinf.distributed_log.join_store`, then opening the
parts) and at its end (:meth:`EpochCapture.finish`: rank 0 merges the parts, then the statistics are summed, as
``hookinf.watch``'s ``curvature()`` sums them; or :meth:`EpochCapture.fail` tells the others). A rank that fails in
the middle of the epoch does not meet them: they wait in the Trainer's own collectives (DDP's gradient all-reduce)
until it exits or the process group's timeout passes, and its part keeps every flushed shard, to resume.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from hookinf.capture import Step
from hookinf.compress import Compressor
from hookinf.curvature import Curvature, statistics_dtype
from hookinf.damping import Damping
from hookinf.distributed import Ranks, announcing
from hookinf.distributed_log import LogTarget, join_store, leave_store
from hookinf.errors import CaptureError, ConfigurationError, DataError, DistributedError
from hookinf.helpers import fit
from hookinf.hooks import Watch
from hookinf.ids import Ids
from hookinf.integrations.model_loss import ModelLoss
from hookinf.logger import GradientLogger
from hookinf.methods import EKFAC, Method
from hookinf.methods.base import Accumulator
from hookinf.pipeline import Consumer, Pipeline, Rescale, Transform
from hookinf.selection import ModuleSpec, select
from hookinf.store import GradientStore


@dataclass(eq=False)
class MicroBatch:
    """What the model's hooks saw of one micro-batch's forward, waiting for its backward to be consumed."""

    ids: Ids | None
    num_items: Any  # the num_items_in_batch the model received (a tensor, a number, or None)
    weight: Tensor | None = None  # ∂(the loss the Trainer differentiates)/∂(the loss the model returned)
    handle: RemovableHandle | None = None

    def receive(self, grad: Tensor) -> None:
        """The loss tensor's hook: records the weight the Trainer differentiated the model's loss with."""
        self.weight = grad.detach()


class EpochCapture:
    """The watch and pipeline of one captured epoch (entered on construction; :meth:`close` ends it).

    Args:
        model: the Trainer's model.
        method: the method whose statistics accumulate (``None``: none).
        compress: the compressor of the store and the statistics (``None``: uncompressed).
        log_to: the gradient store's directory (``None``: no store).
        modules: which layers to track.
        loss: the model's loss convention (its reduction and id column).
        flush_every: write a store shard every this many examples.
        overwrite: replace the store at ``log_to`` instead of resuming it.
        ranks: the ranks training together (``None``: this process alone): each logs its part of the store at
            ``log_to`` and the statistics are summed over them (see the module docstring). Building it is then a
            collective.

    Raises:
        DistributedError: with ``ranks``, another rank failed or died while the store was joined or opened.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: Method | None,
        compress: Compressor | None,
        log_to: str | os.PathLike[str] | None,
        modules: ModuleSpec | Sequence[ModuleSpec] | None,
        loss: ModelLoss,
        flush_every: int,
        overwrite: bool = False,
        ranks: Ranks | None = None,
    ) -> None:
        self.loss = loss
        self.ranks = ranks
        selection = select(model, modules)
        bound = compress.bind(selection.shapes) if compress is not None else None
        consumers: list[Consumer] = []
        self.accumulator: Accumulator | None = None
        if method is not None:
            fitted = bound.shapes if bound is not None else selection.shapes
            method.check(fitted)
            self.accumulator = method.accumulator(fitted, statistics_dtype(selection.parameters()), compress)
            consumers.append(self.accumulator)
        self.logger: GradientLogger | None = None
        self._target: LogTarget | None = None  # where this rank logs: the store, or its part of a shared one
        self._merged = False  # with several ranks: the epoch ended and rank 0 merged the store
        if log_to is not None:
            assert bound is not None
            self._target = join_store(log_to, ranks, overwrite)  # with several ranks: a collective
            target = self._target
            self.logger = GradientLogger(
                target.path, bound, selection.parameters(), flush_every, overwrite=target.overwrite, run=target.run,
                whole=target.whole,
            )  # fmt: skip
            consumers.append(self.logger)
        transforms: list[Transform] = [Rescale(self._per_example_scale)]  # linear in δ: applies to δ' alike
        self.batches: list[MicroBatch] = []  # forwards whose steps are not consumed yet
        self._consumed = 0  # watch steps consumed so far
        self.watch = Watch(
            model,
            modules=selection,
            loss_reduction="sum",
            consumers=[Pipeline(consumers, transforms)],
            factor_map=bound,
        )
        opened = False
        try:
            with announcing(self._log_ranks, "opening the store's parts"):  # no rank logs unless every rank can
                self.watch.__enter__()
                opened = True
        except BaseException:
            if opened:  # another rank could not open its part: this one closes its watch too
                self.watch.__exit__(_Interrupted, _Interrupted(), None)
            raise

    @property
    def _log_ranks(self) -> Ranks | None:
        """The ranks sharing the store (``None``: no store, or this process alone)."""
        return self.ranks if self._target is not None else None

    @property
    def store(self) -> GradientStore | None:
        """The store (``None``: none): with several ranks, this rank's part until rank 0 merged the whole store."""
        if self.logger is None or self._target is None:
            return None
        if self._target.whole is None or not self._merged:
            return self.logger.store
        return GradientStore(self._target.whole)

    def forward_started(self, ids: Ids | None, num_items: Any) -> MicroBatch:
        """A micro-batch's forward begins (outside backward, with grad): its step will carry ``ids``."""
        if ids is not None:
            self.watch.tag(ids)
        return MicroBatch(ids=ids, num_items=num_items)

    def forward_ended(self, record: MicroBatch, loss: Tensor) -> None:
        """The model returned ``loss`` for ``record``'s micro-batch: measure the weight its backward carries."""
        record.handle = loss.register_hook(record.receive)
        self.batches.append(record)

    def consume(self) -> None:
        """Closes the step of the micro-batch whose backward just ran: the pipeline rescales it and feeds it."""
        if self.logger is not None and self.batches and self.batches[0].ids is None:
            raise DataError(
                f"a training batch has no {self.loss.id_column!r} column, which holds the examples' ids for the "
                f"store: add an id column (integers or strings) to the training dataset (or name yours with "
                f"id_column=), and keep it with TrainingArguments(remove_unused_columns=False) and a data collator "
                f"that passes it through."
            )
        steps = self.watch.steps  # closes the pending step (the pipeline runs here)
        if steps == self._consumed and not self.batches:
            return  # nothing ran since the last event (e.g. on_step_end after on_substep_end's micro-batch)
        self._check_one_micro_batch(steps)
        self._consumed = steps
        record = self.batches.pop()
        if record.handle is not None:
            record.handle.remove()

    def end(self, damping: Damping) -> Curvature | None:
        """The epoch's end: consumes its last micro-batch, then :meth:`finish` (or, when that raised, :meth:`fail`)."""
        try:
            self.consume()
        except BaseException:
            self.fail()
            raise
        return self.finish(damping)

    def finish(self, damping: Damping) -> Curvature | None:
        """Ends the epoch normally: closes the watch and the store, and finishes the statistics (``None``: none).

        With several ranks, a collective every rank reaches at the epoch's end: rank 0 merges the store's parts, then
        the statistics are summed over the ranks (every rank returns the curvature of every rank's micro-batches).

        Raises:
            DistributedError: another rank failed or died at the epoch's end (this rank's error is raised as is).
        """
        try:
            self.close(interrupted=False)  # closes the pipeline: the store's last shard is written
        except BaseException:
            self._meet_failed()
            raise
        if self._target is not None and self.logger is not None:  # the weights this rank's logging ended at
            leave_store(self._target, self._log_ranks, failed=False, weights=self.logger.store.manifest.weights)
            self._merged = True
        if self.accumulator is None:
            return None
        if self.ranks is not None:
            self.accumulator.all_reduce(self.ranks, what="the statistics of the captured epoch")
        return self.accumulator.finish(damping)

    def fail(self) -> None:
        """Ends the epoch after this rank failed at its end (a point every rank reaches): the others raise there."""
        try:
            self.close(interrupted=True)
        finally:
            self._meet_failed()

    def _meet_failed(self) -> None:
        """Joins the other ranks' first meeting at the epoch's end with the failure flag (they raise there)."""
        if self.ranks is None:
            return
        if self._target is not None:
            leave_store(self._target, self.ranks, failed=True)
        elif self.accumulator is not None:
            with contextlib.suppress(DistributedError):
                self.accumulator.all_reduce(self.ranks, failed=True, what="the statistics of the captured epoch")

    def close(self, interrupted: bool) -> None:
        """Ends the epoch's watch (which closes the logger: completed steps are kept) and drops pending records.

        Meets no other rank: :meth:`finish` and :meth:`fail` do, at the epoch's end.

        Args:
            interrupted: the epoch did not end normally; a step in flight may be partial and is not finished.
        """
        for record in self.batches:
            if record.handle is not None:
                record.handle.remove()
        self.batches.clear()
        if interrupted:
            self.watch.__exit__(_Interrupted, _Interrupted(), None)
        else:
            self.watch.__exit__(None, None, None)

    def _check_one_micro_batch(self, steps: int) -> None:
        if steps != self._consumed + 1 or len(self.batches) != 1:
            raise CaptureError(
                f"HookinfCallback expects one model forward and one backward per micro-batch; since the last Trainer "
                f"event there were {len(self.batches)} forward(s) and {steps - self._consumed} backward(s). A "
                f"compute_loss that calls the model more than once is not supported."
            )

    def _per_example_scale(self, step: Step) -> Tensor:
        """``normaliser / w`` for the micro-batch of ``step``: its δ become the gradients of each example's own loss.

        A device tensor, never read on the host: a zero or non-finite weight (which nothing can rescale) makes the
        step's output gradients non-finite, which the watch's finiteness check reports.
        """
        self._check_one_micro_batch(self._consumed + 1)
        record = self.batches[0]
        if record.weight is None:
            raise CaptureError(
                "no gradient reached the loss the model returned, so the Trainer's loss scale is unknown; the Trainer "
                "must differentiate the model's own loss (its default compute_loss)."
            )
        weight = record.weight.double()
        if self.loss.reduction == "mean":
            return step.batch_size / weight
        if self.loss.reduction == "sum":
            return 1.0 / weight
        if record.num_items is None:
            raise ConfigurationError(
                "loss_reduction='num_items', but the model received no num_items_in_batch: the Trainer passes it only "
                "to models whose forward takes **kwargs (model_accepts_loss_kwargs) when the batch has 'labels'. "
                "Declare the model's own reduction, e.g. loss_reduction='mean'."
            )
        num_items = record.num_items
        return (num_items.to(weight.device) if isinstance(num_items, Tensor) else float(num_items)) / weight


class _Interrupted(Exception):
    """Passed to ``Watch.__exit__`` when a capture is closed early: never finish a possibly partial step."""


def check_trainer_arguments(args: Any, *, logs: bool, id_column: str, ranks: Ranks | None, loader: Any) -> None:
    """Refuses Trainer configurations the callback cannot capture correctly, before any training happens."""
    if logs and ranks is not None:
        _check_no_repeats(args, ranks, loader)
    if int(getattr(args, "n_gpu", 1)) > 1:
        raise ConfigurationError(
            "HookinfCallback captures one device per process; DataParallel training (several GPUs in one process) "
            "would capture one replica's share. Launch one process per GPU (torchrun: DistributedDataParallel)."
        )
    world = int(getattr(args, "world_size", 1))
    size = 1 if ranks is None else ranks.size
    if world != size:
        raise ConfigurationError(
            f"HookinfCallback: the Trainer trains on {world} process(es), but the callback's group= has {size} "
            f"rank(s). Under torchrun keep group='auto' (the default process group the Trainer trains on), so that "
            f"every rank captures its share and logs its part of one store; group=None captures a single process "
            f"and is refused under distributed training (it would capture one rank's share)."
        )
    if getattr(args, "fp16", False):
        raise ConfigurationError(
            "HookinfCallback does not support fp16 mixed precision: its dynamic loss scaling overflows on purpose and "
            "skips those steps, whose gradients are not finite. Use bf16=True or float32."
        )
    if logs and getattr(args, "remove_unused_columns", False):
        raise ConfigurationError(
            f"log_to= stores each example under the id in its batch's {id_column!r} column, which the Trainer drops "
            f"as an input the model does not take: set TrainingArguments(remove_unused_columns=False) (and use a "
            f"data collator that passes the column through). HookinfCallback removes it from the model's inputs."
        )


def _check_no_repeats(args: Any, ranks: Ranks, loader: Any) -> None:
    """Refuses a store from ranks whose batches the Trainer pads with repeated examples (accelerate's even_batches)."""
    try:
        examples = len(loader.dataset)
    except (AttributeError, TypeError):
        return  # an iterable dataset: a repeat, if any, is refused by the store when it comes
    batch = int(args.per_device_train_batch_size)
    if examples % (ranks.size * batch) and not args.dataloader_drop_last:
        raise ConfigurationError(
            f"HookinfCallback(log_to=...) on {ranks.size} ranks: {examples} training examples are not a multiple of "
            f"{ranks.size} ranks × per_device_train_batch_size={batch}, so the Trainer (accelerate's even_batches) "
            f"fills the last batches with repeated examples, which a rank would log twice. Use a multiple of "
            f"{ranks.size * batch} examples, or TrainingArguments(dataloader_drop_last=True)."
        )


def correction_pass(
    model: nn.Module,
    basis: Curvature,
    loader: Any,
    args: Any,
    loss: ModelLoss,
    modules: ModuleSpec | Sequence[ModuleSpec] | None,
    damping: Damping,
    compress: Compressor | None,
) -> Curvature:
    """EK-FAC's second pass over the Trainer's training set, in order, at the current weights (eval mode).

    With several ranks, every rank runs the whole pass over the whole training set (no collective): each ends with
    the same curvature, given the summed K-FAC ``basis``.
    """
    if not isinstance(loader, DataLoader):
        raise ConfigurationError(
            "fit='ekfac' runs its correction pass over the Trainer's training data, but the Trainer passed no "
            "training DataLoader to its callbacks; fit 'kfac' and run hookinf.fit(model, loader, ModelLoss(), "
            "method=hookinf.EKFAC(basis=callback.curvature)) yourself."
        )
    ordered = DataLoader(loader.dataset, batch_size=args.per_device_train_batch_size, collate_fn=loader.collate_fn)
    with torch.random.fork_rng(devices=[]):  # iterating a DataLoader draws a seed: leave the Trainer's RNG alone
        return fit(
            model,
            ordered,
            loss,
            method=EKFAC(basis=basis),
            modules=modules,
            damping=damping,
            compress=compress,
            progress=not args.disable_tqdm,
            group=None,  # every rank runs the whole pass in order (summing over the ranks would count each twice)
        )
