"""Per-example losses that can also draw labels from the model, for the true (sampled) Fisher.

``fisher="empirical"`` builds the curvature from gradients of the losses at the given labels; ``fisher="sampled"``
from gradients at labels drawn from the model's own predictive distribution, which makes ``G`` the true Fisher
(equal to the Gauss-Newton matrix for cross-entropy) as K-FAC/EK-FAC implementations use it (Martens & Grosse 2015;
Grosse et al. 2023, §2.2). A loss supports sampling when it has a ``sampled(model, batch, generator)`` method
(:class:`SampledLoss`); :class:`CrossEntropy` covers classification and language modelling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hookinf.errors import ConfigurationError, DataError

Fisher = Literal["empirical", "sampled"]


@runtime_checkable
class SampledLoss(Protocol):
    """A ``loss_fn`` that can also compute the loss at labels sampled from the model."""

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-example losses ``[B]`` at the batch's own labels."""
        ...

    def sampled(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Tensor:
        """Per-example losses ``[B]`` at labels drawn from the model's predictive distribution."""
        ...


def check_fisher(fisher: str, loss_fn: object) -> None:
    """Validates ``fisher=`` against the loss function."""
    if fisher not in get_args(Fisher):
        raise ConfigurationError(f"fisher={fisher!r} is not valid; use one of {list(get_args(Fisher))}.")
    if fisher == "sampled" and not isinstance(loss_fn, SampledLoss):
        raise ConfigurationError(
            "fisher='sampled' needs a loss that can draw labels from the model: use hookinf.CrossEntropy(logits=..., "
            "target=...) as loss_fn, or give your loss_fn a sampled(model, batch, generator) method returning "
            "per-example losses [B] at sampled labels."
        )


@dataclass(frozen=True)
class CrossEntropy:
    """Per-example cross-entropy for classification (``[B, C]`` logits) or sequences (``[B, T, C]``).

    Use it as ``loss_fn``: ``CrossEntropy(logits=lambda model, batch: model(batch[0]), target=lambda b: b[1])``.

    Attributes:
        logits: ``(model, batch) → logits`` ``[B, C]`` or ``[B, T, C]``.
        target: ``batch → labels`` ``[B]`` or ``[B, T]``; positions equal to ``ignore_index`` do not count.
        shift: for causal language models, predict position ``t + 1`` from position ``t``.
        per_example: how an example's token losses combine: ``"sum"`` (then per-token influence sums to the
            example's) or ``"mean"``.
        ignore_index: label value of padding positions.
    """

    logits: Callable[[nn.Module, Any], Tensor]
    target: Callable[[Any], Tensor]
    shift: bool = False
    per_example: Literal["sum", "mean"] = "sum"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.per_example not in ("sum", "mean"):
            raise ConfigurationError(f"CrossEntropy(per_example={self.per_example!r}): use 'sum' or 'mean'.")

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-example losses ``[B]`` at the batch's labels."""
        logits, target = self._pair(model, batch)
        return self._loss(logits, target)

    def sampled(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Tensor:
        """Per-example losses ``[B]`` at labels drawn from ``softmax(logits)`` (padding positions kept)."""
        logits, target = self._pair(model, batch)
        with torch.no_grad():
            probs = torch.softmax(logits.detach().double(), dim=-1).reshape(-1, logits.shape[-1])
            drawn = torch.multinomial(probs.cpu(), 1, generator=generator).reshape(target.shape).to(target.device)
            drawn = torch.where(target == self.ignore_index, target, drawn)
        return self._loss(logits, drawn)

    def _pair(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        logits, target = self.logits(model, batch), self.target(batch)
        if self.shift:
            logits, target = logits[:, :-1], target[:, 1:]
        if logits.shape[:-1] != target.shape:
            shifted = "; shift=True drops one position" if self.shift else ""
            raise DataError(
                f"CrossEntropy: logits {list(logits.shape)} do not match labels {list(target.shape)} (expected "
                f"logits [B, C] with labels [B], or [B, T, C] with [B, T]{shifted})."
            )
        return logits, target

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none", ignore_index=self.ignore_index
        ).reshape(target.shape)
        if losses.dim() == 1:
            return losses
        losses = losses.flatten(1)
        if self.per_example == "sum":
            return losses.sum(dim=1)
        counts = (target.flatten(1) != self.ignore_index).sum(dim=1).clamp_min(1)
        return losses.sum(dim=1) / counts
