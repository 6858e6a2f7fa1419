"""Evaluation metrics for attributions (pure functions on tensors)."""

from __future__ import annotations

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError


def auc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (Mann–Whitney U, ties averaged).

    It is the probability that a random positive scores higher than a random negative; 0.5 is chance. The
    DataInf paper (Kwon et al. 2023, §4.2) reports mislabel detection this way.

    Args:
        scores: ``[n]`` detection scores (higher = more suspicious).
        positives: ``[n]`` booleans, the true positives (e.g. flipped labels).

    Returns:
        The AUC in ``[0, 1]``.
    """
    scores = scores.detach().double().flatten()
    positives = positives.detach().bool().flatten()
    if scores.shape != positives.shape:
        raise ConfigurationError(f"auc: scores {list(scores.shape)} and positives {list(positives.shape)} differ.")
    n_pos = int(positives.sum())
    n_neg = positives.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ConfigurationError("auc needs at least one positive and one negative example.")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average the ranks of tied scores
    unique, inverse = torch.unique(scores, return_inverse=True)
    if unique.numel() < scores.numel():
        sums = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    u = float(ranks[positives].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
