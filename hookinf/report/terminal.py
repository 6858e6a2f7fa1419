"""Influence results in the terminal: rich tables and reports (``rich.console.Console().print`` them).

* :func:`scores_report` (also :meth:`hookinf.Scores.report`): how concentrated influence is, the per-layer table
  (:func:`layer_table`, also :meth:`hookinf.Scores.layer_table`), each detailed query's layer shares and its most
  harmful and most helpful training examples.
* :func:`suspects_report`: training examples ranked by self-influence (the mislabel signal), with the detection
  AUC when the true flips are known; :func:`comparison_table` compares methods.

Sign convention (as in :class:`~hookinf.Scores`): a positive score is *harmful* (up-weighting the training example
increases the query's loss), a negative one *helpful*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.console import Group, RenderableType
from rich.text import Text
from torch import Tensor

from hookinf.report.content import (
    check_finite_scores,
    check_flipped,
    check_k,
    check_self_scores,
    detection,
    example_rows,
    layer_label,
    saved_describe,
    select_queries,
    self_shown,
)
from hookinf.rich_text import Label, Table
from hookinf.scores import Scores
from hookinf.self_scores import SelfScores


def layer_table(scores: Scores, title: str | None = None) -> Table:
    """A rich table: per layer, its share of |influence|, signed sum, and how many queries it dominates.

    Also :meth:`hookinf.Scores.layer_table`, and what printing :class:`~hookinf.Scores` with rich shows. The table
    prints as text with ``print`` too; layer names too long for the terminal are cut in the middle, keeping their
    ends (:class:`~hookinf.rich_text.Label`).

    Args:
        scores: the scores.
        title: the table's title (default names the method).
    """
    table = Table(title=title or f"Per-layer influence ({scores.method})", title_justify="left")
    table.add_column("layer")
    table.add_column("share of |influence|", justify="right")
    table.add_column("signed sum", justify="right")
    table.add_column("dominates queries", justify="right")
    table.add_column("λ", justify="right")
    dominant = torch.bincount(scores.query_layer_shares().argmax(dim=1), minlength=len(scores.per_layer))
    for idx, (name, share) in enumerate(scores.layer_shares().items()):
        finite = math.isfinite(share)
        lam = scores.damping.get(name)
        table.add_row(
            Label(layer_label(name)),
            f"{share:6.1%} {'█' * round(20 * share)}" if finite else "not finite",
            f"{float(scores.per_layer[name].sum()):.4g}",
            str(int(dominant[idx])),
            "—" if lam is None else f"{lam:.3g}",
        )
    return table


def suspects_table(
    self_scores: Tensor | SelfScores,
    *,
    k: int = 10,
    flipped: Tensor | None = None,
    describe: Callable[[Any], str] | None = None,
    title: str = "Top suspected mislabeled examples (highest self-influence)",
) -> Table:
    """The ``k`` training examples with the largest self-influence.

    Args:
        self_scores: :class:`~hookinf.SelfScores` from :func:`hookinf.self_influence`, or ``[n_train]`` scores.
        k: how many rows.
        flipped: optional ``[n_train]`` booleans, the known label flips, one per entry (adds a column).
        describe: optional function from a training example (its id when ``self_scores`` has ids, else its index)
            to a short text (label, content, ...).
        title: table title.
    """
    values_all = check_self_scores(self_scores)
    check_k(k)
    flags = check_flipped(flipped, values_all.numel()) if flipped is not None else None
    values, indices = values_all.topk(min(k, values_all.numel()))
    shown = self_shown(self_scores, indices.tolist())
    has_ids = isinstance(self_scores, SelfScores) and self_scores.ids is not None
    table = Table(title=title, title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("train id" if has_ids else "train index", justify="right")
    table.add_column("self-influence", justify="right")
    if describe is not None:
        table.add_column("example")
    if flags is not None:
        table.add_column("label flipped?")
    for rank, (value, index, who) in enumerate(zip(values.tolist(), indices.tolist(), shown, strict=True), start=1):
        row: list[RenderableType] = [str(rank), Text(str(who)), f"{value:.4g}"]
        if describe is not None:
            row.append(Text(describe(who)))
        if flags is not None:
            row.append("[red]yes[/red]" if bool(flags[index]) else "no")
        table.add_row(*row)
    return table


def suspects_report(
    self_scores: Tensor | SelfScores,
    *,
    flipped: Tensor | None = None,
    describe: Callable[[Any], str] | None = None,
    k: int = 10,
    title: str | None = None,
) -> Group:
    """A terminal report of self-influence: a summary (with the detection AUC when the flips are known), top suspects.

    Args:
        self_scores: :class:`~hookinf.SelfScores` from :func:`hookinf.self_influence`, or ``[n_train]`` scores.
        flipped: optional ``[n_train]`` bool, the known flipped labels; adds the AUC, the share of flips among the
            top ``n_flipped`` suspects, and a column marking the flips.
        describe: optional training example (its id when ``self_scores`` has ids, else its index) → short text.
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
        self_scores,
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


def top_examples_table(scores: Scores, query: int, k: int = 5, describe: Callable[[Any], str] | None = None) -> Table:
    """The ``k`` most harmful and most helpful training examples for one query, with each one's largest layer part.

    Args:
        scores: the scores.
        query: the query's index.
        k: examples per direction.
        describe: optional training example (its id when the scores have ids, else its index) → short text; by
            default the text the scores' descriptions hold, if any (:meth:`hookinf.Scores.with_descriptions`).
    """
    harmful, helpful = example_rows(scores, query, k)
    describe = describe or saved_describe(scores)
    title = f"Query {query}: most harmful (+) and most helpful (−) training examples"
    about = scores.descriptions.query_summary(query) if scores.descriptions is not None else None
    table = Table(title=Text(title + (f"\n{about}" if about else "")), title_justify="left")
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
            Label(f"{layer_label(row.layer)} ({row.part:+.3g})"),
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
    describe: Callable[[Any], str] | None = None,
) -> Group:
    """A terminal report of influence scores.

    It holds a summary (method, sizes, how concentrated |influence| is), the per-layer table
    (:func:`layer_table`), the detailed queries' layer shares (:func:`query_layers_table`) and, per detailed
    query, its ``k`` most harmful and ``k`` most helpful training examples (:func:`top_examples_table`).

    Args:
        scores: the scores.
        queries: which queries to detail (see :func:`~hookinf.report.content.select_queries`): by default the 3
            with the largest total |influence|, which are the queries the training set moves most.
        k: examples per query and direction.
        describe: optional training example (its id when the scores have ids, else its index) → short text; by
            default the text the scores' descriptions hold, if any.

    Returns:
        A rich renderable (``console.print`` it).
    """
    check_k(k)
    check_finite_scores(scores)
    chosen = select_queries(scores, queries)
    n_query, n_train = scores.shape
    header = (
        f"[bold]{scores.method}[/bold] influence of {n_train} training examples on {n_query} queries, "
        f"{len(scores.layers)} layers. Positive scores are harmful (up-weighting the example raises the query's "
        f"loss), negative ones helpful. The top 1% of (query, example) pairs hold "
        f"{scores.concentration(0.01):.1%} of |influence| (top 10%: {scores.concentration(0.10):.1%})."
    )
    parts: list[RenderableType] = [header, layer_table(scores)]
    if chosen:
        parts.append(query_layers_table(scores, chosen))
    parts += [top_examples_table(scores, q, k, describe) for q in chosen]
    return Group(*parts)
