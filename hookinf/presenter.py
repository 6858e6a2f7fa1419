"""The seam between results and their renderers: what :class:`~hookinf.Scores` needs to print and save itself.

Results know no presentation: :mod:`hookinf.scores` imports no rendering code, yet ``Scores.report()``,
``Scores.save_html()``, ``Scores.layer_table()`` and printing a :class:`~hookinf.Scores` with rich stay one call
away. They ask the :class:`ScoresPresenter` registered here with :func:`use_presenter`; :mod:`hookinf.report`
registers its own when it is imported (``import hookinf`` imports it), so the renderers depend on the results and
never the reverse. This module holds only that protocol, the registry and the types of the conveniences'
arguments; it imports nothing from hookinf but the errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from torch import Tensor

from hookinf.errors import ConfigurationError

if TYPE_CHECKING:
    import numpy.typing as npt
    from rich.console import Console
    from rich.table import Table

    from hookinf.scores import Scores

Describe: TypeAlias = Callable[[Any], str]
"""A training example (its id when the scores have ids, else its index) or a query index → a short text."""

ImageFn: TypeAlias = Callable[[Any], "Tensor | npt.NDArray[Any]"]
"""Training example (or query) → image ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` with ``C`` in 1, 3, 4."""

Queries: TypeAlias = int | Sequence[int] | None
"""Which queries a report details: ``None`` for the default few with the largest total |influence|, an ``int`` ``n``
for the ``n`` largest, or a sequence of query indices (see :func:`hookinf.report.content.select_queries`)."""


class ScoresPresenter(Protocol):
    """Renders :class:`~hookinf.Scores` for its conveniences; :mod:`hookinf.report` registers one.

    Each method takes the scores, then the arguments of the :class:`~hookinf.Scores` method of the same name, as
    given to it.
    """

    def layer_table(self, scores: Scores, title: str | None) -> Table:
        """The per-layer rich table (:meth:`hookinf.Scores.layer_table`)."""

    def report(
        self, scores: Scores, *, queries: Queries, k: int, describe: Describe | None, console: Console | None
    ) -> None:
        """Prints the terminal report (:meth:`hookinf.Scores.report`)."""

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
        """Writes the HTML report and returns its path (:meth:`hookinf.Scores.save_html`)."""


_registered: ScoresPresenter | None = None


def use_presenter(presenter: ScoresPresenter | None) -> ScoresPresenter | None:
    """Sets what renders :class:`~hookinf.Scores` for its conveniences; returns the presenter it replaces.

    :mod:`hookinf.report` calls it when it is imported. Another renderer may take its place; ``None`` unsets it (the
    conveniences then raise a :class:`~hookinf.ConfigurationError`).

    Args:
        presenter: the presenter, or ``None``.

    Returns:
        The presenter registered before, or ``None``.
    """
    global _registered
    previous, _registered = _registered, presenter
    return previous


def presenter_for(what: str) -> ScoresPresenter:
    """The registered presenter, for the convenience ``what`` (named in the error when there is none).

    Raises:
        ConfigurationError: no presenter is registered; the message says to ``import hookinf.report``.
    """
    if _registered is None:
        raise ConfigurationError(
            f"{what} needs a presenter and none is registered: import hookinf.report (import hookinf does it), or "
            "register one with hookinf.presenter.use_presenter."
        )
    return _registered
