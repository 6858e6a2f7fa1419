"""Scores combined over checkpoints of one training run: :class:`CheckpointScores` and :func:`combine_scores`.

One final model is one noisy view of training; scoring at several checkpoints and combining predicts retraining
better (TracInCP, Pruthi et al. 2020, §3, sums over checkpoints with learning-rate weights; the measurements behind
the default are in ``benchmarks/results/checkpoints.md``). For checkpoints ``k = 1..K`` with per-layer scores
``S_k[l]`` and weights ``w_k``,

    S[l] = Σ_k w_k S_k[l],        total = Σ_l S[l] = Σ_k w_k total_k,

so the combined per-layer parts sum to the combined total, and ``w_k S_k`` is checkpoint ``k``'s contribution.
The rules (``combine=``):

* ``"normalized"`` (the default): ``w_k = 1 / σ_k`` with ``σ_k`` the standard deviation (population, over every
  ``(query, train)`` entry) of ``total_k``, so each checkpoint counts with unit spread whatever the size of its
  gradients (late checkpoints' gradients are small; early ones' large); a checkpoint whose scores are all equal gets
  ``w_k = 0``. The combined scores are in units of spread, not of loss.
* ``"sum"``: ``w_k = 1`` (the scores stay in units of loss change).
* a sequence of ``K`` numbers: those weights, e.g. the learning rate at each checkpoint as in TracInCP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.scores import Scores
from hookinf.self_scores import SelfScores

Combine = Literal["normalized", "sum"] | Sequence[float]
"""How scores at several checkpoints combine: ``"normalized"``, ``"sum"``, or one weight per checkpoint."""

RULES = ("normalized", "sum")


@dataclass(frozen=True, repr=False)
class CheckpointScores(Scores):
    """:class:`Scores` combined over checkpoints: ``per_layer[l] = Σ_k weights[k] × per_checkpoint[k].per_layer[l]``.

    Everything a :class:`Scores` offers works on the combination (reports, ``top_k``, ``lds``); :meth:`save` saves
    the combined parts only (:func:`hookinf.load_scores` gives back a plain :class:`Scores`): save each of
    :attr:`per_checkpoint` to keep them. ``damping`` is empty here: each checkpoint's is in its own scores.

    Attributes:
        per_checkpoint: each checkpoint's own scores, in the order of ``checkpoints=``.
        weights: the weight each checkpoint's scores were multiplied by (see :func:`combine_scores`).
        combine: the rule: ``"normalized"``, ``"sum"`` or ``"weights"`` (given ones).
    """

    per_checkpoint: tuple[Scores, ...] = field(default=(), repr=False)
    weights: tuple[float, ...] = ()
    combine: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.weights) != len(self.per_checkpoint):
            raise ConfigurationError(
                f"CheckpointScores: {len(self.weights)} weights for {len(self.per_checkpoint)} checkpoints."
            )

    def contribution(self, index: int) -> Scores:
        """Checkpoint ``index``'s part of the combination, ``weights[index] × per_checkpoint[index]``.

        The contributions' per-layer parts sum over checkpoints to :attr:`per_layer` (up to rounding).
        """
        scores, weight = self.per_checkpoint[index], self.weights[index]
        per_token = None if scores.per_token is None else {n: weight * t for n, t in scores.per_token.items()}
        per_layer = {name: weight * part for name, part in scores.per_layer.items()}
        return Scores(per_layer, scores.method, dict(scores.damping), per_token, scores.ids)

    def __repr__(self) -> str:
        return f"{super().__repr__()}\n  {_rule_line(len(self.per_checkpoint), self.combine, self.weights)}"


def _rule_line(count: int, combine: str, weights: Sequence[float]) -> str:
    """How a combination's repr ends: the number of checkpoints, the rule and the weights."""
    shown = ", ".join(f"{w:.3g}" for w in weights)
    return f"{count} checkpoints combined by {combine!r} (weights {shown})"


def combine_scores(parts: Sequence[Scores], combine: Combine) -> CheckpointScores:
    """Combines the scores of ``K`` checkpoints (same queries, training examples and layers) by a rule.

    Args:
        parts: each checkpoint's scores, in order.
        combine: ``"normalized"``, ``"sum"`` or ``K`` weights (see the module docstring).

    Raises:
        ConfigurationError: an unknown rule, a wrong number of weights or a non-finite weight, or scores that do not
            line up (other layers or shapes).
    """
    weights, rule = _lined_up(parts, combine, "scores")
    first = parts[0]
    per_layer = {name: _weighted([s.per_layer[name] for s in parts], weights) for name in first.layers}
    per_token = None
    if all(s.per_token is not None for s in parts):
        per_token = {name: _weighted([s.per_token[name] for s in parts if s.per_token], weights) for name in per_layer}
    return CheckpointScores(
        per_layer, first.method, {}, per_token, first.ids, per_checkpoint=tuple(parts), weights=weights, combine=rule
    )


