"""The ``k`` best entries of each row, with ties broken the same way everywhere (a pure function).

:meth:`hookinf.Scores.top_k` (one dense ``[n_query, n_train]`` matrix) and the streaming :func:`hookinf.top_k`
(merging ``[n_query, k + chunk]`` blocks) both pick with :func:`top_entries`, so they choose the same training
examples even when scores tie: the larger score first (the smaller for the most helpful), then the smaller column.
:func:`torch.topk` alone leaves the order of equal values unspecified.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_entries(values: Tensor, columns: Tensor, k: int, *, largest: bool) -> Tensor:
    """Per row, the ``k`` entries with the largest (``largest``) or smallest values; ties go to the smaller column.

    Memory beyond the input is ``O(rows × k)``: ``topk`` of ``k + 1`` entries shows whether the ``k``-th value
    repeats past the cut; only then are the ties resolved, with masks and an integer key of the input's shape.

    Args:
        values: ``[n, m]`` scores.
        columns: ``[n, m]`` or ``[m]`` int64 column indices of the entries, distinct within a row.
        k: how many to keep, ``1 ≤ k ≤ m``.
        largest: keep the largest values (else the smallest).

    Returns:
        ``[n, k]`` positions in ``values`` (along ``dim=1``) of the chosen entries, best first; gather the values
        and the columns with them.
    """
    columns = columns.expand_as(values) if columns.dim() == 1 else columns
    m = int(values.shape[1])
    best = values.topk(min(k + 1, m), dim=1, largest=largest)
    chosen = best.indices[:, :k]
    if m > k and bool((best.values[:, k] == best.values[:, k - 1]).any()):  # a tie at the cut: smaller columns win
        kth = best.values[:, k - 1 : k]
        beyond = values > kth if largest else values < kth  # strictly better than the k-th: always kept
        never = torch.iinfo(torch.int64).max
        key = torch.where(beyond, -1, torch.where(values == kth, columns, never))
        chosen = key.topk(k, dim=1, largest=False).indices
    chosen = chosen.gather(1, columns.gather(1, chosen).argsort(dim=1, stable=True))  # by column, then by value
    return chosen.gather(1, values.gather(1, chosen).argsort(dim=1, descending=largest, stable=True))
