"""Checks of the inputs of :mod:`hookinf.metrics`.

Tensors, finite values, and scores whose columns line up with the per-example labels they are compared to.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.ids import Ids
from hookinf.scores import Scores
from hookinf.self_scores import SelfScores


def as_tensor(value: object, what: str) -> Tensor:
    """``value`` detached, or a :class:`ConfigurationError` naming ``what`` when it is not a tensor."""
    if not isinstance(value, Tensor):
        raise ConfigurationError(f"{what} must be a torch.Tensor; got {type(value).__name__}.")
    return value.detach()


def scores_total(scores: Scores | Tensor, caller: str) -> Tensor:
    """The ``[n_query, n_train]`` float64 total of a :class:`Scores` or a tensor, checked."""
    if isinstance(scores, Scores):
        total = scores.total.detach()
        fix = f"{caller}(..., scores.total, flipped[scores.ids])"
        _check_positions(scores.ids, caller, "these scores' columns", fix)
    elif isinstance(scores, Tensor):
        total = scores.detach()
    else:
        raise ConfigurationError(
            f"{caller}: scores must be hookinf.Scores or a [n_query, n_train] tensor; got {type(scores).__name__}."
        )
    if total.dim() != 2:
        raise ConfigurationError(f"{caller}: scores must be [n_query, n_train]; got shape {list(total.shape)}.")
    check_finite(total, f"{caller}: scores")
    return total.double()


def self_values(values: SelfScores | Tensor, caller: str) -> Tensor:
    """The ``[n]`` total of a :class:`SelfScores` whose entries are examples ``0..n-1``, or ``values`` as given."""
    if isinstance(values, SelfScores):
        _check_positions(values.ids, caller, "these self-influences", f"{caller}(values.total, flipped[values.ids])")
        return values.total.detach()
    return values


def _check_positions(ids: Ids | None, caller: str, what: str, fix: str) -> None:
    """A :class:`ConfigurationError` unless ``ids`` is ``None`` or the positions ``0..n-1`` (labels line up)."""
    positions = isinstance(ids, Tensor) and torch.equal(
        ids, torch.arange(ids.numel(), dtype=ids.dtype, device=ids.device)
    )
    if ids is not None and not positions:
        raise ConfigurationError(
            f"{caller}: {what} are the training examples with ids {_few(ids)} (from a gradient store), not "
            f"examples 0..{len(ids) - 1}, so per-example labels or masks indexed by dataset position would not line "
            f"up. Select them by id and pass the tensor: e.g. {fix} when the ids are dataset indices."
        )


def _few(ids: Ids, shown: int = 6) -> str:
    values = ids[:shown].tolist() if isinstance(ids, Tensor) else ids[:shown]
    return "[" + ", ".join(map(str, values)) + (", …]" if len(ids) > shown else "]")


def check_finite(values: Tensor, what: str) -> None:
    """A :class:`ConfigurationError` naming ``what`` when a floating-point ``values`` holds NaN or infinity."""
    if values.is_floating_point() and not bool(values.isfinite().all()):
        bad = int((~values.isfinite()).sum())
        raise ConfigurationError(f"{what} hold {bad} NaN or infinite values; every entry must be finite.")
