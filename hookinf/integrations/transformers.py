"""Hugging Face ``transformers.Trainer`` integration: :class:`HookinfCallback` and :class:`ModelLoss`.

:class:`HookinfCallback` fits a curvature and/or logs every training example's compressed gradient during one epoch
of an unchanged Trainer script; :class:`ModelLoss` (:mod:`hookinf.integrations.model_loss`) is the matching
``loss_fn`` for hookinf's own passes over Trainer-style batches.

Design (see ``docs/huggingface.md`` for the user's view):

* **Ids travel with the batch.** A Trainer shuffles, prefetches the micro-batches of an optimizer step, and shows
  callbacks neither the batches nor the sampler's indices. The ids therefore come from a dataset column
  (``id_column``, default ``"idx"``) that the Trainer must keep (``TrainingArguments(remove_unused_columns=False)``)
  and that reaches the model's ``forward`` as a keyword argument; a forward pre-hook on the model takes it out of
  the keyword arguments, so the model never sees it, and reads the micro-batch's ids from it.
* **The Trainer's loss scale is measured, not guessed** (see :mod:`hookinf.integrations.epoch_capture`).
* **Lifetime.** The two model hooks above live from ``on_train_begin`` to ``on_train_end`` (the id column is in
  every training batch); the :func:`hookinf.watch` over the tracked layers lives from the chosen epoch's
  ``on_epoch_begin`` to its ``on_epoch_end``. Every micro-batch is consumed at the event that follows its backward
  (``on_substep_end`` or ``on_step_end``). A hookinf error removes every hook before it propagates. A Trainer calls
  no callback when training raises, so an exception from elsewhere leaves the hooks in place until
  :meth:`HookinfCallback.close` (``with HookinfCallback(...) as callback:`` calls it), or the next ``train()``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.hooks import RemovableHandle

from hookinf.autograd import in_backward
from hookinf.compress import Compressor
from hookinf.curvature import Curvature
from hookinf.damping import Damping, as_damping, default_damping
from hookinf.distributed import Group, Ranks, announcing, resolve_ranks
from hookinf.errors import ConfigurationError, HookinfWarning
from hookinf.ids import as_ids
from hookinf.integrations.callback_arguments import callback_method
from hookinf.integrations.epoch_capture import EpochCapture, MicroBatch, check_trainer_arguments, correction_pass
from hookinf.integrations.model_loss import LossReduction, ModelLoss, returned_loss
from hookinf.methods import KFAC, Method
from hookinf.selection import ModuleSpec
from hookinf.snapshots import Snapshots
from hookinf.store import GradientStore

__all__ = ["HookinfCallback", "ModelLoss"]


# ---------------------------------------------------------------------------------------------------- callback
class HookinfCallback(transformers.TrainerCallback):
    """Fits a curvature and/or logs per-example gradients during one epoch of a ``transformers.Trainer`` run.

    Add it to an unchanged Trainer script::

        callback = HookinfCallback(fit="kfac", save_to="curvature/", log_to="grads/", compress=hookinf.LoGra(16, 16))
        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
        trainer.train()                 # TrainingArguments(remove_unused_columns=False) keeps the "idx" column
        callback.curvature, callback.store

    During the chosen epoch every micro-batch's forward/backward is captured through :func:`hookinf.watch`, its
    output gradients are rescaled to the gradients of each example's own loss (the Trainer's loss weight is
    measured in the backward pass; see the module docstring), and the step feeds the curvature's statistics and the
    gradient store. The captures are those of the training step itself: train mode (dropout on), weights that change
    along the epoch. For statistics of the final weights without dropout, use :class:`ModelLoss` with
    :func:`hookinf.fit` / :func:`hookinf.log` after training.

    Args:
        fit: the curvature to fit: ``"kfac"``, ``"ekfac"``, ``"exact"``, ``"identity"`` or a
            :class:`hookinf.Method` (``hookinf.EKFAC(basis=...)``). ``"ekfac"`` accumulates K-FAC's factors during
            the epoch, then runs EK-FAC's correction pass over the training set at the epoch's end (one more
            forward/backward per example, in eval mode, parameters' ``.grad`` untouched). With ``compress``, it is
            fitted in the compressed space, so it pairs with the store.
        save_to: a directory to :meth:`~hookinf.Curvature.save` the curvature into at the end of the epoch
            (optional; :attr:`curvature` holds it either way).
        log_to: a gradient store directory (created, or resumed: stored ids are skipped) for every example's
            compressed gradient, under the id from its batch's ``id_column``.
        compress: the compressor of the store (and of the curvature): ``hookinf.LoGra(...)``,
            ``hookinf.Dropout(...)``, ``hookinf.Gaussian(...)``.
        epoch: the epoch to capture, 0-based as the Trainer counts them; negative counts from the end (``-1``:
            the last one).
        id_column: the dataset column holding each example's id (an integer, or a string with a data collator
            that passes strings through). It is removed from the model's inputs.
        loss_reduction: how the loss the *model* returns combines the examples of a micro-batch (what the Trainer
            does on top of it — gradient accumulation, ``num_items_in_batch``, loss scaling — is measured):
            ``"mean"`` (default: the mean of one loss per example, as in transformers' sequence-classification
            heads), ``"sum"``, or ``"num_items"`` (a sum of per-item losses divided by the ``num_items_in_batch`` the
            Trainer passes: transformers' ``loss_function`` heads such as causal language models; an example's loss
            is then the sum of its items' losses).
        modules: which layers to track (see :func:`hookinf.watch`; default: every supported module with trainable
            parameters, e.g. only the LoRA adapters of a peft model).
        damping: the curvature's damping rule (``None``: the method's, :func:`hookinf.damping.default_damping`).
        flush_every: write a store shard every this many examples.
        overwrite: replace the store at ``log_to`` when logging starts, instead of resuming it (a rerun's).
        snapshot_every: keep the trainable weights every this many optimizer steps and after the last one
            (:class:`hookinf.Snapshots`), for ``hookinf.influence(..., checkpoints=callback.snapshots.checkpoints)``.
        snapshots_to: a directory for those snapshots (safetensors files; default: kept in host memory).
        group: with ``"auto"`` and an initialised process group of several ranks (a DDP Trainer under ``torchrun``;
            or a given ``ProcessGroup``), every rank captures its own share of the epoch, as ``hookinf.watch`` does:
            each logs into its part ``log_to/rank-NNNNN`` of one store, which rank 0 merges at the epoch's end (every
            id once; :attr:`store` is then the whole store on every rank), and the curvature sums every rank's
            statistics (every rank holds it; rank 0 saves it). The epoch's beginning and end are collectives; a rank
            that fails at the end makes the others raise :class:`~hookinf.errors.DistributedError` there, and the
            store keeps every flushed shard, to resume. ``None``: this process alone (refused under distributed
            training). See ``docs/distributed.md``.

    Attributes:
        curvature: the fitted curvature (after the epoch), or ``None``.
        snapshots: the :class:`hookinf.Snapshots` of the last ``train()`` (with ``snapshot_every``), or ``None``.
        store: the gradient store (after the epoch), or ``None``.
    """

    def __init__(
        self,
        *,
        fit: str | Method | None = None,
        save_to: str | os.PathLike[str] | None = None,
        log_to: str | os.PathLike[str] | None = None,
        compress: Compressor | None = None,
        epoch: int = -1,
        id_column: str = "idx",
        loss_reduction: LossReduction = "mean",
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        damping: float | Damping | None = None,
        flush_every: int = 4096,
        overwrite: bool = False,
        snapshot_every: int | None = None,
        snapshots_to: str | os.PathLike[str] | None = None,
        group: Group = "auto",
    ) -> None:
        self.method, self.two_pass = callback_method(
            fit=fit, save_to=save_to, log_to=log_to, compress=compress, epoch=epoch, snapshot_every=snapshot_every,
            snapshots_to=snapshots_to, group=group,
        )  # fmt: skip
        self.group = group
        self.loss = ModelLoss(reduction=loss_reduction, id_column=id_column)
        self.save_to = save_to
        self.log_to = log_to
        self.compress = compress
        self.epoch = epoch
        self.modules = modules
        default = default_damping(self.method.name if self.method is not None else "")
        self.damping = default if damping is None else as_damping(damping)
        self.flush_every, self.overwrite = flush_every, overwrite
        self.snapshot_every, self.snapshots_to = snapshot_every, snapshots_to
        self.snapshots: Snapshots | None = None
        self.curvature: Curvature | None = None
        self.store: GradientStore | None = None
        self._model: nn.Module | None = None
        self._target: int | None = None  # the epoch to capture, resolved at on_train_begin
        self._ranks: Ranks | None = None  # the ranks training together, resolved at on_train_begin
        self._done = False  # the target epoch has been captured
        self._hooks: list[RemovableHandle] = []
        self._capture: EpochCapture | None = None  # the chosen epoch's watch and pipeline, while it runs
        self._forward: MicroBatch | None = None  # set by the model's pre-hook, taken by its forward hook

    @property
    def id_column(self) -> str:
        """The batch key holding the examples' ids."""
        return self.loss.id_column

    @property
    def loss_reduction(self) -> LossReduction:
        """How the model's loss combines the examples of a micro-batch."""
        return self.loss.reduction

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> HookinfCallback:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Removes every hook this callback registered and closes the store (completed steps are kept). Idempotent.

        Training calls it at the end of the captured epoch and in ``on_train_end``; call it yourself (or use
        ``with HookinfCallback(...) as callback:``) when ``trainer.train()`` raised, since a Trainer then calls no
        callback.
        """
        handles, self._hooks = self._hooks, []
        for handle in handles:
            handle.remove()
        self._forward = None
        capture, self._capture = self._capture, None
        if capture is not None:
            try:
                capture.close(interrupted=True)  # a step in flight may be partial; completed ones are stored
            finally:
                self.store = capture.store

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Closes everything when the block raises (a hookinf error must not leave hooks behind), then re-raises."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Checks the arguments, resolves the epoch and hooks the model (taking the id column out of its inputs)."""
        self.close()  # leftovers of a train() that raised
        self.curvature, self.store, self._done = None, None, False
        with self._guard():
            model = kwargs.get("model")
            if not isinstance(model, nn.Module):
                raise ConfigurationError("the Trainer passed no model to its callbacks.")
            if self.snapshot_every is not None:
                self.snapshots = Snapshots(model, every=self.snapshot_every, to=self.snapshots_to)
            if self.method is None and self.log_to is None:
                return  # snapshots only: nothing to capture
            self._ranks = resolve_ranks(self.group)
            check_trainer_arguments(
                args, logs=self.log_to is not None, id_column=self.id_column, ranks=self._ranks,
                loader=kwargs.get("train_dataloader"),
            )  # fmt: skip
            epochs = int(state.num_train_epochs)
            target = self.epoch if self.epoch >= 0 else epochs + self.epoch
            if not 0 <= target < epochs:
                raise ConfigurationError(
                    f"HookinfCallback(epoch={self.epoch}): this training runs {epochs} epoch(s) (0 to {epochs - 1})."
                )
            self._target = target
            self._model = model
            self._hooks.append(model.register_forward_pre_hook(self._on_forward_start, with_kwargs=True))
            self._hooks.append(model.register_forward_hook(self._on_forward_end, with_kwargs=True))

    def on_epoch_begin(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Opens the watch at the beginning of the chosen epoch."""
        epoch = float(state.epoch or 0.0)
        index = math.floor(epoch + 1e-6)
        if self._target is None or self._done or index != self._target or self._model is None:
            return
        if epoch - index > 1e-6:
            warnings.warn(
                f"HookinfCallback: training resumed in the middle of epoch {index}; only its remaining batches are "
                f"captured (the store and the curvature miss the skipped ones).",
                HookinfWarning,
                stacklevel=2,
            )
        with self._guard():
            self._capture = EpochCapture(
                self._model,
                method=KFAC() if self.two_pass else self.method,
                compress=self.compress,
                log_to=self.log_to,
                modules=self.modules,
                loss=self.loss,
                flush_every=self.flush_every,
                overwrite=self.overwrite,
                ranks=self._ranks,
            )

    def on_substep_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Consumes the micro-batch whose backward just ran (gradient accumulation)."""
        if self._capture is not None:
            with self._guard():
                self._capture.consume()

    def on_step_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Consumes the optimizer step's last micro-batch; takes a snapshot when one is due."""
        if self.snapshots is not None:
            with self._guard():
                self.snapshots.take(state.global_step)
        if self._capture is not None:
            with self._guard():
                self._capture.consume()

    def on_epoch_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Closes the watch, finishes (and saves) the curvature and closes the store (with several ranks: merges it)."""
        capture, self._capture = self._capture, None
        if capture is None:
            return
        with self._guard():
            try:  # with several ranks, a collective: a failure here makes the others raise DistributedError
                curvature = capture.end(self.damping)
            finally:
                self.store = capture.store
            self._done = True
            self._finish(curvature, args, kwargs.get("train_dataloader"))

    def on_train_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Removes every hook; snapshots the final weights; warns when the chosen epoch never ran."""
        self.close()
        if self.snapshots is not None:
            self.snapshots.take(state.global_step, force=True)
        if not self._done and self._target is not None:
            warnings.warn(
                f"HookinfCallback: training ended before epoch {self._target} ran; nothing was captured.",
                HookinfWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ the model's hooks
    def _on_forward_start(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if module is not self._model:
            return None  # a deep copy's inherited hook
        ids = kwargs.pop(self.id_column, None)
        if self._capture is not None and torch.is_grad_enabled() and not in_backward():
            self._forward = self._capture.forward_started(
                None if ids is None else as_ids(ids, f"the {self.id_column!r} column"), kwargs.get("num_items_in_batch")
            )
        return args, kwargs

    def _on_forward_end(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if module is not self._model:
            return
        record, self._forward = self._forward, None
        if record is None or self._capture is None:
            return
        loss = returned_loss(output)
        if loss is None or not loss.requires_grad:
            with self._guard():
                raise ConfigurationError(
                    "HookinfCallback needs the loss the model computes itself (the Trainer's default compute_loss with "
                    "'labels' in the batch): the model returned none that requires grad. compute_loss_func=, label "
                    "smoothing and compute_loss overrides that compute the loss outside the model are not supported."
                )
        self._capture.forward_ended(record, loss)

    # ------------------------------------------------------------------ end of the epoch
    def _finish(self, curvature: Curvature | None, args: transformers.TrainingArguments, train_dataloader: Any) -> None:
        """Finishes the epoch's curvature: EK-FAC's correction pass, and saves it (with several ranks: rank 0 does)."""
        if curvature is not None:
            if self.two_pass:
                assert self._model is not None
                curvature = correction_pass(
                    self._model, curvature, train_dataloader, args, self.loss, self.modules, self.damping, self.compress
                )
            if self.save_to is not None:
                with announcing(self._ranks, "saving the curvature"):
                    if self._ranks is None or self._ranks.rank == 0:
                        curvature.save(self.save_to)
            self.curvature = curvature

    def __repr__(self) -> str:
        state = "capturing" if self._capture is not None else ("done" if self._done else "waiting")
        fit = None if self.method is None else self.method.name
        return (
            f"HookinfCallback({state}, epoch={self.epoch}, fit={fit!r}, log_to={self.log_to!r}, "
            f"loss_reduction={self.loss_reduction!r}, id_column={self.id_column!r})"
        )
