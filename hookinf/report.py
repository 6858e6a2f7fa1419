"""Rich renderings of influence results for the terminal."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.scores import Scores


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
    if self_scores.dim() != 1:
        raise ConfigurationError(f"self_scores must be [n_train]; got {list(self_scores.shape)}.")
    k = min(k, self_scores.numel())
    values, indices = self_scores.topk(k)
    table = Table(title=title, title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("train index", justify="right")
    table.add_column("self-influence", justify="right")
    if describe is not None:
        table.add_column("example")
    if flipped is not None:
        table.add_column("label flipped?")
    for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), start=1):
        row = [str(rank), str(index), f"{value:.4g}"]
        if describe is not None:
            row.append(describe(index))
        if flipped is not None:
            row.append("[red]yes[/red]" if bool(flipped[index]) else "no")
        table.add_row(*row)
    return table


def comparison_table(rows: Sequence[tuple[str, float, float]], title: str = "Mislabel detection") -> Table:
    """Rows ``(method, AUC, precision among the top suspects)``."""
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    table.add_column("AUC", justify="right")
    table.add_column("flips among top suspects", justify="right")
    for method, auc_value, precision in rows:
        table.add_row(method, f"{auc_value:.3f}", f"{precision:.0%}")
    return table


def top_examples_table(scores: Scores, query: int, k: int = 5) -> Table:
    """The ``k`` most harmful and most helpful training examples for one query, with each layer's part."""
    top = scores.top_k(k)
    ids = scores.ids
    table = Table(title=f"Query {query}: most harmful (+) and most helpful (−) training examples", title_justify="left")
    table.add_column("")
    table.add_column("train id" if ids is not None else "train index", justify="right")
    table.add_column("score", justify="right")
    table.add_column("largest layer part", justify="left")
    rows = [
        ("harmful", top.harmful[query], top.harmful_scores[query]),
        ("helpful", top.helpful[query], top.helpful_scores[query]),
    ]
    for label, indices, values in rows:
        for index, value in zip(indices.tolist(), values.tolist(), strict=True):
            parts = {name: float(part[query, index]) for name, part in scores.per_layer.items()}
            layer = max(parts, key=lambda n: abs(parts[n]))
            shown = int(ids[index]) if ids is not None else index
            table.add_row(label, str(shown), f"{value:+.4g}", f"{layer or '<model>'} ({parts[layer]:+.3g})")
    return table


def scores_report(scores: Scores, *, queries: int = 3, k: int = 5) -> Group:
    """A terminal report: per-layer table, how concentrated influence is, and the top examples of a few queries."""
    n_query, n_train = scores.shape
    header = (
        f"[bold]{scores.method}[/bold] influence of {n_train} training examples on {n_query} queries, "
        f"{len(scores.layers)} layers. The top 1% of (query, example) pairs hold "
        f"{scores.concentration(0.01):.1%} of |influence| (top 10%: {scores.concentration(0.10):.1%})."
    )
    parts: list[RenderableType] = [header, scores.layer_table()]
    parts += [top_examples_table(scores, q, k) for q in range(min(queries, n_query))]
    return Group(*parts)
