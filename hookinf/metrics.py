"""Evaluation metrics for attributions (pure functions on tensors).

* :func:`auc`, :func:`roc_curve` and :func:`detection_aucs`: how well a signal (self-influence, mean influence on
  held-out queries) detects known-bad training examples such as flipped labels (DataInf, Kwon et al. 2023, §4.2).
* :func:`spearman`, :func:`lds` and :func:`lds_per_layer`: the linear datamodeling score (Park et al. 2023, TRAK,
  §2.2), which asks whether influence scores predict how the query losses change when the model is retrained on
  random subsets of the training set; :func:`hookinf.retrain.retrain_subsets` drives that retraining.

Everything here is a pure function of tensors: plain torch (no scipy or scikit-learn), computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.metric_inputs import as_tensor, check_finite, scores_total, self_values
from hookinf.scores import Scores
from hookinf.self_scores import SelfScores


def auc(scores: Tensor | SelfScores, positives: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (Mann–Whitney U, ties averaged).

    It is the probability that a random positive scores higher than a random negative; 0.5 is chance. The
    DataInf paper (Kwon et al. 2023, §4.2) reports mislabel detection this way.

    Args:
        scores: ``[n]`` detection scores (higher = more suspicious), or :class:`~hookinf.SelfScores` (their
            ``total``; entry ``j`` must be example ``j``: no ids, or ids ``0..n-1``).
        positives: ``[n]`` booleans, the true positives (e.g. flipped labels).

    Returns:
        The AUC in ``[0, 1]``.
    """
    scores, positives, n_pos, n_neg = _detection_inputs(scores, positives, "auc")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64, device=scores.device)
    # average the ranks of tied scores
    unique, inverse = torch.unique(scores, return_inverse=True)
    if unique.numel() < scores.numel():
        sums = torch.zeros_like(unique, dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros_like(unique, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    u = float(ranks[positives].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def roc_curve(scores: Tensor | SelfScores, positives: Tensor) -> tuple[Tensor, Tensor]:
    """The ROC curve of ``scores`` for detecting ``positives``: one point per distinct score, largest first.

    Point ``i`` flags every example whose score is at least the ``i``-th largest distinct score (tied scores enter
    together); ``fpr`` is the share of the negatives flagged, ``tpr`` that of the positives. The trapezoidal area
    under the curve is :func:`auc`.

    Args:
        scores: ``[n]`` detection scores (higher = more suspicious), or :class:`~hookinf.SelfScores` (as for
            :func:`auc`).
        positives: ``[n]`` booleans, the true positives (e.g. flipped labels).

    Returns:
        ``(fpr, tpr)``, each ``[m + 1]`` float64 for ``m`` distinct scores, from ``(0, 0)`` to ``(1, 1)``.
    """
    scores, positives, n_pos, n_neg = _detection_inputs(scores, positives, "roc_curve")
    order = scores.argsort(descending=True)
    ranked, hits = scores[order], positives[order].double()
    last = torch.ones_like(positives)  # the last example of each run of tied scores closes a point
    last[:-1] = ranked[1:] != ranked[:-1]
    start = torch.zeros(1, dtype=torch.float64, device=scores.device)
    fpr, tpr = ((1 - hits).cumsum(0) / float(n_neg))[last], (hits.cumsum(0) / float(n_pos))[last]
    return torch.cat([start, fpr]), torch.cat([start, tpr])


def _detection_inputs(values: Tensor | SelfScores, positives: Tensor, caller: str) -> tuple[Tensor, Tensor, int, int]:
    """``values`` as float64 ``[n]``, ``positives`` as bool ``[n]``, and how many positives and negatives."""
    scores = self_values(values, caller).detach().double().flatten()
    positives = positives.detach().bool().flatten()
    if scores.shape != positives.shape:
        raise ConfigurationError(f"{caller}: scores {list(scores.shape)} and positives {list(positives.shape)} differ.")
    n_pos = int(positives.sum())
    n_neg = positives.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ConfigurationError(f"{caller} needs at least one positive and one negative example.")
    return scores, positives, n_pos, n_neg


def detection_aucs(
    self_influence: Tensor | SelfScores | None,
    scores: Scores | Tensor | None,
    flipped: Tensor,
) -> dict[str, float]:
    """AUCs of the influence signals for detecting known-bad training examples (e.g. flipped labels).

    The DataInf paper (Kwon et al. 2023, §4.2) ranks training examples by how suspicious they look and reports the
    AUC against the known flips. Two signals are scored, each only if given:

    * ``"self_influence"``: ``g(z)ᵀ (G + λI)⁻¹ g(z)``, large for examples the model finds hard to fit.
    * ``"mean_query_influence"``: ``(1/n_query) Σ_q scores.total[q, j]``. In hookinf's sign convention a positive
      score is harmful (up-weighting ``j`` raises the query's loss), so mislabeled examples should score high.

    Args:
        self_influence: ``[n_train]`` self-influence (a tensor or :class:`~hookinf.SelfScores`), or ``None`` to skip
            that signal.
        scores: :class:`~hookinf.Scores` or a ``[n_query, n_train]`` tensor of influence on held-out queries, or
            ``None`` to skip that signal.
        flipped: ``[n_train]`` booleans, True for the known-bad examples.

    Returns:
        Signal name → AUC in ``[0, 1]`` (0.5 is chance), for the signals given, in the order above.

    Raises:
        ConfigurationError: neither signal is given, a shape does not match ``flipped``, or ``flipped`` is all True
            or all False.
    """
    if self_influence is None and scores is None:
        raise ConfigurationError("detection_aucs needs self_influence, scores or both; both are None.")
    flags = as_tensor(flipped, "flipped")
    if flags.dim() != 1:
        raise ConfigurationError(f"detection_aucs: flipped must be [n_train]; got shape {list(flags.shape)}.")
    if flags.dtype != torch.bool:
        raise ConfigurationError(f"detection_aucs: flipped must be a bool tensor; got {flags.dtype} (use .bool()).")
    n_train = flags.shape[0]
    result: dict[str, float] = {}
    if self_influence is not None:
        values = as_tensor(self_values(self_influence, "detection_aucs"), "self_influence")
        if values.shape != (n_train,):
            raise ConfigurationError(
                f"detection_aucs: self_influence has shape {list(values.shape)} but flipped has [{n_train}] entries; "
                f"both must be [n_train]."
            )
        result["self_influence"] = auc(values, flags)
    if scores is not None:
        total = scores_total(scores, "detection_aucs")
        if total.shape[1] != n_train:
            raise ConfigurationError(
                f"detection_aucs: scores are [n_query={total.shape[0]}, n_train={total.shape[1]}] but flipped has "
                f"{n_train} entries; flipped must have one entry per training example (column) of the scores."
            )
        result["mean_query_influence"] = auc(total.double().mean(dim=0), flags)
    return result


# ---------------------------------------------------------------------------------------------------- Spearman
def spearman(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    """Spearman rank correlation of ``x`` and ``y`` along ``dim``, tied values getting their average rank.

    It is the Pearson correlation of the ranks (what ``scipy.stats.spearmanr`` computes for each pair of rows). A
    row in which ``x`` or ``y`` is constant has no rank correlation: its result is NaN (and :func:`lds` counts
    such rows as skipped).

    Args:
        x: ``[..., n, ...]`` values; any real dtype.
        y: the same shape as ``x``.
        dim: the dimension of length ``n >= 2`` to correlate along.

    Returns:
        The correlations in ``[-1, 1]`` (NaN for constant rows), float64, of ``x``'s shape without ``dim``.

    Raises:
        ConfigurationError: the shapes differ, ``dim`` is out of range, fewer than 2 values along ``dim``, or NaN in
            the inputs.
    """
    xs = as_tensor(x, "spearman: x")
    ys = as_tensor(y, "spearman: y")
    if xs.shape != ys.shape:
        raise ConfigurationError(f"spearman: x {list(xs.shape)} and y {list(ys.shape)} must have the same shape.")
    if xs.dim() == 0:
        raise ConfigurationError("spearman needs tensors with at least one dimension; got scalars.")
    if not -xs.dim() <= dim < xs.dim():
        raise ConfigurationError(f"spearman: dim={dim} is out of range for tensors of shape {list(xs.shape)}.")
    n = xs.shape[dim]
    if n < 2:
        raise ConfigurationError(f"spearman needs at least 2 values along dim={dim}; shape is {list(xs.shape)}.")
    for name, value in (("x", xs), ("y", ys)):
        if value.is_floating_point() and bool(value.isnan().any()):
            raise ConfigurationError(f"spearman: {name} holds NaN; ranks are undefined.")
    rank_x, constant_x = _average_ranks(xs.double().movedim(dim, -1).contiguous())
    rank_y, constant_y = _average_ranks(ys.double().movedim(dim, -1).contiguous())
    # Averaged ranks are half-integers whose mean is exactly (n + 1) / 2, so these sums are exact for any
    # realistic n and a perfect (anti-)correlation comes out as exactly ±1.
    centre = (n + 1) / 2
    rank_x -= centre
    rank_y -= centre
    covariance = (rank_x * rank_y).sum(dim=-1)
    scale = ((rank_x * rank_x).sum(dim=-1) * (rank_y * rank_y).sum(dim=-1)).sqrt()
    rho = (covariance / scale).clamp(-1.0, 1.0)
    return rho.masked_fill(constant_x | constant_y, math.nan)


def _average_ranks(values: Tensor) -> tuple[Tensor, Tensor]:
    """1-based ranks along the last dim with ties averaged, and which rows are constant.

    Args:
        values: ``[..., n]`` float64, contiguous, no NaN.

    Returns:
        ``(ranks [..., n] float64, constant [...] bool)``.
    """
    ordered = values.sort(dim=-1).values
    # An element with `below` smaller values and `upto` values <= itself shares ranks below+1 ... upto.
    below = torch.searchsorted(ordered, values, side="left")
    upto = torch.searchsorted(ordered, values, side="right")
    ranks = (below + upto + 1).double() / 2
    return ranks, ordered[..., 0] == ordered[..., -1]


# ---------------------------------------------------------------------------------------------------- LDS
@dataclass(frozen=True, eq=False)
class LDSResult:
    """The linear datamodeling score of a set of influence scores (see :func:`lds`).

    Attributes:
        mean: mean over the queries that were not skipped of the per-query Spearman correlation; 1 is a perfect
            ranking of the subsets, 0 chance, negative a reversed sign. NaN when every query was skipped.
        per_query: ``[n_query]`` float64 Spearman correlation per query; NaN for skipped queries.
        skipped: how many queries were left out of ``mean`` because their predicted or measured losses are
            constant across the subsets (no rank correlation exists).
    """

    mean: float
    per_query: Tensor
    skipped: int

    @property
    def n_query(self) -> int:
        """Number of queries, skipped ones included."""
        return int(self.per_query.shape[0])

    def __repr__(self) -> str:
        kept = self.per_query[~self.per_query.isnan()]
        text = f"LDSResult(mean={self.mean:.4f}, n_query={self.n_query}, skipped={self.skipped}"
        if kept.numel():
            low, median, high = float(kept.min()), float(kept.quantile(0.5)), float(kept.max())
            text += f"; per query min {low:.4f}, median {median:.4f}, max {high:.4f}"
        return text + ")"


def lds(scores: Scores | Tensor, subset_masks: Tensor, subset_query_losses: Tensor) -> LDSResult:
    """Linear datamodeling score: do the influence scores rank retrained models' query losses correctly?

    The LDS of Park et al. 2023 (TRAK, §2.2; also used by kronfluence and dattri). For ``K`` random subsets
    ``S_k`` of the training set, a model was retrained on each; ``L_q(S_k)`` is its loss on query ``q``. The scores
    define the additive datamodel prediction

        ĝ_q(S) = Σ_{j ∈ S} scores[q, j]

    and the score of query ``q`` is the Spearman correlation over the subsets of ``ĝ_q(S_k)`` with ``L_q(S_k)``;
    the LDS is its mean over queries.

    Sign. hookinf's scores are ``I(q, j) = dL_q/dε`` for up-weighting training example ``j`` by ``ε``: positive is
    harmful. Training on ``S`` instead of the full set ``D`` removes each ``j ∉ S``, i.e. sets its weight from 1 to
    0 (``ε = −1`` for a summed objective, ``−1/n`` for a mean one, a positive constant ``c`` either way), so to first
    order

        L_q(S) ≈ L_q(D) − c Σ_{j ∉ S} I(q, j) = [L_q(D) − c Σ_{j ∈ D} I(q, j)] + c Σ_{j ∈ S} I(q, j)
               = const_q + c ĝ_q(S).

    The prediction therefore rises with the measured *loss*, and good hookinf scores give an LDS near **+1**
    (Spearman ignores ``c`` and ``const_q``). Negated scores give exactly the negated LDS, and so does summing over
    the left-out examples ``j ∉ S`` instead. TRAK correlates "helpful-positive" scores with a model *output*
    (margin) — both signs flipped, the same positive LDS for good scores; scores from a library whose positive sign
    means helpful must be negated before they are compared with losses here.

    Args:
        scores: :class:`~hookinf.Scores` (its ``total`` is used) or a ``[n_query, n_train]`` tensor, hookinf's sign
            (positive = harmful).
        subset_masks: ``[n_subsets, n_train]`` bool; row ``k`` marks the training examples the ``k``-th retrained
            model saw (``n_subsets >= 2``; TRAK uses 50–100 or more).
        subset_query_losses: ``[n_subsets, n_query]``; entry ``[k, q]`` is the ``k``-th retrained model's loss on
            query ``q`` (averaging several retraining seeds per subset reduces noise).

    Returns:
        :class:`LDSResult` with the mean, the per-query correlations ``[n_query]`` and how many queries were skipped
        because their prediction or their measured loss is constant across the subsets.

    Raises:
        ConfigurationError: shapes that do not fit together, masks that are not bool, fewer than 2 subsets, or NaN /
            infinity in the scores or losses.
    """
    total = scores_total(scores, "lds")
    masks, losses = _check_subsets(total, subset_masks, subset_query_losses)
    return _lds(total, masks, losses)


def lds_per_layer(scores: Scores, subset_masks: Tensor, subset_query_losses: Tensor) -> dict[str, LDSResult]:
    """The :func:`lds` of each layer's part of the scores alone: which layers' influence predicts retraining.

    Args:
        scores: :class:`~hookinf.Scores`; each ``per_layer[l]`` (``[n_query, n_train]``) is scored on its own.
        subset_masks: ``[n_subsets, n_train]`` bool, as for :func:`lds`.
        subset_query_losses: ``[n_subsets, n_query]``, as for :func:`lds`.

    Returns:
        Layer name (model order) → :class:`LDSResult`. A layer whose part is zero for a query has that query skipped.

    Raises:
        ConfigurationError: as :func:`lds`, or ``scores`` is not a :class:`~hookinf.Scores`.
    """
    if not isinstance(scores, Scores):
        raise ConfigurationError(
            f"lds_per_layer needs hookinf.Scores (with per-layer parts); got {type(scores).__name__}. "
            "Use lds() for a plain [n_query, n_train] tensor."
        )
    total = scores_total(scores, "lds_per_layer")
    masks, losses = _check_subsets(total, subset_masks, subset_query_losses)
    result: dict[str, LDSResult] = {}
    for name, part in scores.per_layer.items():
        check_finite(part, f"lds_per_layer: scores.per_layer[{name!r}]")
        result[name] = _lds(part.detach().double(), masks, losses)
    return result


def _lds(total: Tensor, masks: Tensor, losses: Tensor) -> LDSResult:
    """LDS of ``total [n_query, n_train]`` float64 against checked ``masks`` and ``losses`` (same device)."""
    predictions = masks.to(total.dtype) @ total.T  # [n_subsets, n_query]
    per_query = spearman(predictions, losses, dim=0).cpu()
    kept = ~per_query.isnan()
    skipped = int((~kept).sum())
    mean = float(per_query[kept].mean()) if bool(kept.any()) else math.nan
    return LDSResult(mean=mean, per_query=per_query, skipped=skipped)


def _check_subsets(total: Tensor, subset_masks: Tensor, subset_query_losses: Tensor) -> tuple[Tensor, Tensor]:
    """Validates the retraining results against ``total [n_query, n_train]``; returns them float64 on its device."""
    n_query, n_train = total.shape
    masks = as_tensor(subset_masks, "lds: subset_masks")
    losses = as_tensor(subset_query_losses, "lds: subset_query_losses")
    if masks.dim() != 2:
        raise ConfigurationError(f"lds: subset_masks must be [n_subsets, n_train]; got shape {list(masks.shape)}.")
    if masks.dtype != torch.bool:
        raise ConfigurationError(
            f"lds: subset_masks must be a bool tensor (True = the retrained model saw that example); got "
            f"{masks.dtype} (use .bool())."
        )
    if masks.shape[1] != n_train:
        raise ConfigurationError(
            f"lds: subset_masks cover {masks.shape[1]} training examples but the scores have n_train={n_train} "
            f"columns; each mask needs one entry per training example, in the scores' column order."
        )
    if losses.dim() != 2:
        raise ConfigurationError(
            f"lds: subset_query_losses must be [n_subsets, n_query]; got shape {list(losses.shape)}."
        )
    if losses.shape[0] != masks.shape[0]:
        raise ConfigurationError(
            f"lds: subset_masks has {masks.shape[0]} subsets (rows) but subset_query_losses has {losses.shape[0]}; "
            "they need one row per retrained model, in the same order."
        )
    if losses.shape[1] != n_query:
        raise ConfigurationError(
            f"lds: subset_query_losses has {losses.shape[1]} queries (columns) but the scores have n_query={n_query} "
            "rows; each retrained model needs one loss per query, in the scores' row order."
        )
    if masks.shape[0] < 2:
        raise ConfigurationError(
            f"lds needs at least 2 subsets to rank; got {masks.shape[0]} (TRAK uses 50–100 or more)."
        )
    check_finite(losses, "lds: subset_query_losses")
    return masks.to(total.device), losses.to(device=total.device, dtype=torch.float64)
