"""``Scores``: influence of training examples on queries, kept per layer.

``Scores.per_layer[l][q, j] = −g_l(z_q)ᵀ (G_l + λ_l I)⁻¹ g_l(z_j)`` and ``Scores.total = Σ_l per_layer[l]``.
Positive scores are *harmful* (up-weighting training example ``j`` increases query ``q``'s loss), negative scores
are *helpful*.

Results know no presentation: this module holds the data and the operations on it (top-k, shares, grouping,
export, save and load) and imports no rendering code (not :mod:`hookinf.report`, not rich, no plotting), so the
renderers depend on the results and never the reverse. The conveniences :meth:`Scores.report`,
:meth:`Scores.save_html`, :meth:`Scores.layer_table` and printing with rich are kept by dependency inversion: they
call a :class:`~hookinf.presenter.ScoresPresenter`, the small protocol of :mod:`hookinf.presenter`, which
:mod:`hookinf.report` registers with :func:`~hookinf.presenter.use_presenter` when it is imported (``import hookinf``
imports it); without one they raise a :class:`~hookinf.ConfigurationError` that says to ``import hookinf.report``.
``repr(scores)`` is a plain-text table and needs no presenter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hookinf.descriptions import Descriptions
from hookinf.errors import ConfigurationError, HookinfError
from hookinf.ids import Ids, check_ids
from hookinf.presenter import Describe, ImageFn, Queries, presenter_for
from hookinf.ranking import top_entries
from hookinf.scores_file import SavedScores, read_scores, write_scores
from hookinf.scores_parts import layer_groups, score_frame

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd  # type: ignore[import-untyped]
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.table import Table


@dataclass(frozen=True)
class TopK:
    """The ``k`` most harmful and most helpful training examples per query.

    Attributes:
        harmful: ``[n_query, k]`` training indices (columns of the scores), most harmful (largest score) first.
        harmful_scores: ``[n_query, k]`` their scores.
        helpful: ``[n_query, k]`` training indices, most helpful (most negative score) first.
        helpful_scores: ``[n_query, k]`` their scores.
        harmful_ids: the ids of the ``harmful`` examples as the scores hold them: ``int64 [n_query, k]``, or one list
            of ``k`` strings per query for string ids; the indices themselves when the scores have no ids.
        helpful_ids: the same for ``helpful``.
    """

    harmful: Tensor
    harmful_scores: Tensor
    helpful: Tensor
    helpful_scores: Tensor
    harmful_ids: Tensor | list[list[str]]
    helpful_ids: Tensor | list[list[str]]


@dataclass(frozen=True)
class Scores:
    """Per-layer influence scores of ``n_train`` training examples on ``n_query`` queries.

    Attributes:
        per_layer: layer name (model order) → ``[n_query, n_train]`` contribution of that layer.
        method: the method's name (``"exact"``, ``"identity"``, ...).
        damping: ``λ_l`` per layer as used (empty for ``identity``).
        per_token: with ``influence(..., per_token=True)``, layer → ``[n_query, n_train, T]`` scores split over
            the training examples' positions (summing over ``T`` to ``per_layer``); otherwise ``None``.
        ids: the ids of the training examples (one per column) when scored against a :class:`~hookinf.GradientStore`,
            as the store holds them: ``int64 [n_train]``, or a list of ``n_train`` strings; otherwise ``None``
            (column ``j`` is the ``j``-th training example).
        descriptions: optional per-example text and pictures, per-query labels and predictions, which reports show
            and :meth:`save` keeps (:class:`~hookinf.descriptions.Descriptions`; set with :meth:`with_descriptions`).
        total: ``[n_query, n_train]``, the sum of the per-layer parts.
    """

    per_layer: dict[str, Tensor]
    method: str
    damping: dict[str, float] = field(default_factory=dict)
    per_token: dict[str, Tensor] | None = field(default=None, repr=False)
    ids: Ids | None = field(default=None, repr=False)
    descriptions: Descriptions | None = field(default=None, repr=False)
    total: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.per_layer:
            raise ConfigurationError("Scores need at least one layer.")
        shapes = {tuple(t.shape) for t in self.per_layer.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ConfigurationError(f"per-layer scores must all be [n_query, n_train]; got shapes {sorted(shapes)}.")
        if self.ids is not None:
            check_ids(self.ids, next(iter(shapes))[1])
        if self.descriptions is not None:
            self.descriptions.check(*next(iter(shapes)))
        device = next(iter(self.per_layer.values())).device  # layers on several devices are summed on the first's
        total = torch.stack([part.to(device) for part in self.per_layer.values()]).sum(dim=0)
        object.__setattr__(self, "total", total)

    def with_descriptions(
        self,
        *,
        train_text: Sequence[str] | None = None,
        query_text: Sequence[str] | None = None,
        train_images: Tensor | npt.NDArray[Any] | None = None,
        query_images: Tensor | npt.NDArray[Any] | None = None,
        query_labels: Tensor | Sequence[int] | None = None,
        query_predictions: Tensor | Sequence[int] | None = None,
    ) -> Scores:
        """These scores with what each example is, for :meth:`report`, :meth:`save_html` and :meth:`save`.

        A saved result keeps them, so ``hookinf report SCORES_DIR --html out.html`` shows each example's text and
        thumbnail, and ``--misclassified`` picks the queries whose prediction differs from their label. Reports use
        them when no ``describe`` / ``images`` function is given. They replace any descriptions held before.

        Args:
            train_text: one short text per training example, in column order (sorted by id for scores from a
                store).
            query_text: one short text per query (row).
            train_images: ``[n_train, H, W]``, ``[n_train, H, W, C]`` or ``[n_train, C, H, W]``: a picture per
                training example (saved in full: pass small ones).
            query_images: the same per query.
            query_labels: ``[n_query]`` integers, the queries' labels.
            query_predictions: ``[n_query]`` integers, the model's predictions for them.

        Raises:
            ConfigurationError: a field of the wrong kind or length.
        """
        described = Descriptions.of(
            train_text=train_text,
            query_text=query_text,
            train_images=train_images,
            query_images=query_images,
            query_labels=query_labels,
            query_predictions=query_predictions,
        )
        return replace(self, descriptions=described)

    def token_scores(self) -> Tensor:
        """``[n_query, n_train, T]``: per-token scores summed over layers (needs ``per_token=True``)."""
        if self.per_token is None:
            raise ConfigurationError("these scores have no per-token split: compute them with per_token=True.")
        return torch.stack(list(self.per_token.values())).sum(dim=0)

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names in model order."""
        return tuple(self.per_layer)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_query, n_train)``."""
        n_query, n_train = self.total.shape
        return int(n_query), int(n_train)

    def top_k(self, k: int = 10) -> TopK:
        """The ``k`` most harmful and most helpful training examples per query, with their ids (:class:`TopK`).

        Equal scores are ranked by column (the smaller first), as :func:`hookinf.top_k` ranks them while streaming.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"top_k(k={k!r}): k must be a positive integer.")
        k = min(k, self.shape[1])
        columns = torch.arange(self.shape[1], device=self.total.device)
        harmful = top_entries(self.total, columns, k, largest=True)
        helpful = top_entries(self.total, columns, k, largest=False)
        harmful_scores, helpful_scores = self.total.gather(1, harmful), self.total.gather(1, helpful)
        return TopK(harmful, harmful_scores, helpful, helpful_scores, self._ids_at(harmful), self._ids_at(helpful))

    def _ids_at(self, columns: Tensor) -> Tensor | list[list[str]]:
        """The ids of the training examples at ``columns`` ``[n_query, k]`` (the columns when there are no ids)."""
        if self.ids is None:
            return columns
        if isinstance(self.ids, Tensor):
            return self.ids[columns.to(self.ids.device)]
        return [[self.ids[j] for j in row] for row in columns.tolist()]

    def layer_shares(self) -> dict[str, float]:
        """Each layer's share of the total absolute influence ``Σ_{q,j} |per_layer[l]|`` (sums to 1)."""
        mass = {name: float(part.abs().sum()) for name, part in self.per_layer.items()}
        total = sum(mass.values()) or 1.0
        return {name: value / total for name, value in mass.items()}

    def grouped(self, by: str | Callable[[str], str]) -> Scores:
        r"""Scores whose "layers" are groups of layers, each group's part the sum of its layers' parts.

        Per-layer shares of a transformer read best per block: ``scores.grouped(r"layer\.\d+")`` sums every tracked
        Linear of ``...layer.3...`` into ``"layer.3"`` (layers the pattern does not match keep their own name), and
        the result reports, plots and exports like any :class:`Scores`. Totals are unchanged (the same parts, summed
        in another order); per-token parts are grouped too; the per-layer damping is dropped (it belongs to layers).

        Args:
            by: a regular expression whose first match in a layer's name names its group (the first capturing group
                when it has one), or a function from a layer name to its group's name.
        """
        groups = layer_groups(self.per_layer, by)

        def summed(parts: dict[str, Tensor]) -> dict[str, Tensor]:
            return {g: torch.stack([parts[n] for n in names]).sum(dim=0) for g, names in groups.items()}

        per_token = summed(self.per_token) if self.per_token is not None else None
        return Scores(summed(self.per_layer), self.method, {}, per_token, self.ids, self.descriptions)

    def query_layer_shares(self) -> Tensor:
        """``[n_query, n_layers]``: each layer's share of each query's |influence| ``Σ_j |per_layer[l][q, j]|``.

        Rows sum to 1 (a query without any influence gets a row of zeros); columns follow :attr:`layers`.
        """
        mass = torch.stack([part.abs().sum(dim=1) for part in self.per_layer.values()], dim=1).double()
        total = mass.sum(dim=1, keepdim=True)
        return mass / total.where(total > 0, torch.ones_like(total))

    def top_queries(self, n: int) -> list[int]:
        """The ``n`` queries with the largest total |influence| ``Σ_j |total[q, j]|``, largest first.

        These are the queries the training set moves most, typically the ones the model gets wrong (large loss,
        large gradient); reports detail them by default.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigurationError(f"top_queries(n={n!r}): n must be a non-negative integer.")
        mass = self.total.abs().sum(dim=1)
        return [int(q) for q in mass.topk(min(n, self.shape[0])).indices]

    def layer_table(self, title: str | None = None) -> Table:
        """A rich table: per layer, its share of |influence|, signed sum, and how many queries it dominates.

        See :func:`hookinf.report.terminal.layer_table`, which draws it.

        Args:
            title: the table's title (default names the method).
        """
        return presenter_for("Scores.layer_table").layer_table(self, title)

    def concentration(self, fraction: float = 0.01) -> float:
        """Share of the total |influence| held by the top ``fraction`` of (query, training example) pairs.

        Influence is heavy-tailed (Grosse et al. 2023, §5.2.1): a few training examples carry most of it.
        """
        flat = self.total.abs().flatten()
        k = max(1, round(fraction * flat.numel()))
        mass = float(flat.sum()) or 1.0
        return float(flat.topk(k).values.sum()) / mass

    def report(
        self,
        *,
        queries: Queries = None,
        k: int = 5,
        describe: Describe | None = None,
        console: Console | None = None,
    ) -> None:
        """Prints a terminal report (see :func:`hookinf.report.terminal.scores_report`).

        It shows how concentrated influence is, the per-layer table, each detailed query's layer shares, and each
        detailed query's ``k`` most harmful (positive score) and most helpful (negative score) training examples.

        Args:
            queries: which queries to detail: ``None`` for the 3 with the largest total |influence|, an ``int`` ``n``
                for the ``n`` largest (:meth:`top_queries`), or a sequence of query indices.
            k: training examples shown per query and direction.
            describe: optional function from a training example (its id when the scores have :attr:`ids`, else its
                index) to a short text shown next to it (its label, text, file name, ...); by default the text of
                the :attr:`descriptions`, if any.
            console: where to print (``None``: a new terminal console).
        """
        presenter_for("Scores.report").report(self, queries=queries, k=k, describe=describe, console=console)

    def save_html(
        self,
        path: str | os.PathLike[str],
        *,
        title: str | None = None,
        describe: Describe | None = None,
        images: ImageFn | None = None,
        queries: Queries = None,
        k: int = 5,
        describe_query: Describe | None = None,
        query_images: ImageFn | None = None,
    ) -> Path:
        """Writes the report as one self-contained HTML file (inline SVG plots, no JavaScript, no network).

        The page holds the terminal report's content plus plots drawn with matplotlib: each detailed query's layer
        shares, a layer × query heat map of the shares (blocks of queries averaged past a few hundred), the
        distribution of |scores| and how concentrated it is. Arguments left out are taken from the
        :attr:`descriptions` when they hold them. See :func:`hookinf.report.html.scores_section`. Needs matplotlib
        (``pip install 'hookinf[report]'``).

        Args:
            path: the ``.html`` file to write (atomically; its directory must exist).
            title: the page title (default names the method).
            describe: training example (id when the scores have :attr:`ids`, else index) → short text.
            images: training example (as for ``describe``) → image ``[H, W]`` or ``[H, W, 3|4]`` (float in
                ``[0, 1]`` or uint8; a grey image is scaled to its own range), shown as a thumbnail.
            queries: which queries to detail, as for :meth:`report`.
            k: training examples shown per query and direction.
            describe_query: query index → short text shown in that query's heading.
            query_images: query index → image, shown next to that query's heading.

        Returns:
            The path written.

        Raises:
            ConfigurationError: a bad argument, or matplotlib is not installed.
        """
        return presenter_for("Scores.save_html").save_html(
            self,
            path,
            title=title,
            describe=describe,
            images=images,
            queries=queries,
            k=k,
            describe_query=describe_query,
            query_images=query_images,
        )

    def to_pandas(self) -> pd.DataFrame:
        """The scores as a pandas DataFrame with one row per (query, training example) pair.

        Rows are query-major (all training examples of query 0, then query 1, ...). Columns:

        * ``query``: the query's index (row of :attr:`total`);
        * ``train``: the training example's index (column of :attr:`total`);
        * ``id``: the training example's id, only when the scores have :attr:`ids`;
        * ``score``: the total influence (positive = harmful);
        * ``layer/<name>``: each layer's part, in model order (``layer/<model>`` for an unnamed whole-model
          layer); they sum to ``score``.

        So ``df.nlargest(5, "score")`` are the most harmful pairs, ``df[df["query"] == 3]`` one query's column of
        scores, and ``df.filter(like="layer/").abs().sum()`` each layer's |influence|. Per-token scores are not
        included. Needs pandas (``pip install 'hookinf[report]'``).

        Returns:
            A DataFrame of ``n_query × n_train`` rows.

        Raises:
            ConfigurationError: pandas is not installed.
        """
        return score_frame(self.per_layer, self.total, self.ids)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Saves to the directory ``path`` (created when missing), all-or-nothing; returns it.

        One safetensors file named by its content (with the :attr:`descriptions`, when set) and a JSON manifest
        naming it with its size and SHA-256, renamed last (see :mod:`hookinf.scores_file`): a save killed at any
        point leaves the previous scores or these, never a mix, and :func:`load_scores` refuses a damaged or edited
        directory.

        Raises:
            HookinfError: the directory or a file in it cannot be written (names the directory; chained from the
                ``OSError``). The directory keeps what it held before.
        """
        directory = Path(path)
        saved = SavedScores(self.per_layer, self.method, self.damping, self.per_token, self.ids, self.descriptions)
        write_scores(directory, saved)
        return directory

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        n_query, n_train = self.shape
        yield f"Scores[{self.method}]: {n_query} queries × {n_train} training examples, {len(self.layers)} layers"
        yield presenter_for("printing Scores with rich").layer_table(self, None)

    def __repr__(self) -> str:
        n_query, n_train = self.shape
        lines = [f"Scores(method={self.method!r}, n_query={n_query}, n_train={n_train}, layers={len(self.layers)})"]
        width = max(len(name) for name in self.layers) if self.layers else 0
        for name, share in self.layer_shares().items():
            lines.append(f"  {name or '<model>':<{width}}  {share:6.1%} of |influence|")
        return "\n".join(lines)


def load_scores(path: str | os.PathLike[str]) -> Scores:
    """Loads :class:`Scores` saved by :meth:`Scores.save`, checking the files first.

    The manifest must match its checksum and the tensor file its recorded size and SHA-256 (both skipped for scores
    saved before checksums were recorded), and the tensors must be exactly those the manifest describes.

    Raises:
        HookinfError: no scores at ``path``, or damaged or edited ones (the message names the file).
    """
    directory = Path(path)
    saved = read_scores(directory)
    try:
        return Scores(saved.per_layer, saved.method, saved.damping, saved.per_token, saved.ids, saved.descriptions)
    except ConfigurationError as err:
        raise HookinfError(f"{directory}: corrupt hookinf scores ({err})") from err
