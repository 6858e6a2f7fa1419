"""Self-contained HTML reports: pure functions from influence results to HTML text.

A page (:func:`page`) is a title and :class:`Section` s: :func:`scores_section` (influence of the training set on
queries, per layer), :func:`suspects_section` (self-influence, the mislabel signal) and :func:`comparison_section`
(detection AUC per method). :func:`hookinf.report.save_html` writes a page to a file; :meth:`hookinf.Scores.save_html`
and :func:`hookinf.report.save_suspects_html` are the one-section shortcuts.

The page needs nothing at view time: no network (a Content-Security-Policy forbids it), no JavaScript. Plots are
matplotlib figures drawn with its SVG backend (:class:`matplotlib.figure.Figure` directly, never pyplot, so no GUI
backend and no global figure state) and inlined; thumbnails are ``data:image/png;base64`` URIs; every piece of user
text (descriptions, layer names, titles) is escaped. The plots summarise (bars, histograms, a heat map with one cell
per layer and query), so the file's size does not grow with the number of training examples.

Machine-readable values ride along as ``data-*`` attributes (``data-share`` on the per-layer rows, ``data-train`` and
``data-score`` on the top-k rows, ``data-auc``), so tests and scripts can read the numbers back exactly.

Needs matplotlib (``pip install 'hookinf[report]'``), imported when a section is built.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.report import (
    ExampleRow,
    check_self_scores,
    detection,
    example_rows,
    layer_label,
    select_queries,
)
from hookinf.scores import Scores

if TYPE_CHECKING:
    import numpy.typing as npt
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ImageFn = Callable[[int], "Tensor | npt.NDArray[Any]"]
"""Training example (or query) → image ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` with ``C`` in 1, 3, 4."""

_ANCHOR = re.compile(r"^[a-z][a-z0-9-]*$")
_MAX_LAYERS = 40  # plots show the 39 largest layers and group the rest beyond this
_THUMB_MAX = 64  # thumbnails are subsampled to at most this many pixels a side
_STYLE: dict[Any, Any] = {  # matplotlib rc parameters of the plots (text stays text in the SVG: small files)
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#888888",
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.frameon": False,
    "svg.fonttype": "none",
}


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
        _check_anchor(self.anchor)


def _check_anchor(anchor: str) -> None:
    if not isinstance(anchor, str) or not _ANCHOR.match(anchor):
        raise ConfigurationError(f"anchor={anchor!r} must start with a lowercase letter and hold only a-z, 0-9, '-'.")


# ---------------------------------------------------------------------------------------------------- page
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
    from hookinf import __version__

    toc = ""
    if len(sections) > 1:
        links = "".join(f'<li><a href="#{s.anchor}">{_e(s.heading)}</a></li>' for s in sections)
        toc = f'<nav class="toc"><ol>{links}</ol></nav>'
    body = "\n".join(f'<section id="{s.anchor}">\n<h2>{_e(s.heading)}</h2>\n{s.body}\n</section>' for s in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="hookinf {_e(__version__)}">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{_e(title)}</h1>\n{toc}\n{body}\n"
        f"<footer>Made by hookinf {_e(__version__)}: self-contained (no network, no JavaScript).</footer>\n"
        "</main>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------------- scores
def scores_section(
    scores: Scores,
    *,
    queries: int | Sequence[int] | None = None,
    k: int = 5,
    describe: Callable[[int], str] | None = None,
    images: ImageFn | None = None,
    describe_query: Callable[[int], str] | None = None,
    query_images: ImageFn | None = None,
    heading: str | None = None,
    anchor: str = "influence",
) -> Section:
    """The report of influence scores as a page section.

    Content: a summary (method, ``n_query × n_train``, layers, damping, concentration), how to read the signs; the
    per-layer table and a bar plot of each layer's share of |influence|; a layer × query heat map of the shares
    (every query); the distribution of |scores| (histogram on a log scale, harmful and helpful apart) and the
    concentration curve (share of |influence| held by the top fraction of pairs); then, per detailed query, its
    layer shares (plotted together for all detailed queries) and tables of its ``k`` most harmful and ``k`` most
    helpful training examples with score, largest layer part, description and thumbnail.

    Args:
        scores: the scores.
        queries: which queries to detail (see :func:`hookinf.report.select_queries`): by default the 3 with the
            largest total |influence|.
        k: training examples per query and direction.
        describe: training example (its id when the scores have ids, else its index) → short text.
        images: training example (as for ``describe``) → image, shown as a thumbnail (see :func:`thumbnail`).
        describe_query: query index → short text, shown in the query's heading.
        query_images: query index → image, shown next to the query's heading.
        heading: the section's heading (default names the method and the sizes).
        anchor: the section's id and the prefix of the ids inside it: ``{anchor}-layer-shares``,
            ``{anchor}-query-shares``, ``{anchor}-heatmap``, ``{anchor}-distribution`` (figures),
            ``{anchor}-layers`` (table), ``{anchor}-q{q}-harmful`` / ``-helpful`` (tables).

    Returns:
        The section.

    Raises:
        ConfigurationError: a bad ``queries``, ``k`` or ``anchor``, an image of a bad shape, or matplotlib missing.
    """
    _check_anchor(anchor)
    _require_matplotlib()
    chosen = select_queries(scores, queries)
    harmful_helpful = {q: example_rows(scores, q, k) for q in chosen}
    n_query, n_train = scores.shape
    shares = scores.layer_shares()
    query_shares = scores.query_layer_shares().cpu()  # [n_query, L]
    dominant = torch.bincount(query_shares.argmax(dim=1), minlength=len(scores.layers))
    total = scores.total.detach().cpu().double()
    positive = float((total > 0).double().mean())

    cards = [
        ("method", scores.method),
        ("queries × training examples", f"{n_query:,} × {n_train:,}"),
        ("layers", str(len(scores.layers))),
        ("damping λ", _damping_text(scores.damping)),
        ("top 1% of pairs hold", f"{scores.concentration(0.01):.1%} of |influence|"),
        ("top 10% of pairs hold", f"{scores.concentration(0.10):.1%} of |influence|"),
        ("harmful pairs (score > 0)", f"{positive:.1%}"),
    ]
    out = [_cards(cards)]
    out.append(
        '<p class="note">A score is the change in the query\'s loss when the training example is up-weighted: '
        '<span class="harmful">positive = harmful</span> (the example pushes the query\'s loss up), '
        '<span class="helpful">negative = helpful</span>. Each layer contributes its own part; the parts sum to '
        "the score, and a layer's <em>share</em> is its part of the total |influence|.</p>"
    )

    # per-layer table and plots
    out.append("<h3>Layers</h3>")
    rows = []
    largest = max(shares.values()) or 1.0
    for idx, name in enumerate(scores.layers):
        lam = scores.damping.get(name)
        share = shares[name]
        rows.append(
            f'<tr data-layer="{_e(name)}" data-share="{share!r}">'
            f"<td>{_e(layer_label(name))}</td>"
            f'<td class="num"><span class="bar" style="width:{80 * share / largest:.1f}px"></span>{share:.1%}</td>'
            f'<td class="num">{float(scores.per_layer[name].sum()):.4g}</td>'
            f'<td class="num">{int(dominant[idx])}</td>'
            f'<td class="num">{"—" if lam is None else f"{lam:.3g}"}</td></tr>'
        )
    out.append(
        f'<table id="{anchor}-layers" class="layers"><thead><tr><th>layer</th><th>share of |influence|</th>'
        "<th>signed sum</th><th>dominates queries</th><th>λ</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    names = [layer_label(n) for n in scores.layers]
    colors = _layer_colors(len(names))
    out.append(
        _figure_html(
            f"{anchor}-layer-shares",
            _layer_shares_svg(names, list(shares.values()), colors, salt=f"{anchor}-layer-shares"),
            "Each layer's share of the total |influence| over all (query, training example) pairs.",
        )
    )
    out.append(
        _figure_html(
            f"{anchor}-heatmap",
            _heatmap_svg(names, query_shares, salt=f"{anchor}-heatmap"),
            "Each layer's share of each query's |influence| (columns: queries in order; each column sums to 100%; the "
            "darkest colour is the largest share).",
        )
    )

    # distribution
    out.append("<h3>Distribution</h3>")
    out.append(
        _figure_html(
            f"{anchor}-distribution",
            _distribution_svg(total, salt=f"{anchor}-distribution"),
            "Left: how many (query, training example) pairs have each |score| (log scale), harmful and helpful "
            "apart. Right: the share of the total |influence| held by the top fraction of pairs; a curve that "
            "rises early means a few training examples carry most of the influence.",
        )
    )

    # detailed queries
    if chosen:
        out.append(f"<h3>Detailed queries ({len(chosen)})</h3>")
        how = "chosen" if isinstance(queries, Sequence) else "with the largest total |influence|"
        out.append(f'<p class="note">Queries {how}: {", ".join(str(q) for q in chosen)}.</p>')
        out.append(
            _figure_html(
                f"{anchor}-query-shares",
                _query_shares_svg(chosen, names, query_shares, colors, salt=f"{anchor}-query-shares"),
                "Each layer's share of the detailed queries' |influence|.",
            )
        )
        mass = total.abs().sum(dim=1)
        for q in chosen:
            lists = harmful_helpful[q]
            picture = query_images(q) if query_images is not None else None
            head = f"Query {q}" + (f": {describe_query(q)}" if describe_query is not None else "")
            out.append(_query_html(scores, q, head, picture, lists, float(mass[q]), names, query_shares[q], anchor))
            out.append(_top_tables(scores, q, lists, describe, images, anchor))
    title = heading or f"Influence on {n_query:,} queries ({scores.method})"
    return Section(anchor, title, "\n".join(out))


def _query_html(
    scores: Scores,
    q: int,
    head: str,
    picture: Tensor | npt.NDArray[Any] | None,
    lists: tuple[list[ExampleRow], list[ExampleRow]],
    mass: float,
    names: list[str],
    shares: Tensor,
    anchor: str,
) -> str:
    """A detailed query's heading (picture, description) and layer shares; the tables follow (:func:`_top_tables`)."""
    image = f" {_img(picture, f'query {q}')}" if picture is not None else ""
    order = shares.argsort(descending=True).tolist()
    parts = " · ".join(f"{_e(names[i])} {float(shares[i]):.0%}" for i in order if float(shares[i]) >= 0.005)
    return (
        f'<div class="query" id="{anchor}-q{q}">\n<h4>{image}<span>{_e(head)}</span></h4>\n'
        f'<p class="note">Σ|influence| {mass:.4g}; by layer: {parts or "—"}</p>'
    )


def _top_tables(
    scores: Scores,
    q: int,
    lists: tuple[list[ExampleRow], list[ExampleRow]],
    describe: Callable[[int], str] | None,
    images: ImageFn | None,
    anchor: str,
) -> str:
    """The harmful and helpful tables of one detailed query, side by side; closes the query's ``div``."""
    out = ['<div class="pair">']
    ident = "train id" if scores.ids is not None else "train"
    for rows, direction, sign in ((lists[0], "harmful", "+"), (lists[1], "helpful", "−")):
        header = f"<th>#</th><th>{ident}</th>"
        header += "<th></th>" if images is not None else ""
        header += "<th>example</th>" if describe is not None else ""
        header += "<th>score</th><th>largest layer part</th>"
        body = []
        for row in rows:
            cells = f'<td class="num">{row.rank}</td><td class="num">{row.shown}</td>'
            if images is not None:
                cells += f"<td>{_img(images(row.shown), f'training example {row.shown}')}</td>"
            if describe is not None:
                cells += f'<td class="example">{_e(describe(row.shown))}</td>'
            cells += (
                f'<td class="num {direction}">{row.score:+.4g}</td>'
                f'<td>{_e(layer_label(row.layer))} <span class="muted">({row.part:+.3g})</span></td>'
            )
            body.append(f'<tr data-train="{row.shown}" data-score="{row.score!r}">{cells}</tr>')
        out.append(
            f'<div><h5 class="{direction}">Most {direction} ({sign})</h5>'
            f'<table id="{anchor}-q{q}-{direction}" class="topk"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )
    out.append("</div></div>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- suspects
def suspects_section(
    self_scores: Tensor,
    *,
    flipped: Tensor | None = None,
    describe: Callable[[int], str] | None = None,
    images: ImageFn | None = None,
    k: int = 20,
    heading: str = "Suspected mislabeled examples (highest self-influence)",
    anchor: str = "suspects",
) -> Section:
    """Training examples ranked by self-influence, the mislabel signal, as a page section.

    Content: a summary (and, when the flips are known, the detection AUC and the share of flips among the top
    ``n_flipped`` suspects), a histogram of self-influence (flipped and clean apart when known) with the ROC curve,
    and the table of the ``k`` top suspects.

    Args:
        self_scores: ``[n_train]`` self-influence, e.g. from :func:`hookinf.self_influence`.
        flipped: optional ``[n_train]`` bool, the known flipped labels.
        describe: training index → short text.
        images: training index → image, shown as a thumbnail (see :func:`thumbnail`).
        k: how many suspects to list.
        heading: the section's heading.
        anchor: the section's id and id prefix: ``{anchor}-plot`` (figure), ``{anchor}-table`` (table, one
            ``<tr data-train data-score>`` per suspect); the AUC is in ``data-auc`` of ``{anchor}-auc``.

    Returns:
        The section.

    Raises:
        ConfigurationError: bad shapes or values, or matplotlib missing.
    """
    _check_anchor(anchor)
    _require_matplotlib()
    values = check_self_scores(self_scores)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(f"k={k!r}: the number of suspects to list must be a positive integer.")
    n_train = values.numel()
    cards = [("training examples", f"{n_train:,}")]
    found = detection(values, flipped) if flipped is not None else None
    flags = flipped.detach().cpu() if flipped is not None else None
    if found is not None:
        cards += [
            ("known flips", f"{found.n_flipped:,}"),
            ("AUC (0.5 = chance)", f'<span id="{anchor}-auc" data-auc="{found.auc!r}">{found.auc:.3f}</span>'),
            (f"flips among the top {found.n_flipped}", f"{found.precision:.0%}"),
        ]
    out = [_cards(cards, raw=True)]
    out.append(
        '<p class="note">Self-influence g(z)ᵀ(G+λI)⁻¹g(z) is large for training examples the model finds hard to '
        "fit; mislabeled examples are the usual reason. The list is a ranking to review, largest first.</p>"
    )
    out.append(
        _figure_html(
            f"{anchor}-plot",
            _suspects_svg(values, flags, salt=f"{anchor}-plot"),
            "Self-influence of every training example"
            + (" (flipped and clean apart) and the ROC curve of ranking by it." if flags is not None else "."),
        )
    )
    top_values, top_indices = values.topk(min(k, n_train))
    header = "<th>rank</th><th>train</th>" + ("<th></th>" if images is not None else "")
    header += ("<th>example</th>" if describe is not None else "") + "<th>self-influence</th>"
    header += "<th>flipped?</th>" if flags is not None else ""
    body = []
    for rank, (value, index) in enumerate(zip(top_values.tolist(), top_indices.tolist(), strict=True), start=1):
        cells = f'<td class="num">{rank}</td><td class="num">{index}</td>'
        if images is not None:
            cells += f"<td>{_img(images(index), f'training example {index}')}</td>"
        if describe is not None:
            cells += f'<td class="example">{_e(describe(index))}</td>'
        cells += f'<td class="num">{value:.4g}</td>'
        if flags is not None:
            cells += '<td class="harmful">yes</td>' if bool(flags[index]) else '<td class="muted">no</td>'
        body.append(f'<tr data-train="{index}" data-score="{value!r}">{cells}</tr>')
    out.append(
        f'<table id="{anchor}-table" class="suspects"><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    return Section(anchor, heading, "\n".join(out))


def comparison_section(
    rows: Sequence[tuple[str, float, float]],
    *,
    heading: str = "Mislabel detection per method",
    note: str | None = None,
    anchor: str = "comparison",
) -> Section:
    """A table comparing methods at finding known-bad training examples.

    Args:
        rows: ``(name, AUC, share of flips among the top suspects)`` per method (as for
            :func:`hookinf.report.comparison_table`).
        heading: the section's heading.
        note: optional sentence under the table (plain text).
        anchor: the section's id; the table is ``{anchor}-table``, each row carries ``data-auc``.

    Returns:
        The section.
    """
    _check_anchor(anchor)
    body = []
    for name, auc_value, precision in rows:
        width = max(0.0, min(1.0, (auc_value - 0.5) / 0.5)) * 100
        body.append(
            f'<tr data-auc="{auc_value!r}"><td>{_e(name)}</td>'
            f'<td class="num"><span class="bar" style="width:{width:.1f}px"></span>{auc_value:.3f}</td>'
            f'<td class="num">{precision:.0%}</td></tr>'
        )
    table = (
        f'<table id="{anchor}-table" class="comparison"><thead><tr><th>method</th><th>AUC</th>'
        f"<th>flips among top suspects</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
    extra = f'<p class="note">{_e(note)}</p>' if note else ""
    return Section(anchor, heading, table + extra)


# ---------------------------------------------------------------------------------------------------- images
def thumbnail(image: Tensor | npt.NDArray[Any]) -> str:
    """A ``data:image/png;base64,...`` URI of an image, subsampled to at most 64 pixels a side.

    Args:
        image: ``[H, W]`` (grey), ``[H, W, C]`` or ``[C, H, W]`` with ``C`` in 1, 3, 4; float or integer. A grey
            image in ``[0, 1]`` (float) or ``[0, 255]`` (uint8) is shown on that scale, other grey images are
            scaled from their minimum to their maximum; float colour images are clipped to ``[0, 1]``.

    Returns:
        The data URI.

    Raises:
        ConfigurationError: the array has another shape or holds NaN / infinity.
    """
    return _png_uri(_image_array(image))


def _image_array(image: Tensor | npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The image as a checked ``[H, W]`` or ``[H, W, 3|4]`` numpy array."""
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # [C, H, W] → [H, W, C]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise ConfigurationError(
            f"images(...) returned shape {list(arr.shape)}; an image must be [H, W], [H, W, C] or [C, H, W] with "
            f"C in 1, 3, 4."
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.number) or (
        np.issubdtype(arr.dtype, np.floating) and not bool(np.isfinite(arr).all())
    ):
        raise ConfigurationError(f"images(...) returned {arr.dtype} values with NaN/infinity or non-numbers.")
    return arr


def _png_uri(arr: npt.NDArray[Any]) -> str:
    """A PNG data URI of a checked image array, subsampled to at most ``_THUMB_MAX`` pixels a side."""
    from matplotlib.image import imsave

    step = math.ceil(max(arr.shape[:2]) / _THUMB_MAX)
    arr = arr[::step, ::step]
    buf = io.BytesIO()
    if arr.ndim == 2:
        lo, hi = float(arr.min()), float(arr.max())
        if arr.dtype == np.uint8:
            lo, hi = 0.0, 255.0
        elif lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        imsave(buf, arr.astype(np.float64), format="png", cmap="gray", vmin=lo, vmax=hi)
    else:
        if arr.dtype != np.uint8:
            arr = np.clip(arr.astype(np.float64), 0.0, 1.0)
        imsave(buf, arr, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: Tensor | npt.NDArray[Any], alt: str) -> str:
    arr = _image_array(image)
    css = "thumb pixelated" if max(arr.shape[:2]) < 32 else "thumb"  # blocky pixels for tiny images, not blur
    return f'<img class="{css}" alt="{_e(alt)}" src="{_png_uri(arr)}">'


# ---------------------------------------------------------------------------------------------------- plots
def _require_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as err:
        raise ConfigurationError(
            "the HTML report draws its plots with matplotlib, which is not installed: pip install 'hookinf[report]'."
        ) from err


@contextmanager
def _figure(width: float, height: float, salt: str) -> Iterator[tuple[Figure, list[str]]]:
    """A matplotlib Figure in the report's style; the list receives its SVG text when the block ends.

    A fixed ``svg.hashsalt`` makes the SVG's ids deterministic (the same page for the same scores), and every id is
    prefixed with ``salt`` so that several SVGs can share one HTML page.
    """
    import matplotlib
    from matplotlib.figure import Figure

    rc: dict[Any, Any] = {**_STYLE, "svg.hashsalt": "hookinf"}
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(width, height), layout="constrained")
        result: list[str] = []
        yield fig, result
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    # matplotlib numbers its ids per figure (figure_1, axes_1, ...): prefix them so a page's ids stay unique
    text = re.sub(r'(\sid="|url\(#|href="#)', lambda m: f"{m.group(1)}{salt}-", text)
    result.append(text)


def _figure_html(fig_id: str, svg: str, caption: str) -> str:
    return f'<figure id="{fig_id}" class="plot">{svg}<figcaption>{_e(caption)}</figcaption></figure>'


def _layer_colors(n: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [to_hex(cmap(i % cmap.N)) for i in range(n)]


def _grouped(names: list[str], values: list[float]) -> tuple[list[str], list[float], list[int]]:
    """At most ``_MAX_LAYERS`` entries: the largest layers in model order, the rest summed as ``other``."""
    if len(names) <= _MAX_LAYERS:
        return names, values, list(range(len(names)))
    keep = sorted(np.argsort(values)[::-1][: _MAX_LAYERS - 1].tolist())
    kept = set(keep)
    rest = sum(v for i, v in enumerate(values) if i not in kept)
    return (
        [names[i] for i in keep] + [f"other ({len(names) - len(keep)} layers)"],
        [values[i] for i in keep] + [rest],
        keep,
    )


def _layer_shares_svg(names: list[str], shares: list[float], colors: list[str], salt: str) -> str:
    labels, values, kept = _grouped(names, shares)
    bar_colors = [colors[i] for i in kept] + ["#bbbbbb"] * (len(labels) - len(kept))
    with _figure(9.6, 0.9 + 0.3 * len(labels), salt) as (fig, svg):
        ax = fig.add_subplot()
        positions = np.arange(len(labels))
        ax.barh(positions, values, color=bar_colors, height=0.7)
        ax.set_yticks(positions, labels)
        ax.invert_yaxis()
        ax.set_xlim(0, max(1e-12, max(values)) * 1.15)
        ax.xaxis.set_major_formatter(_percent())
        for y, value in zip(positions, values, strict=True):
            ax.text(value, float(y), f" {value:.1%}", va="center", fontsize=9)
        ax.set_xlabel("share of |influence|")
    return svg[0]


def _query_shares_svg(queries: list[int], names: list[str], shares: Tensor, colors: list[str], salt: str) -> str:
    rows = shares[queries].numpy()  # [n_detail, L]
    labels, _, kept = _grouped(names, rows.sum(axis=0).tolist())
    legend_rows = math.ceil(len(labels) / 5)
    with _figure(9.6, 0.9 + 0.3 * len(queries) + 0.25 * legend_rows, salt) as (fig, svg):
        ax = fig.add_subplot()
        positions = np.arange(len(queries))
        left = np.zeros(len(queries))
        kept_set = set(kept)
        columns = [rows[:, i] for i in kept]
        if len(kept) < len(names):
            columns.append(rows[:, [i for i in range(len(names)) if i not in kept_set]].sum(axis=1))
        for label, column, color in zip(labels, columns, [colors[i] for i in kept] + ["#bbbbbb"], strict=False):
            ax.barh(positions, column, left=left, color=color, height=0.7, label=label)
            for y, (start, width) in enumerate(zip(left, column, strict=True)):
                if width >= 0.08:
                    ax.text(start + width / 2, y, f"{width:.0%}", ha="center", va="center", fontsize=8, color="white")
            left = left + column
        ax.set_yticks(positions, [f"query {q}" for q in queries])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(_percent())
        fig.legend(loc="outside lower center", ncols=min(5, len(labels)), fontsize=9)
    return svg[0]


def _heatmap_svg(names: list[str], shares: Tensor, salt: str) -> str:
    from matplotlib.ticker import MaxNLocator

    data = shares.numpy().T  # [L, n_query]
    labels, _, kept = _grouped(names, data.sum(axis=1).tolist())
    if len(kept) < len(names):
        rest = [i for i in range(len(names)) if i not in set(kept)]
        data = np.concatenate([data[kept], data[rest].sum(axis=0, keepdims=True)])
    n_query = data.shape[1]
    with _figure(9.6, 1.1 + 0.3 * len(labels), salt) as (fig, svg):
        ax = fig.add_subplot()
        image = ax.imshow(
            data,
            aspect="auto",
            interpolation="nearest",
            cmap="Blues",
            vmin=0.0,
            vmax=max(float(data.max()), 1e-12),  # with many layers every share is small: use the whole scale
            extent=(-0.5, n_query - 0.5, len(labels) - 0.5, -0.5),
        )
        ax.set_yticks(np.arange(len(labels)), labels)
        ax.set_xlabel("query")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for side in ("top", "right", "left", "bottom"):
            ax.spines[side].set_visible(False)
        bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, format=_percent())
        bar.outline.set_visible(False)
    return svg[0]


def _distribution_svg(total: Tensor, salt: str) -> str:
    flat = total.flatten()
    magnitude = flat.abs()
    nonzero = magnitude[magnitude > 0]
    with _figure(9.6, 3.2, salt) as (fig, svg):
        left, right = fig.subplots(1, 2)
        if nonzero.numel():
            lo, hi = float(nonzero.min()), float(nonzero.max())
            if hi <= lo:
                hi = lo * 10
            bins = np.geomspace(lo, hi, 61)
            for sign, label, color in ((1, "harmful (> 0)", "#c0392b"), (-1, "helpful (< 0)", "#1e8449")):
                part = (flat[flat * sign > 0].abs()).numpy()
                counts, _ = np.histogram(part, bins=bins)
                left.stairs(counts, bins, color=color, label=f"{label}: {part.size:,}", linewidth=1.4)
            left.set_xscale("log")
            left.legend(fontsize=9)
        left.set_xlabel("|score|")
        left.set_ylabel("pairs")
        _concentration_curve(right, magnitude)
    return svg[0]


def _concentration_curve(ax: Axes, magnitude: Tensor) -> None:
    ordered = magnitude.sort(descending=True).values.double()
    n = ordered.numel()
    mass = float(ordered.sum()) or 1.0
    cumulative = ordered.cumsum(0) / mass
    counts = np.unique(np.geomspace(1, n, num=min(n, 200)).round().astype(np.int64))
    fractions = counts / n
    ax.plot(fractions, cumulative[counts - 1].numpy(), color="#4c78a8", linewidth=1.6)
    ax.plot(fractions, fractions, color="#999999", linestyle=":", linewidth=1, label="if all were equal")
    at = max(1, round(0.01 * n))
    share = float(cumulative[at - 1])
    ax.scatter([at / n], [share], color="#c0392b", zorder=3, s=16)
    ax.annotate(
        f"top 1%: {share:.0%}",
        (at / n, share),
        xytext=(8, -12),
        textcoords="offset points",
        fontsize=9,
        color="#c0392b",
    )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(_percent())
    ax.set_xlabel("top fraction of pairs (by |score|)")
    ax.set_ylabel("share of |influence|")
    ax.legend(loc="upper left", fontsize=9)


def _suspects_svg(values: Tensor, flags: Tensor | None, salt: str) -> str:
    data = values.numpy()
    with _figure(9.6, 3.2, salt) as (fig, svg):
        if flags is None:
            left = fig.add_subplot()
            right = None
        else:
            left, right = fig.subplots(1, 2)
        positive = data[data > 0]
        log = positive.size == data.size and float(positive.max()) > float(positive.min())
        lo, hi = float(data.min()), float(data.max())
        bins = np.geomspace(lo, hi, 51) if log else np.linspace(lo - (hi <= lo), hi + (hi <= lo), 51)
        groups = [("all", data, "#4c78a8")]
        if flags is not None:
            mask = flags.numpy()
            groups = [("clean", data[~mask], "#4c78a8"), ("flipped", data[mask], "#c0392b")]
        for label, part, color in groups:
            counts, _ = np.histogram(part, bins=bins)
            left.stairs(counts, bins, color=color, label=f"{label}: {part.size:,}", linewidth=1.4, fill=False)
        if log:
            left.set_xscale("log")
        left.set_xlabel("self-influence")
        left.set_ylabel("training examples")
        left.legend(fontsize=9)
        if right is not None and flags is not None:
            fpr, tpr = _roc(values, flags)
            found = detection(values, flags)
            right.plot(fpr, tpr, color="#c0392b", linewidth=1.6, label=f"AUC {found.auc:.3f}")
            right.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="chance")
            right.set_xlabel("false positive rate (clean examples flagged)")
            right.set_ylabel("true positive rate (flips found)")
            right.set_xlim(0, 1)
            right.set_ylim(0, 1.02)
            right.legend(loc="lower right", fontsize=9)
    return svg[0]


def _roc(values: Tensor, flags: Tensor) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """ROC curve points (at most ~500) of ranking by ``values`` against ``flags``."""
    order = values.argsort(descending=True)
    hits = flags[order].double()
    tpr = torch.cat([torch.zeros(1, dtype=torch.float64), hits.cumsum(0) / max(1.0, float(hits.sum()))])
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - hits).cumsum(0) / max(1.0, float((1 - hits).sum()))])
    keep = np.unique(np.linspace(0, len(tpr) - 1, num=min(len(tpr), 500)).round().astype(np.int64))
    return fpr.numpy()[keep], tpr.numpy()[keep]


def _percent() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


# ---------------------------------------------------------------------------------------------------- text
def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _damping_text(damping: dict[str, float]) -> str:
    if not damping:
        return "— (none)"
    values = list(damping.values())
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if lo == hi else f"{lo:.3g} … {hi:.3g} (per layer)"


def _cards(cards: list[tuple[str, str]], raw: bool = False) -> str:
    """Summary cards; values are escaped unless ``raw`` (then they are trusted HTML built here)."""
    items = "".join(
        f'<div class="card"><div class="label">{_e(label)}</div>'
        f'<div class="value">{value if raw else _e(value)}</div></div>'
        for label, value in cards
    )
    return f'<div class="cards">{items}</div>'


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
