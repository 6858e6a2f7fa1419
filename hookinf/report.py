"""Reports of influence results: rich renderables for the terminal, and HTML files.

* :func:`scores_report` (also :meth:`hookinf.Scores.report`): how concentrated influence is, the per-layer table,
  each detailed query's layer shares and its most harmful and most helpful training examples.
* :func:`suspects_report`: training examples ranked by self-influence (the mislabel signal), with the detection
  AUC when the true flips are known; :func:`comparison_table` compares methods.
* :func:`save_html` writes sections built by :mod:`hookinf.html` as one self-contained page;
  :func:`save_suspects_html` and :meth:`hookinf.Scores.save_html` are the one-section shortcuts.

Sign convention (as in :class:`~hookinf.Scores`): a positive score is *harmful* (up-weighting the training example
increases the query's loss), a negative one *helpful*.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.io import atomic_write
from hookinf.metrics import auc
from hookinf.scores import Scores

if TYPE_CHECKING:
    import numpy.typing as npt

    from hookinf.html import Section

DEFAULT_QUERIES = 3
"""How many queries a report details when ``queries=None``: the ones with the largest total |influence|."""


# ---------------------------------------------------------------------------------------------------- data
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
    shown: int
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
    _check_k(k)
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
            shown = int(ids[index]) if ids is not None else int(index)
            rows.append(ExampleRow(direction, rank, int(index), shown, float(value), layer, parts[layer]))
    return lists


def detection(self_scores: Tensor, flipped: Tensor) -> Detection:
    """AUC and top-``n_flipped`` precision of ``self_scores [n_train]`` for the known flips ``flipped [n_train]``."""
    values = check_self_scores(self_scores)
    flags = _check_flipped(flipped, values.numel())
    n_flipped = int(flags.sum())
    precision = float(flags[values.topk(n_flipped).indices].double().mean()) if n_flipped else 0.0
    return Detection(auc(values, flags), precision, n_flipped)


def check_self_scores(self_scores: Tensor) -> Tensor:
    """``self_scores`` as a finite float64 ``[n_train]`` CPU tensor, or a :class:`ConfigurationError`."""
    if not isinstance(self_scores, Tensor):
        raise ConfigurationError(f"self_scores must be a [n_train] tensor; got {type(self_scores).__name__}.")
    if self_scores.dim() != 1 or self_scores.numel() == 0:
        raise ConfigurationError(f"self_scores must be [n_train] with n_train >= 1; got {list(self_scores.shape)}.")
    values = self_scores.detach().cpu().double()
    if not bool(values.isfinite().all()):
        raise ConfigurationError("self_scores hold NaN or infinite values; every entry must be finite.")
    return values


def _check_flipped(flipped: Tensor, n_train: int) -> Tensor:
    if not isinstance(flipped, Tensor) or flipped.dtype != torch.bool or tuple(flipped.shape) != (n_train,):
        shape = list(flipped.shape) if isinstance(flipped, Tensor) else type(flipped).__name__
        raise ConfigurationError(
            f"flipped must be a bool tensor [n_train={n_train}] marking the known flips; got {shape}"
            + (f" of {flipped.dtype}" if isinstance(flipped, Tensor) else "")
            + "."
        )
    return flipped.detach().cpu()


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(f"k={k!r}: the number of examples per list must be a positive integer.")


def layer_label(name: str) -> str:
    """A layer's display name (``<model>`` for the unnamed whole-model layer)."""
    return name or "<model>"


