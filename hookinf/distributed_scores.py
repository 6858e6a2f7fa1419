"""Scoring on several ranks: each rank scores its own training rows, and the ranks gather only what the call returns.

:func:`hookinf.influence`, :func:`hookinf.self_influence` and :func:`hookinf.top_k` called on every rank of a process
group (``group="auto"``, as :func:`hookinf.fit`), each rank with the same queries and its own training rows:

- **rows.** Training data: each rank scores the shard it passes, as given. A :class:`~hookinf.GradientStore` (the same
  path on every rank): rank ``r`` of ``w`` takes the contiguous block of rows ``[⌊r n/w⌋, ⌊(r+1) n/w⌋)`` of the
  store's storage order (:func:`store_block`) and reads only the shards that overlap it (:func:`store_rows`); every
  pass of :class:`~hookinf.runner.Runner` over a store does so, a fit's passes too.
- **curvature.** Fitted over every rank's rows (one all-reduce per pass, :mod:`hookinf.distributed`), so every rank
  preconditions the same queries with the same curvature; a fitted curvature is used as given. The query methods
  (DataInf, LiSSA), which stream over the training data for each set of queries, are refused (:func:`check_shared`).
- **gathers.** ``influence`` and ``self_influence`` gather every rank's columns (:func:`gather_columns`) in rank order
  — the shards concatenated, or the store's storage order, which the helpers then sort by id exactly as one process
  does — so every rank returns the whole result. ``top_k`` gathers only each rank's ``k`` best entries per query and
  direction, with their per-layer parts (``O(w × n_query × k)`` numbers, never ``n_query × n_train``), and merges them
  with :func:`~hookinf.ranking.top_entries` (:func:`merged_top_k`): the larger score first (the smaller for helpful
  entries), ties to the smaller column, as :meth:`hookinf.Scores.top_k` ranks the dense scores.
- **failures.** The helpers run their passes inside :func:`~hookinf.distributed.announcing`: a rank that raises tells
  the others, which raise :class:`~hookinf.errors.DistributedError` before any gather, instead of waiting in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hookinf.distributed import Ranks
from hookinf.errors import ConfigurationError, DataError
from hookinf.ids import Ids, sort_order, take
from hookinf.methods import empty_train
from hookinf.ranking import top_entries
from hookinf.store import GradientStore
from hookinf.store_format import read_ids, read_tensors
from hookinf.streaming import RunningTopK


def store_block(n: int, ranks: Ranks | None) -> tuple[int, int]:
    """The rows ``[start, stop)`` (storage order) of a store of ``n`` examples that this rank scores (all, alone)."""
    if ranks is None:
        return 0, n
    return ranks.rank * n // ranks.size, (ranks.rank + 1) * n // ranks.size


def store_rows(
    store: GradientStore, devices: Mapping[str, torch.device] | None, ranks: Ranks | None
) -> Iterator[tuple[int, Ids, dict[str, Tensor]]]:
    """``(start, ids, {layer: [n_k, r_l]})`` for this rank's rows of ``store`` (:func:`store_block`), shard by shard.

    ``start`` is the row (in storage order) of the chunk's first example. Shards outside the block are not read; a
    shard the block cuts is read whole and sliced. Device placement is that of :meth:`GradientStore.chunks`.
    """
    first, stop = store_block(len(store), ranks)
    targets = set((devices or {}).values())
    direct = targets.pop() if len(targets) == 1 else torch.device("cpu")
    start = 0
    for shard in store.shards:
        end, begin = start + shard.count, start
        start = end
        if end <= first or begin >= stop:
            continue
        tensors = read_tensors(store.path, shard, list(store.layers), direct)
        ids = read_ids(store.path, store.manifest, shard)
        if devices and len(set(devices.values())) > 1:  # a model split over devices: each layer to its own
            tensors = {name: tensor.to(devices.get(name, direct)) for name, tensor in tensors.items()}
        low, high = max(first, begin) - begin, min(stop, end) - begin
        if (low, high) != (0, shard.count):
            tensors = {name: tensor[low:high] for name, tensor in tensors.items()}
            ids = take(ids, range(low, high))
        yield begin + low, ids, tensors


def check_shared(fitted: bool, method: str, ranks: Ranks | None) -> None:
    """Refuses a query method across ranks (it would need its own passes summed over them).

    Args:
        fitted: the method preconditions with a fitted curvature (else it streams over the data per set of queries).
        method: the method's name, for the message.
        ranks: the ranks (``None``: one process, where every method goes).

    Raises:
        ConfigurationError: names the methods that work across ranks, and ``group=None``.
    """
    if ranks is not None and not fitted:
        raise ConfigurationError(
            f"method={method!r} preconditions each set of queries with its own passes over the training data, which "
            f"hookinf does not sum across ranks; score across ranks with a fitted method ('exact', 'kfac', 'ekfac', "
            f"'identity' or a fitted Curvature), or pass group=None to run {method} on one rank over all the data."
        )


def check_candidates(ranks: Ranks | None) -> None:
    """Refuses ``candidates`` for training data split across ranks (:func:`hookinf.top_k` over data, not a store).

    Raises:
        ConfigurationError: names what to do instead.
    """
    if ranks is not None:
        raise ConfigurationError(
            "candidates= names training columns, which training data split across ranks only has once every rank has "
            "counted its shard; rank a gradient store (hookinf.log(..., ids=...)), whose columns every rank knows, or "
            "pass group=None."
        )


def gather_columns(
    blocks: Mapping[str, Sequence[Tensor]],
    ranks: Ranks | None,
    *,
    dim: int,
    ndim: int,
    join: Callable[[list[Tensor]], Tensor],
) -> dict[str, Tensor]:
    """Each layer's scores over the training rows: this rank's blocks joined, then concatenated over the ranks.

    Args:
        blocks: layer → this rank's blocks of scores, one per step, the training examples along ``dim``.
        ranks: the ranks (``None``: the blocks are all there is).
        dim: the training dimension (1 for ``[n_query, B]`` and ``[n_query, B, T]``, 0 for self-influence ``[B]``).
        ndim: the blocks' number of dimensions.
        join: joins one layer's blocks along ``dim`` (``torch.cat``, or :func:`~hookinf.pairwise.pad_cat`).

    Returns:
        layer → the scores of every rank's rows, rank 0's first (positions zero-padded to the longest), on every rank.

    Raises:
        DataError: no rank scored any training example.
    """
    if ranks is None:
        if not any(blocks.values()):
            raise empty_train()
        return {name: join(list(parts)) for name, parts in blocks.items()}
    local = [
        join(list(parts)).movedim(dim, 0) if parts else torch.zeros([0] * ndim, device="cpu")
        for parts in blocks.values()
    ]
    gathered = ranks.gather(local, "gathering the scores of every rank's training examples")
    if not gathered or gathered[0].shape[0] == 0:
        raise empty_train()
    return {name: part.movedim(0, dim).contiguous() for name, part in zip(blocks, gathered, strict=True)}


def cat1(parts: list[Tensor]) -> Tensor:
    """``[n_query, B]`` blocks of scores joined along the training examples (the ``join`` of :func:`gather_columns`)."""
    return torch.cat(parts, dim=1)


def id_order(train: Iterable[Any] | GradientStore) -> tuple[Ids | None, slice | Tensor]:
    """A store's ids sorted, and the permutation that sorts its examples by id (stable); ``slice(None)`` for data.

    A store is written in the order of the user's (often shuffled) loop; sorting by id makes column ``j`` the
    example with the ``j``-th smallest id, so with dataset indices as ids, column ``j`` is example ``j``. The
    permutation applies to the columns of the whole store in storage order, which is what :func:`gather_columns`
    returns on every rank.
    """
    if not isinstance(train, GradientStore):
        return None, slice(None)
    ids = train.ids
    order = sort_order(ids)  # strings sort by code point
    return take(ids, order), order


@dataclass(frozen=True)
class Kept:
    """One direction's chosen entries per query, best first.

    Attributes:
        scores: ``[n_query, k]`` total scores.
        columns: ``[n_query, k]`` int64 training columns.
        parts: layer → ``[n_query, k]``, each layer's part of ``scores``.
        tokens: layer → ``[n_query, k, T]``, the parts split over positions (``top_k(per_token=True)``, one process
            only); empty otherwise.
    """

    scores: Tensor
    columns: Tensor
    parts: dict[str, Tensor]
    tokens: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranked:
    """The merged top-k of every rank: the most harmful and most helpful entries, and how many rows were ranked."""

    harmful: Kept
    helpful: Kept
    seen: int


def merged_top_k(running: RunningTopK, ranks: Ranks | None, layers: Sequence[str], *, positions: bool) -> Ranked:
    """The ``k`` best entries per query and direction over every rank's rows (module docstring: **gathers**).

    Args:
        running: this rank's running top-k.
        ranks: the ranks (``None``: ``running`` is everything).
        layers: the layers of the parts, in model order (the same on every rank).
        positions: the columns are positions in this rank's shard of training data, made global by adding the rows of
            the ranks before it; ``False``: they are global already (a store's, which every rank knows).

    Raises:
        DataError: no rank ranked any row, or a query has fewer than ``k`` candidates among every rank's rows.
    """
    if ranks is None:
        harmful, helpful = running.sides()
        return Ranked(
            Kept(harmful.scores, harmful.columns, harmful.parts, harmful.tokens),
            Kept(helpful.scores, helpful.columns, helpful.parts, helpful.tokens),
            running.seen,
        )
    kept = running.kept()
    local = [torch.tensor([running.seen], device="cpu")]
    for side in kept if kept is not None else (None, None):
        if side is None:
            empty = torch.zeros(0, 0, device="cpu")
            local += [empty, empty.long(), *[empty for _ in layers], torch.zeros(0, dtype=torch.int64, device="cpu")]
        else:  # entries along the first dimension, with the rank that chose them
            source = torch.full((int(side.scores.shape[1]),), ranks.rank, dtype=torch.int64, device=side.scores.device)
            local += [side.scores.T, side.columns.T, *[side.parts[name].T for name in layers], source]
    gathered = ranks.gather(local, "gathering every rank's top-k entries")
    seen = gathered[0]
    offsets = seen.cumsum(0) - seen  # rows of the ranks before each one
    width = 3 + len(layers)
    sides = []
    for largest, block in ((True, gathered[1 : 1 + width]), (False, gathered[1 + width :])):
        scores, columns, source = block[0].T, block[1].T, block[-1]
        if scores.shape[1] == 0:
            raise DataError("train is empty: there is nothing to rank.")
        if positions:
            columns = columns + offsets.to(columns.device)[source.to(columns.device)]
        at = top_entries(scores, columns, min(running.k, int(scores.shape[1])), largest=largest)
        parts = {name: part.T.gather(1, at.to(part.device)) for name, part in zip(layers, block[2:-1], strict=True)}
        sides.append(Kept(scores.gather(1, at), columns.gather(1, at), parts))
    total = int(seen.sum())
    if running.candidates is not None and not all(bool(torch.isfinite(side.scores).all()) for side in sides):
        raise DataError(
            f"some candidates are not among the training examples ranked: each query needs at least k={running.k} "
            f"candidates among the {total} training columns of the {ranks.size} ranks."
        )
    return Ranked(sides[0], sides[1], total)
