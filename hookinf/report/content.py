"""What a report shows, whatever it is drawn on: the detailed queries, their top-k rows, detection figures.

The terminal report (:mod:`hookinf.report.terminal`) and the HTML page (:mod:`hookinf.report.html`) both build on
these functions, so they show the same queries, examples and numbers. The detection AUC comes from
:func:`hookinf.metrics.auc` (the metrics exist once); this module adds the share of known flips among the top
suspects and the checks of the report's arguments.

Sign convention (as in :class:`~hookinf.Scores`): a positive score is *harmful* (up-weighting the training example
increases the query's loss), a negative one *helpful*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError, DataError
from hookinf.ids import id_values
from hookinf.metrics import auc
from hookinf.scores import Scores
from hookinf.self_scores import SelfScores

DEFAULT_QUERIES = 3
"""How many queries a report details when ``queries=None``: the ones with the largest total |influence|."""

HEATMAP_COLUMNS = 250
"""The most columns of the layer × query heat map; more queries are averaged in blocks (:func:`heatmap_columns`)."""


@dataclass(frozen=True)
class ExampleRow:
    """One training example in a query's top-k list.

    Attributes:
        direction: ``"harmful"`` (positive score) or ``"helpful"`` (negative score) list it belongs to.
        rank: 1-based rank within that list.
        index: the training example's column in the scores.
        shown: what identifies it to the user: its id when the scores have ids, else ``index``.
        score: its total influence on the query.
        layer: the layer whose part of the score is largest in magnitude.
        part: that layer's part.
    """

    direction: Literal["harmful", "helpful"]
    rank: int
    index: int
    shown: int | str
    score: float
    layer: str
    part: float


@dataclass(frozen=True)
class Detection:
    """How well self-influence finds known-bad training examples (e.g. flipped labels).

    Attributes:
        auc: area under the ROC curve of self-influence against the known flips (0.5 is chance).
        precision: share of flips among the ``n_flipped`` examples with the largest self-influence.
        n_flipped: how many training examples are known to be flipped.
    """

    auc: float
    precision: float
    n_flipped: int


def select_queries(scores: Scores, queries: int | Sequence[int] | None) -> list[int]:
    """The queries a report details.

    Args:
        scores: the scores.
        queries: ``None`` for the :data:`DEFAULT_QUERIES` queries with the largest total |influence|; an ``int``
            ``n`` for the ``n`` largest (:meth:`Scores.top_queries`, largest first); or a sequence of query
            indices, kept in the given order.

    Returns:
        Query indices (rows of ``scores.total``).

    Raises:
        ConfigurationError: a negative count, or an index that is not an integer in ``[0, n_query)``.
    """
    if queries is None:
        return scores.top_queries(DEFAULT_QUERIES)
    if isinstance(queries, int) and not isinstance(queries, bool):
        if queries < 0:
            raise ConfigurationError(f"queries={queries}: the number of queries to detail must be >= 0.")
        return scores.top_queries(queries)
    if isinstance(queries, str | bytes) or not isinstance(queries, Sequence):
        raise ConfigurationError(
            f"queries={queries!r} must be None, a number of queries, or a sequence of query indices."
        )
    n_query = scores.shape[0]
    chosen: list[int] = []
    for q in queries:
        if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q < n_query:
            raise ConfigurationError(
                f"queries={list(queries)!r}: {q!r} is not a query index; the scores have queries 0 … {n_query - 1}."
            )
        chosen.append(q)
    return chosen


def misclassified_queries(scores: Scores, n: int) -> list[int]:
    """The ``n`` misclassified queries (saved prediction ≠ saved label) with the largest total |influence|.

    Raises:
        ConfigurationError: the scores carry no query labels and predictions
            (:meth:`hookinf.Scores.with_descriptions`).
    """
    if scores.descriptions is None:
        raise ConfigurationError(
            "choosing the misclassified queries needs the queries' labels and predictions, and these scores carry no "
            "descriptions: scores.with_descriptions(query_labels=..., query_predictions=...) before saving."
        )
    wrong = set(scores.descriptions.misclassified())
    return [q for q in scores.top_queries(scores.shape[0]) if q in wrong][:n]


def saved_describe(scores: Scores) -> Callable[[Any], str] | None:
    """Training example (id when the scores have ids, else index) → the text its descriptions hold; ``None``: none."""
    texts = scores.descriptions.train_text if scores.descriptions is not None else None
    if texts is None:
        return None
    column = _column_of(scores)
    return lambda example: texts[column(example)]


def saved_images(scores: Scores) -> Callable[[Any], Tensor] | None:
    """Training example (as for :func:`saved_describe`) → its saved picture; ``None`` when there are none."""
    images = scores.descriptions.train_images if scores.descriptions is not None else None
    if images is None:
        return None
    column = _column_of(scores)
    return lambda example: images[column(example)]


def saved_query_describe(scores: Scores) -> Callable[[Any], str] | None:
    """Query index → its saved text, label and prediction (``"label 3, predicted 5 · text"``); ``None``: none."""
    described = scores.descriptions
    if described is None or described.query_summary(0) is None:
        return None
    return lambda q: described.query_summary(q) or ""


def saved_query_images(scores: Scores) -> Callable[[Any], Tensor] | None:
    """Query index → its saved picture; ``None`` when there are none."""
    images = scores.descriptions.query_images if scores.descriptions is not None else None
    return None if images is None else lambda q: images[q]


def _column_of(scores: Scores) -> Callable[[Any], int]:
    """Training example as reports show it (its id, or its index without ids) → its column."""
    if scores.ids is None:
        return int
    columns = {value: j for j, value in enumerate(id_values(scores.ids))}
    return columns.__getitem__


def heatmap_columns(shares: Tensor, max_columns: int = HEATMAP_COLUMNS) -> tuple[Tensor, int]:
    """The layer × query heat map's columns: every query, or the means of blocks of consecutive queries.

    A column per query turns into a barcode past a few hundred queries; beyond ``max_columns`` queries, each
    column is the mean share of a block of ``ceil(n_query / max_columns)`` consecutive queries (the last block may
    be shorter).

    Args:
        shares: ``[n_query, L]``, :meth:`hookinf.Scores.query_layer_shares`.
        max_columns: the most columns drawn.

    Returns:
        ``([n_columns, L] shares, queries per column)``; ``1`` query per column when nothing was aggregated.
    """
    n_query = int(shares.shape[0])
    if n_query <= max_columns:
        return shares, 1
    block = math.ceil(n_query / max_columns)
    return torch.stack([part.mean(dim=0) for part in shares.split(block)]), block


def example_rows(scores: Scores, query: int, k: int) -> tuple[list[ExampleRow], list[ExampleRow]]:
    """The ``k`` most harmful and ``k`` most helpful training examples of one query, with their largest layer part.

    Args:
        scores: the scores.
        query: the query's index.
        k: rows per list (at most ``n_train``).

    Returns:
        ``(harmful, helpful)``, each ordered as :meth:`Scores.top_k` orders them (largest score first; most negative
        first).
    """
    check_k(k)
    row = scores.total[query]
    k = min(k, row.numel())
    harmful_scores, harmful = row.topk(k, largest=True)  # as Scores.top_k, for this one query
    helpful_scores, helpful = row.topk(k, largest=False)
    ids = scores.ids
    lists: tuple[list[ExampleRow], list[ExampleRow]] = ([], [])
    sources: tuple[tuple[Literal["harmful", "helpful"], Tensor, Tensor], ...] = (
        ("harmful", harmful, harmful_scores),
        ("helpful", helpful, helpful_scores),
    )
    for rows, (direction, indices, values) in zip(lists, sources, strict=True):
        for rank, (index, value) in enumerate(zip(indices.tolist(), values.tolist(), strict=True), start=1):
            parts = {name: float(part[query, index]) for name, part in scores.per_layer.items()}
            layer = max(parts, key=lambda n: abs(parts[n]))
            shown = int(index) if ids is None else ids[index] if isinstance(ids, list) else int(ids[index])
            rows.append(ExampleRow(direction, rank, int(index), shown, float(value), layer, parts[layer]))
    return lists


def detection(self_scores: Tensor | SelfScores, flipped: Tensor) -> Detection:
    """AUC and top-``n_flipped`` precision of ``self_scores [n_train]`` for the known flips ``flipped [n_train]``."""
    values = check_self_scores(self_scores)
    flags = check_flipped(flipped, values.numel())
    n_flipped = int(flags.sum())
    precision = float(flags[values.topk(n_flipped).indices].double().mean()) if n_flipped else 0.0
    return Detection(auc(values, flags), precision, n_flipped)


def check_self_scores(self_scores: Tensor | SelfScores) -> Tensor:
    """``self_scores`` (or a :class:`SelfScores`' total) as a finite float64 ``[n_train]`` CPU tensor.

    Raises:
        ConfigurationError: not a ``[n_train]`` tensor of finite values.
    """
    if isinstance(self_scores, SelfScores):
        self_scores = self_scores.total
    if not isinstance(self_scores, Tensor):
        raise ConfigurationError(f"self_scores must be a [n_train] tensor; got {type(self_scores).__name__}.")
    if self_scores.dim() != 1 or self_scores.numel() == 0:
        raise ConfigurationError(f"self_scores must be [n_train] with n_train >= 1; got {list(self_scores.shape)}.")
    values = self_scores.detach().cpu().double()
    if not bool(values.isfinite().all()):
        raise ConfigurationError("self_scores hold NaN or infinite values; every entry must be finite.")
    return values


def self_shown(self_scores: Tensor | SelfScores, indices: list[int]) -> list[int | str]:
    """What identifies the entries ``indices`` of self-influence to the user: their ids when it has ids, else them."""
    ids = self_scores.ids if isinstance(self_scores, SelfScores) else None
    if ids is None:
        return list(indices)
    return [ids[i] if isinstance(ids, list) else int(ids[i]) for i in indices]


def check_finite_scores(scores: Scores) -> None:
    """A :class:`DataError` naming the non-finite entries of ``scores`` (their count, first layer, query and example).

    A report ranks, sums and shares scores; one NaN or infinity makes every share and ranking meaningless, so a
    report says so instead of drawing them.
    """
    for name, part in scores.per_layer.items():
        bad = ~part.isfinite()
        if bool(bad.any()):
            query, example = (int(i) for i in bad.nonzero()[0])
            total = sum(int((~p.isfinite()).sum()) for p in scores.per_layer.values())
            raise DataError(
                f"the scores are not finite: {total} entr{'y is' if total == 1 else 'ies are'} NaN or infinite (the "
                f"first in layer '{layer_label(name)}', query {query}, training example {example}), so no share or "
                f"ranking can be reported. Typical causes: a damping too small for a singular curvature "
                f"(raise damping=), or non-finite model outputs for that query."
            )


def check_flipped(flipped: Tensor, n_train: int) -> Tensor:
    """``flipped`` as a bool ``[n_train]`` CPU tensor, or a :class:`ConfigurationError`."""
    if not isinstance(flipped, Tensor) or flipped.dtype != torch.bool or tuple(flipped.shape) != (n_train,):
        shape = list(flipped.shape) if isinstance(flipped, Tensor) else type(flipped).__name__
        raise ConfigurationError(
            f"flipped must be a bool tensor [n_train={n_train}] marking the known flips; got {shape}"
            + (f" of {flipped.dtype}" if isinstance(flipped, Tensor) else "")
            + "."
        )
    return flipped.detach().cpu()


def check_k(k: int) -> None:
    """A :class:`ConfigurationError` unless ``k``, the number of examples per list, is a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(f"k={k!r}: the number of examples per list must be a positive integer.")


def damping_text(damping: dict[str, float]) -> str:
    """The damping of a report's summary: one value, or the range over the layers."""
    if not damping:
        return "— (none)"
    values = list(damping.values())
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if lo == hi else f"{lo:.3g} … {hi:.3g} (per layer)"


def layer_label(name: str) -> str:
    """A layer's display name (``<model>`` for the unnamed whole-model layer)."""
    return name or "<model>"
