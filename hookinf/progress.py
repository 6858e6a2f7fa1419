"""Rich progress bars over passes through data, silenced with ``progress=False``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def track(items: Iterable[T], description: str, *, enabled: bool, unit: str = "batches") -> Iterator[T]:
    """Yields ``items`` while showing a transient progress bar (items done / total when known).

    Args:
        items: the batches (or other work items).
        description: what the pass does (``"fit exact"``, ``"score"``).
        unit: what one item is, shown after the count.
        enabled: ``False`` shows nothing; nothing is shown either when the output is not a terminal (logs, CI).
    """
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield from items
        return
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