# ---------------------------------------------------------------------------------------------------- terminal
def suspects_table(
    self_scores: Tensor,
    *,
    k: int = 10,
    flipped: Tensor | None = None,
    describe: Callable[[int], str] | None = None,
    title: str = "Top suspected mislabeled examples (highest self-influence)",
) -> Table:
    """The ``k`` training examples with the largest self-influence.

    Args:
        self_scores: ``[n_train]`` self-influence scores.
        k: how many rows.
        flipped: optional ``[n_train]`` booleans, the known label flips (adds a column).
        describe: optional function from a training index to a short text (label, content, ...).
        title: table title.
    """
    values_all = check_self_scores(self_scores)
    _check_k(k)
    flags = _check_flipped(flipped, values_all.numel()) if flipped is not None else None
    values, indices = values_all.topk(min(k, values_all.numel()))
    table = Table(title=title, title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("train index", justify="right")
    table.add_column("self-influence", justify="right")
    if describe is not None:
        table.add_column("example")
    if flags is not None:
        table.add_column("label flipped?")
    for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), start=1):
        row: list[RenderableType] = [str(rank), str(index), f"{value:.4g}"]
        if describe is not None:
            row.append(Text(describe(index)))
        if flags is not None:
            row.append("[red]yes[/red]" if bool(flags[index]) else "no")
        table.add_row(*row)
    return table


def suspects_report(
    self_scores: Tensor,
    *,
    flipped: Tensor | None = None,
    describe: Callable[[int], str] | None = None,
    k: int = 10,
    title: str | None = None,
) -> Group:
    """A terminal report of self-influence: a summary (with the detection AUC when the flips are known), top suspects.

    Args:
        self_scores: ``[n_train]`` self-influence, e.g. from :func:`hookinf.self_influence`.
        flipped: optional ``[n_train]`` bool, the known flipped labels; adds the AUC, the share of flips among the
            top ``n_flipped`` suspects, and a column marking the flips.
        describe: optional training index → short text (label, content, ...).
        k: how many suspects to list.
        title: the table's title.

    Returns:
        A rich renderable (``console.print`` it).
    """
    values = check_self_scores(self_scores)
    summary = f"{values.numel()} training examples ranked by self-influence g(z)ᵀ(G+λI)⁻¹g(z): the largest are the "
    summary += "examples the model finds hardest to fit (often mislabeled)."
    if flipped is not None:
        found = detection(values, flipped)
        summary += (
            f"\n[bold]AUC {found.auc:.3f}[/bold] for the {found.n_flipped} known flips (0.5 is chance); "
            f"{found.precision:.0%} of the top {found.n_flipped} suspects are flips."
        )
    table = suspects_table(
        values,
        k=k,
        flipped=flipped,
        describe=describe,
        title=title or "Top suspected mislabeled examples (highest self-influence)",
    )
    return Group(summary, table)


def comparison_table(rows: Sequence[tuple[str, float, float]], title: str = "Mislabel detection") -> Table:
    """Rows ``(method, AUC, precision among the top suspects)``."""
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    table.add_column("AUC", justify="right")
    table.add_column("flips among top suspects", justify="right")
    for method, auc_value, precision in rows:
        table.add_row(method, f"{auc_value:.3f}", f"{precision:.0%}")
    return table


def query_layers_table(scores: Scores, queries: Sequence[int], max_columns: int = 6) -> Table:
    """Per detailed query: its total |influence|, each layer's share of it and the layer that dominates.

    Args:
        scores: the scores.
        queries: query indices (rows).
        max_columns: with more layers than this, one column lists each query's three largest layers instead of one
            column per layer.
    """
    shares = scores.query_layer_shares()  # [n_query, L]
    mass = scores.total.abs().sum(dim=1)
    names = [layer_label(name) for name in scores.layers]
    table = Table(title="Detailed queries: each layer's share of the query's |influence|", title_justify="left")
    table.add_column("query", justify="right")
    table.add_column("Σ|influence|", justify="right")
    wide = len(names) <= max_columns
    if wide:
        for name in names:
            table.add_column(name, justify="right")
    else:
        table.add_column("largest layers")
    table.add_column("dominant layer")
    for q in queries:
        row = shares[q]
        cells = [str(q), f"{float(mass[q]):.4g}"]
        if wide:
            cells += [f"{float(s):.1%}" for s in row]
        else:
            order = row.argsort(descending=True)[:3].tolist()
            cells.append(", ".join(f"{names[i]} {float(row[i]):.0%}" for i in order))
        table.add_row(*cells[:2], *[Text(c) for c in cells[2:]], Text(names[int(row.argmax())]))
    return table


