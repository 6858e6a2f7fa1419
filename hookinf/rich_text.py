"""Small rich pieces every table of hookinf uses: names shortened in the middle, tables that print as text.

* :class:`Label`: a layer name in a table cell. When the column is too narrow it is cut in the middle, in the part
  every name of the column shares (``base_mo…0.attention.self.query.lora_A``), so the end of the name, where LoRA
  and transformer layers differ, stays visible; rich's own overflow keeps only the start, and every row of
  ``encoder.layer.N.attention.self.*`` would read alike.
* :class:`Table`: a :class:`rich.table.Table` whose ``str()`` is the table drawn as plain text at the terminal's
  width, so ``print(scores.layer_table())`` shows the table, not ``<rich.table.Table object at …>``.
"""

from __future__ import annotations

import io
import shutil

import rich.table
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text

_ELLIPSIS = "…"
_MIN_LABEL = 24  # a label is never cut below this many characters


def middle_ellipsis(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by an ellipsis in the middle, keeping more of its end than its start.

    Args:
        text: the text (one line).
        width: the most characters to keep (``text`` itself when it fits; at least the ellipsis).
    """
    if len(text) <= width:
        return text
    if width <= 1:
        return _ELLIPSIS[:width]
    keep = width - 1
    head = keep // 3  # the end of a layer name tells layers apart (…query.lora_A vs …value.lora_B)
    return text[:head] + _ELLIPSIS + text[len(text) - (keep - head) :]


def shortened(names: list[str], width: int) -> list[str]:
    """``names`` each cut to ``width`` characters as a :class:`Label` in one column would be (shared prefix first)."""
    labels = [Label(name) for name in names]
    shared = _shared_prefix(names) if len(names) > 1 else 0
    for label in labels:
        label.shared = shared
    return [label.fit(width) for label in labels]


class Label:
    """A rich renderable of one-line text that, in a narrow cell, is cut in the middle (:func:`middle_ellipsis`).

    Args:
        text: the text, shown as given (rich markup in it is not interpreted).
        style: a rich style for the text.
    """

    def __init__(self, text: str, style: str = "") -> None:
        self.text = text
        self.style = style
        self.shared = 0  # characters this label shares with the others of its column (set by Table)

    def fit(self, width: int) -> str:
        """The text in at most ``width`` characters: whole, else cut in the prefix it shares, else in the middle."""
        text = self.text
        if len(text) <= width:
            return text
        own = text[self.shared :]  # what tells this label from the others of its column
        if len(own) + 1 < width:
            return text[: width - 1 - len(own)] + _ELLIPSIS + own
        if self.shared:
            return _ELLIPSIS + middle_ellipsis(own, width - 1)
        return middle_ellipsis(text, width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(len(self.text), _MIN_LABEL), len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(self.fit(options.max_width), style=self.style, no_wrap=True, overflow="crop")

    def __str__(self) -> str:
        return self.text


class Table(rich.table.Table):
    """A :class:`rich.table.Table` that prints as plain text with ``print`` and gives its names the room left.

    ``str(table)`` draws it without colour at the terminal's width (80 columns when there is no terminal). A column
    whose cells are all :class:`Label` s is sized first: the other columns keep their natural width and the names
    get what is left (at least 24 characters, at most their longest), cut in the middle when that is not enough.
    (Rich alone narrows the widest column first, which cuts every long name down to the same few characters.)
    """

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        labelled = [c for c in self.columns if c._cells and all(isinstance(cell, Label) for cell in c._cells)]
        if not labelled:
            yield from super().__rich_console__(console, options)
            return
        for column in labelled:
            labels = [cell for cell in column._cells if isinstance(cell, Label)]
            shared = _shared_prefix([label.text for label in labels]) if len(labels) > 1 else 0
            for label in labels:
                label.shared = shared
        longest = [max(len(cell.text) for cell in c._cells if isinstance(cell, Label)) for c in labelled]
        least = [min(n, _MIN_LABEL) for n in longest]
        given = [c.width for c in labelled]
        try:
            for column, width in zip(labelled, least, strict=True):
                column.width = width
            spare = options.max_width - Measurement.get(console, options, self).maximum
            for column, width, most in zip(labelled, least, longest, strict=True):
                grown = width + max(0, min(most - width, spare))
                column.width = grown
                spare -= grown - width
            yield from super().__rich_console__(console, options)
        finally:
            for column, fixed in zip(labelled, given, strict=True):
                column.width = fixed

    def __str__(self) -> str:
        width = shutil.get_terminal_size((80, 24)).columns
        buffer = io.StringIO()
        Console(file=buffer, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(self)
        return buffer.getvalue().rstrip("\n")


def _shared_prefix(texts: list[str]) -> int:
    """The length of the prefix all ``texts`` share, ended at a separator (``.``, ``/``, ``_``, space).

    So ``layer.1.x`` and ``layer.11.x`` share ``layer.``, not ``layer.1``.
    """
    first, last = min(texts), max(texts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    while n and first[n - 1] not in "./_ ":
        n -= 1
    return n
