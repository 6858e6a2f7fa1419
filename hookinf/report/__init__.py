"""Reports of influence results: rich renderables for the terminal, and self-contained HTML pages.

The package depends on the results (:mod:`hookinf.scores`, :mod:`hookinf.metrics`), never the reverse; when it is
imported (``import hookinf`` imports it) it registers its :class:`~hookinf.report.presenter.ReportPresenter` with
:func:`hookinf.presenter.use_presenter`, which gives :meth:`hookinf.Scores.report`,
:meth:`hookinf.Scores.save_html`, :meth:`hookinf.Scores.layer_table` and printing a :class:`~hookinf.Scores` with
rich their renderings.

* :mod:`hookinf.report.content`: what a report shows, whatever it is drawn on (the detailed queries, their top-k
  rows, the detection figures).
* :mod:`hookinf.report.terminal`: :func:`scores_report`, :func:`suspects_report` and the rich tables.
* :mod:`hookinf.report.html` and :mod:`hookinf.report.suspects`: the sections of an HTML page
  (:func:`scores_section`; :func:`suspects_section`, :func:`comparison_section`) and :func:`save_suspects_html`.
* :mod:`hookinf.report.page`: :class:`Section`, :func:`page` and :func:`save_html`, which writes sections as one
  self-contained file; :mod:`hookinf.report.plots` draws its SVG plots and :mod:`hookinf.report.images` its
  thumbnails (:func:`thumbnail`).

Every name below is importable from ``hookinf.report``. Sign convention (as in :class:`~hookinf.Scores`): a
positive score is *harmful* (up-weighting the training example increases the query's loss), a negative one
*helpful*.
"""

from hookinf.presenter import use_presenter
from hookinf.report.content import (
    DEFAULT_QUERIES,
    Detection,
    ExampleRow,
    check_self_scores,
    detection,
    example_rows,
    layer_label,
    select_queries,
)
from hookinf.report.html import scores_section
from hookinf.report.images import thumbnail
from hookinf.report.page import Section, page, save_html
from hookinf.report.presenter import ReportPresenter
from hookinf.report.suspects import comparison_section, save_suspects_html, suspects_section
from hookinf.report.terminal import (
    comparison_table,
    layer_table,
    query_layers_table,
    scores_report,
    suspects_report,
    suspects_table,
    top_examples_table,
)

__all__ = [
    # terminal
    "scores_report",
    "suspects_report",
    "layer_table",
    "query_layers_table",
    "top_examples_table",
    "suspects_table",
    "comparison_table",
    # HTML pages
    "save_html",
    "save_suspects_html",
    "page",
    "Section",
    "scores_section",
    "suspects_section",
    "comparison_section",
    "thumbnail",
    # what a report shows
    "DEFAULT_QUERIES",
    "ExampleRow",
    "Detection",
    "select_queries",
    "example_rows",
    "detection",
    "check_self_scores",
    "layer_label",
    # the conveniences of Scores
    "ReportPresenter",
]

use_presenter(ReportPresenter())
