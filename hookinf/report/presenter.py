"""The report package's :class:`~hookinf.presenter.ScoresPresenter`: how :class:`~hookinf.Scores` prints and saves.

:mod:`hookinf.report` registers a :class:`ReportPresenter` when it is imported, which gives ``Scores.report()``,
``Scores.save_html()``, ``Scores.layer_table()`` and printing with rich their renderings without
:mod:`hookinf.scores` importing any of this package.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hookinf.presenter import Describe, ImageFn, Queries
from hookinf.report.html import scores_section
from hookinf.report.page import save_html
from hookinf.report.terminal import layer_table, scores_report
from hookinf.scores import Scores


class ReportPresenter:
    """Renders :class:`~hookinf.Scores` with :mod:`hookinf.report.terminal` and :mod:`hookinf.report.html`."""

    def layer_table(self, scores: Scores, title: str | None) -> Table:
        """:func:`hookinf.report.terminal.layer_table`."""
        return layer_table(scores, title)

    def report(
        self, scores: Scores, *, queries: Queries, k: int, describe: Describe | None, console: Console | None
    ) -> None:
        """Prints :func:`hookinf.report.terminal.scores_report` to ``console`` (``None``: a new terminal console)."""
        (console or Console()).print(scores_report(scores, queries=queries, k=k, describe=describe))

    def save_html(
        self,
        scores: Scores,
        path: str | os.PathLike[str],
        *,
        title: str | None,
        describe: Describe | None,
        images: ImageFn | None,
        queries: Queries,
        k: int,
        describe_query: Describe | None,
        query_images: ImageFn | None,
    ) -> Path:
        """Writes a page of one :func:`hookinf.report.html.scores_section` (default title: names the method)."""
        section = scores_section(
            scores,
            queries=queries,
            k=k,
            describe=describe,
            images=images,
            describe_query=describe_query,
            query_images=query_images,
        )
        return save_html(path, [section], title=title or f"hookinf influence report ({scores.method})")