@dataclass(frozen=True, repr=False)
class CheckpointSelfScores(SelfScores):
    """:class:`SelfScores` combined over checkpoints, by the rules of :func:`combine_scores`.

    ``per_layer[l] = Σ_k weights[k] × per_checkpoint[k].per_layer[l]``; ``"normalized"`` divides each checkpoint's
    self-influence by the standard deviation of its ``total`` over the training examples.

    Attributes:
        per_checkpoint: each checkpoint's own self-influence, in the order of ``checkpoints=``.
        weights: the weight each checkpoint's values were multiplied by.
        combine: the rule: ``"normalized"``, ``"sum"`` or ``"weights"`` (given ones).
    """

    per_checkpoint: tuple[SelfScores, ...] = field(default=(), repr=False)
    weights: tuple[float, ...] = ()
    combine: str = "sum"

    def __repr__(self) -> str:
        return f"{super().__repr__()}\n  {_rule_line(len(self.per_checkpoint), self.combine, self.weights)}"


def combine_self_scores(parts: Sequence[SelfScores], combine: Combine) -> CheckpointSelfScores:
    """Combines the self-influence of ``K`` checkpoints (same training examples and layers) by a rule.

    Raises:
        ConfigurationError: as :func:`combine_scores`.
    """
    weights, rule = _lined_up(parts, combine, "self-influence")
    first = parts[0]
    per_layer = {name: _weighted([s.per_layer[name] for s in parts], weights) for name in first.layers}
    return CheckpointSelfScores(
        per_layer, first.method, {}, first.ids, per_checkpoint=tuple(parts), weights=weights, combine=rule
    )


def _lined_up(parts: Sequence[Scores | SelfScores], combine: Combine, what: str) -> tuple[tuple[float, ...], str]:
    """The weights and rule of :func:`combine_weights`, after checking the parts share their layers and shape."""
    if not parts:
        raise ConfigurationError("checkpoints= is empty: give at least one checkpoint.")
    first = parts[0]
    for index, part in enumerate(parts[1:], start=1):
        if part.layers != first.layers or tuple(part.shape) != tuple(first.shape):
            raise ConfigurationError(
                f"the {what} of checkpoint {index} ({list(part.shape)}, layers {part.layers}) does not line up with "
                f"checkpoint 0's ({list(first.shape)}, layers {first.layers})."
            )
    return combine_weights(parts, combine)


def combine_weights(parts: Sequence[Scores | SelfScores], combine: Combine) -> tuple[tuple[float, ...], str]:
    """Each checkpoint's weight under ``combine``, and the rule's name (``"weights"`` for given ones)."""
    given = check_combine(combine, len(parts))
    if given is not None:
        return given, "weights"
    if combine == "sum":
        return tuple(1.0 for _ in parts), "sum"
    spreads = [float(s.total.double().std(correction=0)) if s.total.numel() else 0.0 for s in parts]
    return tuple(1.0 / spread if spread > 0 else 0.0 for spread in spreads), "normalized"


def check_combine(combine: object, count: int) -> tuple[float, ...] | None:
    """Checks ``combine=`` for ``count`` checkpoints (before any pass runs); returns the given weights, if any.

    Raises:
        ConfigurationError: an unknown rule, or not one finite number per checkpoint.
    """
    if isinstance(combine, str):
        if combine not in RULES:
            raise ConfigurationError(f"combine={combine!r}: use one of {RULES} or one weight per checkpoint.")
        return None
    try:
        weights = tuple(float(w) for w in combine)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as err:
        raise ConfigurationError(
            f"combine={combine!r}: use one of {RULES} or a sequence of one number per checkpoint."
        ) from err
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise ConfigurationError(
            f"combine= gives {len(weights)} weights for {count} checkpoints; give one finite number for each."
        )
    return weights


def _weighted(parts: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ_k weights[k] × parts[k]``, accumulated in checkpoint order on the first part's device and dtype."""
    total = weights[0] * parts[0]
    for weight, part in zip(weights[1:], parts[1:], strict=True):
        total = total + weight * part.to(total.device)
    return total
