"""The sections of the self-contained HTML report: pure functions from influence results to HTML text.

A page (:func:`hookinf.report.page.page`) is a title and sections: :func:`scores_section` here (influence of the
training set on queries, per layer), and :func:`~hookinf.report.suspects.suspects_section` (self-influence, the
mislabel signal) and :func:`~hookinf.report.suspects.comparison_section` (detection AUC per method) in
:mod:`hookinf.report.suspects`. :func:`~hookinf.report.page.save_html` writes a page to a file;
:meth:`hookinf.Scores.save_html` and :func:`~hookinf.report.suspects.save_suspects_html` are the one-section
shortcuts.

Plots (:mod:`hookinf.report.plots`, needs matplotlib: ``pip install 'hookinf[report]'``, imported when a section
is built) are inline SVG and summarise, so the file's size does not grow with the number of training examples;
thumbnails (:mod:`hookinf.report.images`) are ``data:`` URIs; every piece of user text is escaped.
Machine-readable values ride along as ``data-*`` attributes (``data-share`` on the per-layer rows, ``data-train`` and
``data-score`` on the top-k rows, ``data-auc``), so tests and scripts can read the numbers back exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hookinf.presenter import ImageFn
from hookinf.report.content import (
    ExampleRow,
    check_finite_scores,
    damping_text,
    example_rows,
    heatmap_columns,
    layer_label,
    saved_describe,
    saved_images,
    saved_query_describe,
    saved_query_images,
    select_queries,
)
from hookinf.report.images import img_tag
from hookinf.report.page import Section, check_anchor, escape, figure_html, require_matplotlib, summary_cards
from hookinf.scores import Scores

if TYPE_CHECKING:
    import numpy.typing as npt


def scores_section(
    scores: Scores,
    *,
    queries: int | Sequence[int] | None = None,
    k: int = 5,
    describe: Callable[[Any], str] | None = None,
    images: ImageFn | None = None,
    describe_query: Callable[[Any], str] | None = None,
    query_images: ImageFn | None = None,
    heading: str | None = None,
    anchor: str = "influence",
) -> Section:
    """The report of influence scores as a page section.

    Content: a summary (method, ``n_query × n_train``, layers, damping, concentration), how to read the signs; the
    per-layer table (each layer's share of |influence| drawn as a bar in its row); a layer × query heat map of the
    shares (a column per query; past :data:`~hookinf.report.content.HEATMAP_COLUMNS` queries, each column the mean of
    a block of consecutive queries, as its title says); the distribution of |scores| (histogram on a log scale,
    harmful and helpful apart) and the concentration curve (share of |influence| held by the top fraction of pairs);
    then, per detailed query, its layer shares (plotted together for all detailed queries) and tables of its ``k``
    most harmful and ``k`` most helpful training examples with score, largest layer part, description and thumbnail.

    Args:
        scores: the scores.
        queries: which queries to detail (see :func:`~hookinf.report.content.select_queries`): by default the 3 with the
            largest total |influence|.
        k: training examples per query and direction.
        describe: training example (its id when the scores have ids, else its index) → short text.
        images: training example (as for ``describe``) → image, shown as a thumbnail (see
            :func:`~hookinf.report.images.thumbnail`).
        describe_query: query index → short text, shown in the query's heading.
        query_images: query index → image, shown next to the query's heading.
        heading: the section's heading (default names the method and the sizes).
        anchor: the section's id and the prefix of the ids inside it: ``{anchor}-query-shares``,
            ``{anchor}-heatmap``, ``{anchor}-distribution`` (figures), ``{anchor}-layers`` (table),
            ``{anchor}-q{q}-harmful`` / ``-helpful`` (tables).

    Returns:
        The section.

    Raises:
        ConfigurationError: a bad ``queries``, ``k`` or ``anchor``, an image of a bad shape, or matplotlib missing.

    Each of ``describe``, ``images``, ``describe_query`` and ``query_images`` left out is taken from the scores'
    descriptions when they hold it (:meth:`hookinf.Scores.with_descriptions`, kept by :meth:`hookinf.Scores.save`).
    """
    check_anchor(anchor)
    describe = describe or saved_describe(scores)
    images = images or saved_images(scores)
    describe_query = describe_query or saved_query_describe(scores)
    query_images = query_images or saved_query_images(scores)
    check_finite_scores(scores)
    require_matplotlib()
    from hookinf.report import plots  # numpy and matplotlib: loaded when a section is drawn, not by import hookinf

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
        ("damping λ", damping_text(scores.damping)),
        ("top 1% of pairs hold", f"{scores.concentration(0.01):.1%} of |influence|"),
        ("top 10% of pairs hold", f"{scores.concentration(0.10):.1%} of |influence|"),
        ("harmful pairs (score > 0)", f"{positive:.1%}"),
    ]
    out = [summary_cards(cards)]
    out.append(
        '<p class="note">A score is the change in the query\'s loss when the training example is up-weighted: '
        '<span class="harmful">positive = harmful</span> (the example pushes the query\'s loss up), '
        '<span class="helpful">negative = helpful</span>. Each layer contributes its own part; the parts sum to '
        "the score, and a layer's <em>share</em> is its part of the total |influence|.</p>"
    )

    # per-layer table (the one drawing of the layer shares) and the heat map
    out.append("<h3>Layers</h3>")
    rows = []
    largest = max(shares.values()) or 1.0
    for idx, name in enumerate(scores.layers):
        lam = scores.damping.get(name)
        share = shares[name]
        rows.append(
            f'<tr data-layer="{escape(name)}" data-share="{share!r}">'
            f"<td>{escape(layer_label(name))}</td>"
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
    colors = plots.layer_colors(len(names))
    columns, block = heatmap_columns(query_shares)
    out.append(
        figure_html(
            f"{anchor}-heatmap",
            plots.heatmap_svg(names, columns, block, salt=f"{anchor}-heatmap"),
            "Each layer's share of each query's |influence| ("
            + (
                "columns: queries in order"
                if block == 1
                else f"{n_query:,} queries: each column is the mean of {block} consecutive queries"
            )
            + "; each column sums to 100%; the darkest colour is the largest share).",
        )
    )

    # distribution
    out.append("<h3>Distribution</h3>")
    out.append(
        figure_html(
            f"{anchor}-distribution",
            plots.distribution_svg(total, salt=f"{anchor}-distribution"),
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
            figure_html(
                f"{anchor}-query-shares",
                plots.query_shares_svg(chosen, names, query_shares, colors, salt=f"{anchor}-query-shares"),
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
    image = f" {img_tag(picture, f'query {q}')}" if picture is not None else ""
    order = shares.argsort(descending=True).tolist()
    parts = " · ".join(f"{escape(names[i])} {float(shares[i]):.0%}" for i in order if float(shares[i]) >= 0.005)
    return (
        f'<div class="query" id="{anchor}-q{q}">\n<h4>{image}<span>{escape(head)}</span></h4>\n'
        f'<p class="note">Σ|influence| {mass:.4g}; by layer: {parts or "—"}</p>'
    )


def _top_tables(
    scores: Scores,
    q: int,
    lists: tuple[list[ExampleRow], list[ExampleRow]],
    describe: Callable[[Any], str] | None,
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
            cells = f'<td class="num">{row.rank}</td><td class="num">{escape(str(row.shown))}</td>'
            if images is not None:
                cells += f"<td>{img_tag(images(row.shown), f'training example {row.shown}')}</td>"
            if describe is not None:
                cells += f'<td class="example">{escape(describe(row.shown))}</td>'
            cells += (
                f'<td class="num {direction}">{row.score:+.4g}</td>'
                f'<td>{escape(layer_label(row.layer))} <span class="muted">({row.part:+.3g})</span></td>'
            )
            body.append(f'<tr data-train="{escape(str(row.shown))}" data-score="{row.score!r}">{cells}</tr>')
        out.append(
            f'<div><h5 class="{direction}">Most {direction} ({sign})</h5>'
            f'<table id="{anchor}-q{q}-{direction}" class="topk"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )
    out.append("</div></div>")
    return "\n".join(out)