def top_examples_table(scores: Scores, query: int, k: int = 5, describe: Callable[[int], str] | None = None) -> Table:
    """The ``k`` most harmful and most helpful training examples for one query, with each one's largest layer part.

    Args:
        scores: the scores.
        query: the query's index.
        k: examples per direction.
        describe: optional training example (its id when the scores have ids, else its index) → short text.
    """
    harmful, helpful = example_rows(scores, query, k)
    table = Table(title=f"Query {query}: most harmful (+) and most helpful (−) training examples", title_justify="left")
    table.add_column("")
    table.add_column("train id" if scores.ids is not None else "train index", justify="right")
    table.add_column("score", justify="right")
    table.add_column("largest layer part", justify="left")
    if describe is not None:
        table.add_column("example")
    for row in harmful + helpful:
        style = "red" if row.direction == "harmful" else "green"
        cells: list[RenderableType] = [
            Text(row.direction, style=style),
            str(row.shown),
            f"{row.score:+.4g}",
            Text(f"{layer_label(row.layer)} ({row.part:+.3g})"),
        ]
        if describe is not None:
            cells.append(Text(describe(row.shown)))
        table.add_row(*cells)
    return table


def scores_report(
    scores: Scores,
    *,
    queries: int | Sequence[int] | None = None,
    k: int = 5,
    describe: Callable[[int], str] | None = None,
) -> Group:
    """A terminal report of influence scores.

    It holds a summary (method, sizes, how concentrated |influence| is), the per-layer table
    (:meth:`Scores.layer_table`), the detailed queries' layer shares (:func:`query_layers_table`) and, per detailed
    query, its ``k`` most harmful and ``k`` most helpful training examples (:func:`top_examples_table`).

    Args:
        scores: the scores.
        queries: which queries to detail (see :func:`select_queries`): by default the 3 with the largest total
            |influence|, which are the queries the training set moves most.
        k: examples per query and direction.
        describe: optional training example (its id when the scores have ids, else its index) → short text.

    Returns:
        A rich renderable (``console.print`` it).
    """
    _check_k(k)
    chosen = select_queries(scores, queries)
    n_query, n_train = scores.shape
    header = (
        f"[bold]{scores.method}[/bold] influence of {n_train} training examples on {n_query} queries, "
        f"{len(scores.layers)} layers. Positive scores are harmful (up-weighting the example raises the query's "
        f"loss), negative ones helpful. The top 1% of (query, example) pairs hold "
        f"{scores.concentration(0.01):.1%} of |influence| (top 10%: {scores.concentration(0.10):.1%})."
    )
    parts: list[RenderableType] = [header, scores.layer_table()]
    if chosen:
        parts.append(query_layers_table(scores, chosen))
    parts += [top_examples_table(scores, q, k, describe) for q in chosen]
    return Group(*parts)


# ---------------------------------------------------------------------------------------------------- HTML files
def save_html(path: str | os.PathLike[str], sections: Sequence[Section], *, title: str) -> Path:
    """Writes sections built by :mod:`hookinf.html` as one self-contained HTML page, atomically.

    Args:
        path: the ``.html`` file (its directory must exist).
        sections: e.g. ``[html.comparison_section(...), html.suspects_section(...), html.scores_section(...)]``.
        title: the page's title and top heading.

    Returns:
        The path written.
    """
    from hookinf.html import page

    text = page(title, sections)
    target = Path(path)

    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return target


def save_suspects_html(
    path: str | os.PathLike[str],
    self_scores: Tensor,
    *,
    flipped: Tensor | None = None,
    describe: Callable[[int], str] | None = None,
    images: Callable[[int], Tensor | npt.NDArray[Any]] | None = None,
    k: int = 20,
    title: str = "Suspected mislabeled examples",
) -> Path:
    """Writes the self-influence (mislabel) report as one self-contained HTML file.

    See :func:`hookinf.html.suspects_section` for the content and the arguments; needs matplotlib
    (``pip install 'hookinf[report]'``).

    Returns:
        The path written.
    """
    from hookinf.html import suspects_section

    section = suspects_section(self_scores, flipped=flipped, describe=describe, images=images, k=k)
    return save_html(path, [section], title=title)
