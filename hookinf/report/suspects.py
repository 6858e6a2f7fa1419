"""The detection sections of the self-contained HTML report: self-influence suspects and the per-method comparison.

:func:`suspects_section` ranks training examples by self-influence (the mislabel signal), with the detection AUC and
ROC curve when the flips are known; :func:`comparison_section` compares methods' AUCs; :func:`save_suspects_html`
writes the suspects as one page. Like :mod:`hookinf.report.html`, these are pure functions from results to HTML text
(every piece of user text escaped, numbers in ``data-*`` attributes); plots come from :mod:`hookinf.report.plots`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.presenter import ImageFn
from hookinf.report.content import check_self_scores, detection, self_shown
from hookinf.report.images import img_tag
from hookinf.report.page import Section, check_anchor, escape, figure_html, require_matplotlib, save_html, summary_cards
from hookinf.self_scores import SelfScores


def suspects_section(
    self_scores: Tensor | SelfScores,
    *,
    flipped: Tensor | None = None,
    describe: Callable[[Any], str] | None = None,
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
        self_scores: :class:`~hookinf.SelfScores` from :func:`hookinf.self_influence`, or a ``[n_train]`` tensor.
        flipped: optional ``[n_train]`` bool, the known flipped labels, one per entry of ``self_scores``.
        describe: training example (its id when ``self_scores`` has ids, else its index) → short text.
        images: training example (as for ``describe``) → image, shown as a thumbnail (see
            :func:`~hookinf.report.images.thumbnail`).
        k: how many suspects to list.
        heading: the section's heading.
        anchor: the section's id and id prefix: ``{anchor}-plot`` (figure), ``{anchor}-table`` (table, one
            ``<tr data-train data-score>`` per suspect); the AUC is in ``data-auc`` of ``{anchor}-auc``.

    Returns:
        The section.

    Raises:
        ConfigurationError: bad shapes or values, or matplotlib missing.
    """
    check_anchor(anchor)
    require_matplotlib()
    from hookinf.report import plots  # numpy and matplotlib: loaded when a section is drawn, not by import hookinf

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
    out = [summary_cards(cards, raw=True)]
    out.append(
        '<p class="note">Self-influence g(z)ᵀ(G+λI)⁻¹g(z) is large for training examples the model finds hard to '
        "fit; mislabeled examples are the usual reason. The list is a ranking to review, largest first.</p>"
    )
    out.append(
        figure_html(
            f"{anchor}-plot",
            plots.suspects_svg(values, flags, salt=f"{anchor}-plot"),
            "Self-influence of every training example"
            + (" (flipped and clean apart) and the ROC curve of ranking by it." if flags is not None else "."),
        )
    )
    top_values, top_indices = values.topk(min(k, n_train))
    shown = self_shown(self_scores, top_indices.tolist())
    ident = "train id" if isinstance(self_scores, SelfScores) and self_scores.ids is not None else "train"
    header = f"<th>rank</th><th>{ident}</th>" + ("<th></th>" if images is not None else "")
    header += ("<th>example</th>" if describe is not None else "") + "<th>self-influence</th>"
    header += "<th>flipped?</th>" if flags is not None else ""
    body = []
    rows = zip(top_values.tolist(), top_indices.tolist(), shown, strict=True)
    for rank, (value, index, who) in enumerate(rows, start=1):
        cells = f'<td class="num">{rank}</td><td class="num">{escape(who)}</td>'
        if images is not None:
            cells += f"<td>{img_tag(images(who), f'training example {who}')}</td>"
        if describe is not None:
            cells += f'<td class="example">{escape(describe(who))}</td>'
        cells += f'<td class="num">{value:.4g}</td>'
        if flags is not None:
            cells += '<td class="harmful">yes</td>' if bool(flags[index]) else '<td class="muted">no</td>'
        body.append(f'<tr data-train="{escape(who)}" data-score="{value!r}">{cells}</tr>')
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
            :func:`hookinf.report.terminal.comparison_table`).
        heading: the section's heading.
        note: optional sentence under the table (plain text).
        anchor: the section's id; the table is ``{anchor}-table``, each row carries ``data-auc``.

    Returns:
        The section.
    """
    check_anchor(anchor)
    body = []
    for name, auc_value, precision in rows:
        width = max(0.0, min(1.0, (auc_value - 0.5) / 0.5)) * 100
        body.append(
            f'<tr data-auc="{auc_value!r}"><td>{escape(name)}</td>'
            f'<td class="num"><span class="bar" style="width:{width:.1f}px"></span>{auc_value:.3f}</td>'
            f'<td class="num">{precision:.0%}</td></tr>'
        )
    table = (
        f'<table id="{anchor}-table" class="comparison"><thead><tr><th>method</th><th>AUC</th>'
        f"<th>flips among top suspects</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
    extra = f'<p class="note">{escape(note)}</p>' if note else ""
    return Section(anchor, heading, table + extra)


def save_suspects_html(
    path: str | os.PathLike[str],
    self_scores: Tensor | SelfScores,
    *,
    flipped: Tensor | None = None,
    describe: Callable[[Any], str] | None = None,
    images: ImageFn | None = None,
    k: int = 20,
    title: str = "Suspected mislabeled examples",
) -> Path:
    """Writes the self-influence (mislabel) report as one self-contained HTML file.

    See :func:`suspects_section` for the content and the arguments; needs matplotlib
    (``pip install 'hookinf[report]'``).

    Returns:
        The path written.
    """
    section = suspects_section(self_scores, flipped=flipped, describe=describe, images=images, k=k)
    return save_html(path, [section], title=title)
