"""Rich renderings of influence results for the terminal."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.table import Table
from torch import Tensor

from hookinf.errors import ConfigurationError


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
