"""Self-contained HTML pages: a title and :class:`Section` s, written as one file that needs nothing to be viewed.

:func:`page` makes the document (embedded CSS, a title, a table of contents when there are two sections or more)
and :func:`save_html` writes it atomically; the sections come from :mod:`hookinf.report.html`. The page needs
nothing at view time: no network (a Content-Security-Policy forbids it), no JavaScript; every piece of user text
is escaped (:func:`escape`).
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hookinf._version import __version__
from hookinf.errors import ConfigurationError, HookinfError
from hookinf.io import write_atomically

_ANCHOR = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class Section:
    """One section of a report page.

    Attributes:
        anchor: the section's id (lowercase letters, digits, dashes), also the prefix of the ids inside it.
        heading: its heading (plain text; escaped when rendered).
        body: its HTML.
    """

    anchor: str
    heading: str
    body: str

    def __post_init__(self) -> None:
        check_anchor(self.anchor)


def check_anchor(anchor: str) -> None:
    """A :class:`ConfigurationError` unless ``anchor`` is a valid section id (lowercase letters, digits, dashes)."""
    if not isinstance(anchor, str) or not _ANCHOR.match(anchor):
        raise ConfigurationError(f"anchor={anchor!r} must start with a lowercase letter and hold only a-z, 0-9, '-'.")


def page(title: str, sections: Sequence[Section]) -> str:
    """A complete HTML document: embedded CSS, a title, a table of contents (with two or more sections), sections.

    Args:
        title: the page's title (plain text).
        sections: the sections, in order; their anchors must differ.

    Returns:
        The HTML text.
    """
    anchors = [s.anchor for s in sections]
    if len(set(anchors)) != len(anchors):
        raise ConfigurationError(f"section anchors must differ; got {anchors}. Pass anchor=... to the sections.")
    toc = ""
    if len(sections) > 1:
        links = "".join(f'<li><a href="#{s.anchor}">{escape(s.heading)}</a></li>' for s in sections)
        toc = f'<nav class="toc"><ol>{links}</ol></nav>'
    body = "\n".join(f'<section id="{s.anchor}">\n<h2>{escape(s.heading)}</h2>\n{s.body}\n</section>' for s in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="hookinf {escape(__version__)}">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{escape(title)}</h1>\n{toc}\n{body}\n"
        f"<footer>Made by hookinf {escape(__version__)}: self-contained (no network, no JavaScript).</footer>\n"
        "</main>\n</body>\n</html>\n"
    )


def save_html(path: str | os.PathLike[str], sections: Sequence[Section], *, title: str) -> Path:
    """Writes sections as one self-contained HTML page, atomically.

    Args:
        path: the ``.html`` file (its directory must exist).
        sections: e.g. ``[comparison_section(...), suspects_section(...), scores_section(...)]`` from
            :mod:`hookinf.report.html`.
        title: the page's title and top heading.

    Returns:
        The path written.

    Raises:
        HookinfError: the file cannot be written (names it; chained from the ``OSError``); an existing file at
            ``path`` is left as it was.
    """
    text = page(title, sections)
    target = Path(path)
    try:
        write_atomically(target, lambda sink: sink.write(text.encode("utf-8")))
    except OSError as err:
        raise HookinfError(
            f"{target}: cannot write the HTML report ({err.strerror or err}); the file keeps what it held before. "
            f"Fix the cause (e.g. free disk space, an existing directory) and save again."
        ) from err
    return target


def figure_html(fig_id: str, svg: str, caption: str) -> str:
    """A ``<figure>`` with the id ``fig_id`` holding an inline SVG and its caption (plain text, escaped)."""
    return f'<figure id="{fig_id}" class="plot">{svg}<figcaption>{escape(caption)}</figcaption></figure>'


def escape(text: object) -> str:
    """``text`` as HTML text or attribute value (``&``, ``<``, ``>``, quotes escaped)."""
    return html.escape(str(text), quote=True)


def summary_cards(entries: list[tuple[str, str]], raw: bool = False) -> str:
    """Summary cards ``(label, value)``; values are escaped unless ``raw`` (then they are trusted HTML of a section)."""
    items = "".join(
        f'<div class="card"><div class="label">{escape(label)}</div>'
        f'<div class="value">{value if raw else escape(value)}</div></div>'
        for label, value in entries
    )
    return f'<div class="cards">{items}</div>'


def require_matplotlib() -> None:
    """A :class:`ConfigurationError` with the fix when matplotlib, which draws the plots, is not installed."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as err:
        raise ConfigurationError(
            "the HTML report draws its plots with matplotlib, which is not installed: pip install 'hookinf[report]'."
        ) from err


_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --border: #d1d9e0; --alt: #f6f8fa; --accent: #4c78a8;
        --harmful: #b03a2e; --helpful: #1e7b45; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Roboto, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 1.75em; margin: 0 0 0.4em; }
h2 { font-size: 1.35em; margin: 1.8em 0 0.6em; padding-bottom: 0.25em; border-bottom: 1px solid var(--border); }
h3 { font-size: 1.1em; margin: 1.5em 0 0.5em; }
h4 { font-size: 1em; margin: 1.4em 0 0.3em; display: flex; align-items: center; gap: 10px; }
h5 { font-size: 0.9em; margin: 0.6em 0 0.3em; }
nav.toc ol { margin: 0.2em 0 1em; padding-left: 1.4em; }
nav.toc a, a { color: var(--accent); }
.note, figcaption, footer, .muted { color: var(--muted); }
.note { font-size: 0.92em; margin: 0.4em 0 0.8em; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 10px; margin: 0.8em 0; }
.card { border: 1px solid var(--border); border-radius: 8px; padding: 8px 12px; background: var(--alt); }
.card .label { font-size: 0.8em; color: var(--muted); }
.card .value { font-size: 1.15em; font-weight: 600; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.4em 0 1em; }
th { text-align: left; font-weight: 600; border-bottom: 2px solid var(--border); padding: 5px 10px; }
td { padding: 4px 10px; border-bottom: 1px solid var(--border); vertical-align: middle; }
tbody tr:nth-child(even) { background: var(--alt); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.example { max-width: 28em; overflow-wrap: anywhere; }
.harmful { color: var(--harmful); }
.helpful { color: var(--helpful); }
.bar { display: inline-block; height: 0.7em; background: var(--accent); border-radius: 2px; margin-right: 8px;
       vertical-align: baseline; }
figure.plot { margin: 0.8em 0 1.2em; }
figure.plot svg { display: block; width: 100%; height: auto; }
figcaption { font-size: 0.85em; margin-top: 0.2em; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 8px 28px; }
.pair table { width: 100%; }
@media (max-width: 900px) { .pair { grid-template-columns: 1fr; } }
img.thumb { width: 36px; height: 36px; object-fit: contain; border: 1px solid var(--border); border-radius: 3px;
            background: #fff; display: block; }
h4 img.thumb { width: 44px; height: 44px; }
img.pixelated { image-rendering: pixelated; }
footer { margin-top: 3em; font-size: 0.8em; border-top: 1px solid var(--border); padding-top: 0.6em; }
"""
