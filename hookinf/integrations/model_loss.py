"""``ModelLoss``: hookinf's ``loss_fn`` from the loss a Hugging Face model computes itself.

For hookinf's own passes (:func:`hookinf.fit`, :func:`hookinf.log`, :func:`hookinf.influence`) over Trainer-style
batches: fitting or logging after training, and the query side of the scores. It needs no ``transformers`` import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from hookinf.errors import ConfigurationError, DataError
from hookinf.ids import Ids, as_ids
from hookinf.logger import batch_size

LossReduction = Literal["mean", "sum", "num_items"]
"""How the loss a model returns combines the examples of its batch (see :class:`HookinfCallback`)."""


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
    #: the scalar returned is the sum of the batch's per-example losses (:func:`hookinf.losses.sums_examples`).
    sums_examples = True

    def __post_init__(self) -> None:
        check_reduction(self.reduction)
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
        loss = returned_loss(model(**inputs))
        if loss is None:
            raise DataError(
                "the model returned no loss: ModelLoss uses the loss the model computes itself, so the batch must hold "
                "its labels (the 'labels' key for transformers models)."
            )
        return loss * batch_size(inputs) if self.reduction == "mean" else loss

    def ids(self, batch: Mapping[str, Any]) -> Ids:
        """The batch's example ids (its ``id_column``): pass ``ids=loss.ids`` to :func:`hookinf.log`."""
        if self.id_column not in batch:
            raise DataError(f"the batch has no {self.id_column!r} key holding the examples' ids.")
        return as_ids(batch[self.id_column], f"the {self.id_column!r} column")


def returned_loss(output: Any) -> Tensor | None:
    """The loss in a model's output, found as the Trainer finds it (``output["loss"]``, else ``output[0]``)."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, tuple | list) and output:
        loss = output[0]
    else:
        loss = output
    return loss if isinstance(loss, Tensor) and loss.dim() == 0 else None


def check_reduction(reduction: str) -> None:
    """Refuses a ``loss_reduction`` that is not one of :data:`LossReduction`."""
    if reduction not in get_args(LossReduction):
        raise ConfigurationError(
            f"loss_reduction={reduction!r} is not valid; use one of {list(get_args(LossReduction))}."
        )


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value
