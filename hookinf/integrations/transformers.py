"""Hugging Face ``transformers.Trainer`` integration: :class:`HookinfCallback` and :class:`ModelLoss`.

``Trainer(..., callbacks=[HookinfCallback(fit="kfac", save_to="curvature/", log_to="grads/", compress=...)])``
fits a curvature and/or logs every training example's compressed gradient, under its id, during one epoch of an
otherwise unchanged Trainer script. :class:`ModelLoss` is the matching ``loss_fn`` for hookinf's own passes
(:func:`hookinf.fit`, :func:`hookinf.log`, :func:`hookinf.influence`) over Trainer-style batches, for fitting or
logging after training and for the query side of the scores.

Design (see ``docs/huggingface.md`` for the user's view):

* **Ids travel with the batch.** A Trainer shuffles, prefetches the micro-batches of an optimizer step, and shows
  callbacks neither the batches nor the sampler's indices. The ids therefore come from a dataset column
  (``id_column``, default ``"idx"``) that the Trainer must keep (``TrainingArguments(remove_unused_columns=False)``)
  and that reaches the model's ``forward`` as a keyword argument; a forward pre-hook on the model takes it out of
  the keyword arguments, so the model never sees it, and reads the micro-batch's ids from it.
* **The Trainer's loss scale is measured, not guessed.** The Trainer differentiates ``w × (the model's loss)``, with
  a weight ``w`` that depends on its configuration: ``1/k`` for a micro-batch of an optimizer step of ``k``
  micro-batches when the loss is taken to be a per-micro-batch mean, ``1`` when the model received
  ``num_items_in_batch`` (transformers 5's ``Trainer.training_step``: ``loss / current_gradient_accumulation_steps``
  unless ``model_accepts_loss_kwargs and num_items_in_batch is not None``), times a mixed-precision loss scale, and
  so on. A tensor hook on the loss the model returns receives exactly ``∂(differentiated loss)/∂(model's loss) = w``
  in the backward pass. Only the model's own reduction over its examples (``loss_reduction``: a mean over the
  micro-batch, a sum, or a sum divided by ``num_items_in_batch``) has to be declared. Every micro-batch's output
  gradients are then multiplied by ``normaliser / w``, which makes them gradients of each example's own loss —
  what hookinf's own passes capture.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal, get_args

import torch
import transformers
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from hookinf.capture import Step
from hookinf.compress import BoundCompressor, Compressor, require_compressor
from hookinf.curvature import Curvature, LayerShape, statistics_dtype
from hookinf.damping import Damping, as_damping
from hookinf.errors import CaptureError, ConfigurationError, DataError, HookinfWarning
from hookinf.influence import fit as fit_curvature
from hookinf.logger import GradientLogger, batch_size, model_dtype
from hookinf.methods import EKFAC, KFAC, Method, resolve_method
from hookinf.methods.base import Accumulator
from hookinf.passes import check_compressor
from hookinf.store import GradientStore
from hookinf.watch import ModuleSpec, Watch

LossReduction = Literal["mean", "sum", "num_items"]
"""How the loss a model returns combines the examples of its batch (see :class:`HookinfCallback`)."""


# ---------------------------------------------------------------------------------------------------- ModelLoss
@dataclass(frozen=True)
class ModelLoss:
    """``loss_fn(model, batch)`` for hookinf's passes, from the loss a transformers model computes itself.

    ``batch`` is a dict as a Trainer's data collator makes it (``input_ids``, ``attention_mask``, ``labels``, ...).
    The model is called on it without the id column, and the loss it returns is turned into the *sum over the batch
    of each example's own loss*, the same per-example loss :class:`HookinfCallback` logs under (so stores and
    curvatures from training and from hookinf's passes agree)::

        loss = ModelLoss()                                           # the model's loss is a batch mean
        curvature = hookinf.fit(model, loader, loss, method="ekfac")  # loader: in order, Trainer-style batches
        store = hookinf.log(model, loader, loss, compress=hookinf.LoGra(16, 16), path="grads/", ids=loss.ids)

    Attributes:
        reduction: how the model's ``loss`` combines the examples of a batch. ``"mean"``: the mean of one loss per
            example (transformers' sequence-classification and regression heads with a plain ``CrossEntropyLoss`` /
            ``MSELoss``); the sum is ``loss × B``. ``"sum"``: already the sum. ``"num_items"``: the sum of per-item
            (e.g. token) losses divided by a ``num_items_in_batch`` keyword argument (transformers'
            ``loss_function`` heads, causal language models among them); the model is called with
            ``num_items_in_batch=1``, so an example's loss is the sum of its items' losses.
        id_column: the key of the examples' ids in a batch; it is not passed to the model.
    """

    reduction: LossReduction = "mean"
    id_column: str = "idx"

    def __post_init__(self) -> None:
        _check_reduction(self.reduction)
        if not isinstance(self.id_column, str) or not self.id_column:
            raise ConfigurationError(f"id_column={self.id_column!r} must be a non-empty string (a batch key).")

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """The sum of the batch's per-example losses (a scalar that requires grad)."""
        if not isinstance(batch, Mapping):
            raise DataError(
                f"ModelLoss takes dict batches as a Trainer's data collator makes them (input_ids, labels, ...); got "
                f"{type(batch).__name__}."
            )
        device = next(model.parameters()).device
        inputs = {key: _to(value, device) for key, value in batch.items() if key != self.id_column}
        if self.reduction == "num_items":
            inputs["num_items_in_batch"] = 1
        loss = _returned_loss(model(**inputs))
        if loss is None:
            raise DataError(
                "the model returned no loss: ModelLoss uses the loss the model computes itself, so the batch must hold "
                "its labels (the 'labels' key for transformers models)."
            )
        return loss * batch_size(inputs) if self.reduction == "mean" else loss

    def ids(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's example ids (its ``id_column``): pass ``ids=loss.ids`` to :func:`hookinf.log`."""
        if self.id_column not in batch:
            raise DataError(f"the batch has no {self.id_column!r} key holding the examples' ids.")
        return _as_ids(batch[self.id_column], self.id_column)


# ---------------------------------------------------------------------------------------------------- callback
@dataclass(eq=False)
class _MicroBatch:
    """What the model's hooks saw of one micro-batch's forward, waiting for its backward to be consumed."""

    ids: Tensor | None
    num_items: Any  # the num_items_in_batch the model received (a tensor, a number, or None)
    weight: Tensor | None = None  # ∂(the loss the Trainer differentiates)/∂(the loss the model returned)
    handle: RemovableHandle | None = None

    def receive(self, grad: Tensor) -> None:
        self.weight = grad.detach()


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
        id_column: the dataset column holding each example's integer id. It is removed from the model's inputs.
        loss_reduction: how the loss the *model* returns combines the examples of a micro-batch (what the Trainer
            does on top of it — gradient accumulation, ``num_items_in_batch``, loss scaling — is measured):
            ``"mean"`` (default: the mean of one loss per example, as in transformers' sequence-classification
            heads), ``"sum"``, or ``"num_items"`` (a sum of per-item losses divided by the ``num_items_in_batch`` the
            Trainer passes: transformers' ``loss_function`` heads such as causal language models; an example's loss
            is then the sum of its items' losses).
        modules: which layers to track (see :func:`hookinf.watch`; default: every supported module with trainable
            parameters, e.g. only the LoRA adapters of a peft model).
        damping: the damping rule stored with the curvature.
        flush_every: write a store shard every this many examples.

    Attributes:
        curvature: the fitted curvature (after the epoch), or ``None``.
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
        damping: float | Damping = 0.1,
        flush_every: int = 4096,
    ) -> None:
        if fit is None and log_to is None:
            raise ConfigurationError(
                "HookinfCallback does nothing without fit=... (a curvature) or log_to=... (a store)."
            )
        if save_to is not None and fit is None:
            raise ConfigurationError("save_to= saves the fitted curvature: give fit= too (e.g. fit='kfac').")
        if log_to is not None and compress is None:
            raise ConfigurationError(
                "log_to= needs compress= (the store's compressor, e.g. hookinf.LoGra(16, 16); "
                "hookinf.LoGra(10**6, 10**6, init='orthogonal') keeps the full gradients)."
            )
        require_compressor(compress)
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ConfigurationError(f"epoch={epoch!r} must be an int (0-based; -1 is the last epoch).")
        self.method: Method | None = None
        self.two_pass = False
        if fit is not None:
            method = resolve_method(fit)
            if not isinstance(method, Method):
                raise ConfigurationError(
                    f"fit={method.name!r} has no statistics to fit in advance (it streams over the training data for "
                    f"each set of queries); use 'kfac', 'ekfac', 'exact' or 'identity', or score with "
                    f"hookinf.influence(..., method={method.name!r}) after training."
                )
            basis = getattr(method, "basis", None)
            if isinstance(basis, Curvature):
                check_compressor(basis, compress.config() if compress is not None else None, "the EKFAC(basis=...) ")
            self.method = method
            self.two_pass = isinstance(method, EKFAC) and method.basis is None
        self.loss = ModelLoss(reduction=loss_reduction, id_column=id_column)
        self.save_to = save_to
        self.log_to = log_to
        self.compress = compress
        self.epoch = epoch
        self.modules = modules
        self.damping = as_damping(damping)
        self.flush_every = flush_every
        self.curvature: Curvature | None = None
        self.store: GradientStore | None = None
        self._model: nn.Module | None = None
        self._target: int | None = None  # the epoch to capture, resolved at on_train_begin
        self._done = False  # the target epoch has been captured
        self._hooks: list[RemovableHandle] = []
        self._watch: Watch | None = None
        self._bound: BoundCompressor | None = None
        self._accumulator: Accumulator | None = None
        self._logger: GradientLogger | None = None
        self._forward: _MicroBatch | None = None  # set by the model's pre-hook, taken by its forward hook
        self._batches: list[_MicroBatch] = []  # forwards whose steps are not consumed yet
        self._consumed = 0  # watch steps consumed so far

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
        for record in self._batches:
            if record.handle is not None:
                record.handle.remove()
        self._batches.clear()
        self._forward = None
        watch, self._watch = self._watch, None
        logger, self._logger = self._logger, None
        self._accumulator = None
        try:
            if watch is not None:
                # an interrupted step must not be finished (its backward may be partial): exit as after an error
                watch.__exit__(_Interrupted, _Interrupted(), None)
        finally:
            if logger is not None:
                logger.close()
                self.store = logger.store

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
            _check_arguments(args, logs=self.log_to is not None, id_column=self.id_column)
            epochs = int(state.num_train_epochs)
            target = self.epoch if self.epoch >= 0 else epochs + self.epoch
            if not 0 <= target < epochs:
                raise ConfigurationError(
                    f"HookinfCallback(epoch={self.epoch}): this training runs {epochs} epoch(s) (0 to {epochs - 1})."
                )
            self._target = target
            model = kwargs.get("model")
            if not isinstance(model, nn.Module):
                raise ConfigurationError("the Trainer passed no model to its callbacks.")
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
            self._open(self._model)

    def on_substep_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Consumes the micro-batch whose backward just ran (gradient accumulation)."""
        if self._watch is not None:
            with self._guard():
                self._consume()

    def on_step_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Consumes the optimizer step's last micro-batch."""
        if self._watch is not None:
            with self._guard():
                self._consume()

    def on_epoch_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Closes the watch, finishes (and saves) the curvature and closes the store."""
        if self._watch is None:
            return
        with self._guard():
            self._consume()
            self._finish(args, kwargs.get("train_dataloader"))

    def on_train_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Removes every hook; warns when the chosen epoch never ran."""
        self.close()
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
        if self._watch is not None and torch.is_grad_enabled() and not _in_backward():
            self._forward = _MicroBatch(
                ids=None if ids is None else _as_ids(ids, self.id_column),
                num_items=kwargs.get("num_items_in_batch"),
            )
        return args, kwargs

    def _on_forward_end(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if module is not self._model:
            return
        record, self._forward = self._forward, None
        if record is None:
            return
        loss = _returned_loss(output)
        if loss is None or not loss.requires_grad:
            with self._guard():
                raise ConfigurationError(
                    "HookinfCallback needs the loss the model computes itself (the Trainer's default compute_loss with "
                    "'labels' in the batch): the model returned none that requires grad. compute_loss_func=, label "
                    "smoothing and compute_loss overrides that compute the loss outside the model are not supported."
                )
        record.handle = loss.register_hook(record.receive)
        self._batches.append(record)

    # ------------------------------------------------------------------ capture
    def _open(self, model: nn.Module) -> None:
        watch = Watch(model, modules=self.modules, loss_reduction="sum")
        shapes = {name: LayerShape.of(adapter) for name, adapter in watch.adapters.items()}
        self._bound = self.compress.bind(shapes) if self.compress is not None else None
        if self.method is not None:
            method = KFAC() if self.two_pass else self.method
            fitted = self._bound.shapes if self._bound is not None else shapes
            method.check(fitted)
            params = [p for m in watch.modules.values() for p in m.parameters(recurse=False)]
            self._accumulator = method.accumulator(fitted, statistics_dtype(params))
        if self.log_to is not None:
            assert self.compress is not None
            dtype = model_dtype(watch.modules.values())
            self._logger = GradientLogger(self.log_to, self.compress, shapes, dtype, self.flush_every)
        self._consumed = 0
        self._watch = watch.__enter__()

    def _consume(self) -> None:
        """Rescales the step of the micro-batch whose backward just ran and hands it to the curvature and the store."""
        watch = self._watch
        assert watch is not None
        steps = watch.steps  # closes the pending step
        if steps == self._consumed and not self._batches:
            return  # nothing ran since the last event (e.g. on_step_end after on_substep_end's micro-batch)
        if steps != self._consumed + 1 or len(self._batches) != 1:
            raise CaptureError(
                f"HookinfCallback expects one model forward and one backward per micro-batch; since the last Trainer "
                f"event there were {len(self._batches)} forward(s) and {steps - self._consumed} backward(s). A "
                f"compute_loss that calls the model more than once is not supported."
            )
        self._consumed = steps
        record = self._batches.pop()
        if record.handle is not None:
            record.handle.remove()
        step = watch.last_step
        assert step is not None
        step = self._per_example(step, record)
        if self._accumulator is not None:
            self._accumulator.update(self._bound.compress(step) if self._bound is not None else step)
        if self._logger is not None:
            if record.ids is None:
                raise DataError(
                    f"a training batch has no {self.id_column!r} column, which holds the examples' ids for the store: "
                    f"add an integer id column to the training dataset (or name yours with id_column=), and keep it "
                    f"with TrainingArguments(remove_unused_columns=False) and a data collator that passes it through."
                )
            self._logger.add(record.ids, step)

    def _per_example(self, step: Step, record: _MicroBatch) -> Step:
        """``δ × normaliser / w``: the output gradients of each example's own loss."""
        if record.weight is None:
            raise CaptureError(
                "no gradient reached the loss the model returned, so the Trainer's loss scale is unknown; the Trainer "
                "must differentiate the model's own loss (its default compute_loss)."
            )
        weight = float(record.weight)
        if weight == 0.0 or not math.isfinite(weight):
            raise CaptureError(f"the Trainer differentiated the model's loss times {weight}; cannot rescale it.")
        if self.loss_reduction == "mean":
            normaliser = float(step.batch_size)
        elif self.loss_reduction == "sum":
            normaliser = 1.0
        else:
            if record.num_items is None:
                raise ConfigurationError(
                    "loss_reduction='num_items', but the model received no num_items_in_batch: the Trainer passes it "
                    "only to models whose forward takes **kwargs (model_accepts_loss_kwargs) when the batch has "
                    "'labels'. Declare the model's own reduction, e.g. loss_reduction='mean'."
                )
            normaliser = float(record.num_items)
        scale = normaliser / weight
        layers = {name: replace(capture, delta=capture.delta * scale) for name, capture in step.layers.items()}
        return Step(index=step.index, batch_size=step.batch_size, layers=layers)

    def _finish(self, args: transformers.TrainingArguments, train_dataloader: Any) -> None:
        """Ends the captured epoch: closes the watch, finishes the curvature (EK-FAC: its correction pass)."""
        watch, self._watch = self._watch, None
        assert watch is not None
        watch.__exit__(None, None, None)
        self._done = True
        accumulator, self._accumulator = self._accumulator, None
        if accumulator is not None:
            curvature = accumulator.finish(self.damping)
            if self.compress is not None:
                curvature.extra["compressor"] = self.compress.config()
            if self.two_pass:
                curvature = self._correction_pass(curvature, args, train_dataloader)
            if self.save_to is not None:
                curvature.save(self.save_to)
            self.curvature = curvature
        logger, self._logger = self._logger, None
        if logger is not None:
            logger.close()
            self.store = logger.store

    def _correction_pass(self, basis: Curvature, args: transformers.TrainingArguments, loader: Any) -> Curvature:
        """EK-FAC's second pass over the training set, in order, at the current weights (eval mode)."""
        if not isinstance(loader, DataLoader):
            raise ConfigurationError(
                "fit='ekfac' runs its correction pass over the Trainer's training data, but the Trainer passed no "
                "training DataLoader to its callbacks; fit 'kfac' and run hookinf.fit(model, loader, ModelLoss(), "
                "method=hookinf.EKFAC(basis=callback.curvature)) yourself."
            )
        assert self._model is not None
        ordered = DataLoader(loader.dataset, batch_size=args.per_device_train_batch_size, collate_fn=loader.collate_fn)
        with torch.random.fork_rng(devices=[]):  # iterating a DataLoader draws a seed: leave the Trainer's RNG alone
            return fit_curvature(
                self._model,
                ordered,
                self.loss,
                method=EKFAC(basis=basis),
                modules=self.modules,
                damping=self.damping,
                compress=self.compress,
                progress=not args.disable_tqdm,
            )

    def __repr__(self) -> str:
        state = "capturing" if self._watch is not None else ("done" if self._done else "waiting")
        fit = None if self.method is None else self.method.name
        return (
            f"HookinfCallback({state}, epoch={self.epoch}, fit={fit!r}, log_to={self.log_to!r}, "
            f"loss_reduction={self.loss_reduction!r}, id_column={self.id_column!r})"
        )


# ---------------------------------------------------------------------------------------------------- helpers
class _Interrupted(Exception):
    """Passed to ``Watch.__exit__`` by :meth:`HookinfCallback.close`: never finish a possibly partial step."""


def _returned_loss(output: Any) -> Tensor | None:
    """The loss in a model's output, found as the Trainer finds it (``output["loss"]``, else ``output[0]``)."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, tuple | list) and output:
        loss = output[0]
    else:
        loss = output
    return loss if isinstance(loss, Tensor) and loss.dim() == 0 else None


def _check_reduction(reduction: str) -> None:
    if reduction not in get_args(LossReduction):
        raise ConfigurationError(
            f"loss_reduction={reduction!r} is not valid; use one of {list(get_args(LossReduction))}."
        )


def _check_arguments(args: transformers.TrainingArguments, *, logs: bool, id_column: str) -> None:
    """Refuses Trainer configurations the callback cannot capture correctly, before any training happens."""
    if int(getattr(args, "world_size", 1)) > 1 or int(getattr(args, "n_gpu", 1)) > 1:
        raise ConfigurationError(
            "HookinfCallback captures a single process on one device; distributed or DataParallel training would "
            "capture one replica's share (and write one store from several processes)."
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


def _as_ids(value: Any, column: str) -> Tensor:
    ids = torch.as_tensor(value)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise DataError(f"the {column!r} column must hold integer example ids; got {ids.dtype}.")
    return ids.to(device="cpu", dtype=torch.int64).reshape(-1)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (gradient checkpointing re-runs forwards there)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and bool(task_id() != -1)
