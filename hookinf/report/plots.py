"""The HTML page's plots: matplotlib figures drawn with its SVG backend, returned as SVG text to inline.

Figures are :class:`matplotlib.figure.Figure` objects made directly, never through pyplot, so there is no GUI backend
and no global figure state; a fixed hash salt and per-plot id prefixes make the SVG the same for the same data and
keep ids unique on a page. The plots summarise (bars, histograms, a heat map with one cell per layer and query, or
per layer and block of queries past a few hundred), so their size does not grow with the number of examples.

This module imports numpy and matplotlib (the ``report`` extra): :mod:`hookinf.report.html` loads it when it draws
a section, so that ``import hookinf`` needs neither.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from torch import Tensor

from hookinf.metrics import roc_curve
from hookinf.report.content import detection

if TYPE_CHECKING:
    import numpy.typing as npt
    from matplotlib.axes import Axes

_MAX_LAYERS = 40  # plots show the 39 largest layers and group the rest beyond this
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


@contextmanager
def _figure(width: float, height: float, salt: str) -> Iterator[tuple[Figure, list[str]]]:
    """A matplotlib Figure in the report's style; the list receives its SVG text when the block ends.

    A fixed ``svg.hashsalt`` makes the SVG's ids deterministic (the same page for the same scores), and every id is
    prefixed with ``salt`` so that several SVGs can share one HTML page.
    """
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


def layer_colors(n: int) -> list[str]:
    """``n`` distinct colours (hex), one per layer in model order, shared by the plots of one section."""
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


def query_shares_svg(queries: list[int], names: list[str], shares: Tensor, colors: list[str], salt: str) -> str:
    """One stacked bar per detailed query: each layer's share of that query's |influence|.

    Args:
        queries: the detailed queries (rows of ``shares``), top to bottom.
        names: ``[L]`` layer labels, model order.
        shares: ``[n_query, L]`` float64 CPU, :meth:`hookinf.Scores.query_layer_shares`.
        colors: ``[L]`` the layers' colours (:func:`layer_colors`).
        salt: prefix of the SVG's ids, unique on the page.
    """
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


def heatmap_svg(names: list[str], shares: Tensor, block: int, salt: str) -> str:
    """A layer × query heat map of each layer's share of each query's |influence|.

    Args:
        names: ``[L]`` layer labels, model order (rows).
        shares: ``[n_columns, L]`` float64 CPU: :meth:`hookinf.Scores.query_layer_shares`, or the means of blocks of
            ``block`` consecutive queries (:func:`hookinf.report.content.heatmap_columns`).
        block: queries per column (``1``: a column per query); above 1 the plot's title and axis say so.
        salt: prefix of the SVG's ids, unique on the page.
    """
    data = shares.numpy().T  # [L, n_columns]
    labels, _, kept = _grouped(names, data.sum(axis=1).tolist())
    if len(kept) < len(names):
        rest = [i for i in range(len(names)) if i not in set(kept)]
        data = np.concatenate([data[kept], data[rest].sum(axis=0, keepdims=True)])
    n_columns = data.shape[1]
    left = -0.5 if block == 1 else 0.0  # x in query numbers: a column per query, or per block of queries
    with _figure(9.6, 1.1 + 0.3 * len(labels) + (0.3 if block > 1 else 0.0), salt) as (fig, svg):
        ax = fig.add_subplot()
        image = ax.imshow(
            data,
            aspect="auto",
            interpolation="nearest",
            cmap="Blues",
            vmin=0.0,
            vmax=max(float(data.max()), 1e-12),  # with many layers every share is small: use the whole scale
            extent=(left, left + n_columns * block, len(labels) - 0.5, -0.5),
        )
        ax.set_yticks(np.arange(len(labels)), labels)
        if block == 1:
            ax.set_xlabel("query")
        else:
            ax.set_title(f"Aggregated: each column is the mean of {block} consecutive queries", loc="left")
            ax.set_xlabel(f"query (columns: blocks of {block})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for side in ("top", "right", "left", "bottom"):
            ax.spines[side].set_visible(False)
        bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, format=_percent())
        bar.outline.set_visible(False)
    return svg[0]


def distribution_svg(total: Tensor, salt: str) -> str:
    """Histograms of |score| (log scale, harmful and helpful apart) beside the concentration curve of |influence|.

    Args:
        total: ``[n_query, n_train]`` float64 CPU scores.
        salt: prefix of the SVG's ids, unique on the page.
    """
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


def suspects_svg(values: Tensor, flags: Tensor | None, salt: str) -> str:
    """A histogram of self-influence (flipped and clean apart when known) and, with ``flags``, the ROC curve.

    Args:
        values: ``[n_train]`` float64 CPU self-influence.
        flags: ``[n_train]`` bool CPU known flips (with both classes present), or ``None``.
        salt: prefix of the SVG's ids, unique on the page.
    """
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
            fpr, tpr = _roc_points(values, flags)
            found = detection(values, flags)
            right.plot(fpr, tpr, color="#c0392b", linewidth=1.6, label=f"AUC {found.auc:.3f}")
            right.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="chance")
            right.set_xlabel("false positive rate (clean examples flagged)")
            right.set_ylabel("true positive rate (flips found)")
            right.set_xlim(0, 1)
            right.set_ylim(0, 1.02)
            right.legend(loc="lower right", fontsize=9)
    return svg[0]


def _roc_points(values: Tensor, flags: Tensor) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """At most ~500 points of the ROC curve (:func:`hookinf.metrics.roc_curve`) of ranking by ``values``."""
    fpr, tpr = roc_curve(values, flags)
    keep = np.unique(np.linspace(0, len(tpr) - 1, num=min(len(tpr), 500)).round().astype(np.int64))
    return fpr.numpy()[keep], tpr.numpy()[keep]


def _percent() -> Any:
    return PercentFormatter(xmax=1.0, decimals=0)
