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


class PassProgress:
    """A transient progress bar for one pass over data: batches done / total and examples per second.

    Use as a context manager; call :meth:`advance` after each batch with its number of examples. Shows nothing when
    disabled or when the output is not a terminal.
    """

    def __init__(self, description: str, total: int | None, *, enabled: bool) -> None:
        console = Console(stderr=True)
        self._bar: Progress | None = None
        if enabled and console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("batches · {task.fields[examples]} examples · {task.fields[rate]} ex/s"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._task = self._bar.add_task(description, total=total, examples=0, rate="—")
        self._examples = 0

    def __enter__(self) -> PassProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, examples: int) -> None:
        """Marks one batch of ``examples`` examples as done."""
        self._examples += examples
        if self._bar is not None:
            elapsed = self._bar.tasks[0].elapsed or 0.0
            rate = f"{self._examples / elapsed:,.0f}" if elapsed > 0 else "—"
            self._bar.update(self._task, advance=1, examples=self._examples, rate=rate)
