"""Retraining on random subsets of the training set: the measurements behind the linear datamodeling score.

:func:`retrain_subsets` calls the user's training function once per random subset and collects each retrained
model's query losses; :func:`hookinf.metrics.lds` then scores influence against them (Park et al. 2023, TRAK, §2.2).
It is a driver (it runs user code, with a progress bar), so it lives apart from the pure metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.progress import track

TrainFn = Callable[[Tensor], Tensor]
"""``train_fn(mask)``: retrains on the examples where ``mask [n_train]`` is True; returns query losses ``[n_query]``."""


def retrain_subsets(
    train_fn: TrainFn,
    n_train: int,
    *,
    n_subsets: int = 50,
    fraction: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Retrains on random subsets of the training set and collects the query losses for :func:`~hookinf.metrics.lds`.

    All masks are drawn first from a ``torch.Generator`` seeded with ``seed`` (the global RNG is not touched, and
    whatever randomness ``train_fn`` uses does not change them); each selects exactly ``round(fraction × n_train)``
    examples uniformly at random (Python's ``round``). Then ``train_fn`` is called once per mask, in order.

    Args:
        train_fn: ``train_fn(mask)`` with ``mask [n_train]`` bool (a copy, safe to modify): trains a model on the
            examples where ``mask`` is True and returns its losses on the queries, ``[n_query]``; the same
            ``n_query`` on every call.
        n_train: number of training examples (the scores' columns).
        n_subsets: how many subsets (retrained models), at least 2.
        fraction: the share of the training set in each subset, in ``(0, 1)``.
        seed: seeds the masks.
        progress: show a rich progress bar (only when the output is a terminal).

    Returns:
        ``(subset_masks [n_subsets, n_train] bool, subset_query_losses [n_subsets, n_query] float64)`` on the CPU,
        the ``subset_masks`` and ``subset_query_losses`` of :func:`hookinf.metrics.lds`.

    Raises:
        ConfigurationError: invalid ``n_train``, ``n_subsets`` or ``fraction`` (including a fraction that rounds to
            no example or to all of them), or ``train_fn`` returning something other than a finite ``[n_query]``
            tensor of the same shape on every call (raised at the first bad call, naming it).
    """
    for name, value in (("n_train", n_train), ("n_subsets", n_subsets), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"retrain_subsets: {name}={value!r} must be an integer.")
    if n_subsets < 2:
        raise ConfigurationError(f"retrain_subsets: n_subsets={n_subsets} must be at least 2 (LDS ranks subsets).")
    if n_train < 2:
        raise ConfigurationError(f"retrain_subsets: n_train={n_train} must be at least 2.")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ConfigurationError(f"retrain_subsets: fraction={fraction!r} must be a number strictly between 0 and 1.")
    size = round(fraction * n_train)
    if not 0 < size < n_train:
        raise ConfigurationError(
            f"retrain_subsets: fraction={fraction} of n_train={n_train} rounds to {size} examples per subset; it must "
            f"keep at least one example and leave at least one out."
        )
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool, device="cpu")
    for row in masks:
        row[torch.randperm(n_train, generator=gen, device="cpu")[:size]] = True
    losses: list[Tensor] = []
    for index in track(range(n_subsets), f"retrain {n_subsets} subsets", enabled=progress, unit="models"):
        losses.append(_check_losses(train_fn(masks[index].clone()), index, losses[0] if losses else None))
    return masks, torch.stack(losses)


def _check_losses(result: object, index: int, first: Tensor | None) -> Tensor:
    """``train_fn``'s result for subset ``index`` as float64 CPU ``[n_query]``, checked against subset 0's."""
    if not isinstance(result, Tensor):
        raise ConfigurationError(
            f"retrain_subsets: train_fn must return a tensor of query losses [n_query]; subset {index} returned "
            f"{type(result).__name__}."
        )
    if result.dim() != 1:
        raise ConfigurationError(
            f"retrain_subsets: train_fn must return query losses of shape [n_query]; subset {index} returned shape "
            f"{list(result.shape)} (for a single query return shape [1])."
        )
    if first is not None and result.shape != first.shape:
        raise ConfigurationError(
            f"retrain_subsets: train_fn returned {result.shape[0]} query losses for subset {index} but "
            f"{first.shape[0]} for subset 0; it must return the same queries on every call."
        )
    losses = result.detach().to(device="cpu", dtype=torch.float64)
    if not bool(losses.isfinite().all()):
        bad = int((~losses.isfinite()).sum())
        raise ConfigurationError(
            f"retrain_subsets: train_fn's losses for subset {index} hold {bad} NaN or infinite values; every entry "
            f"must be finite."
        )
    return losses
