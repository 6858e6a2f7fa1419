"""Running per-query top-k over chunks of scores: memory ``O(n_query × (k + chunk))``, never ``n_query × n_train``.

:class:`RunningTopK` keeps, for each query, the ``k`` most harmful and ``k`` most helpful training examples seen so
far (with their per-layer parts). Each chunk's ``[n_query, c]`` scores are cut to the chunk's own best ``k`` by
:func:`~hookinf.ranking.top_entries`, and those are merged with the ``k`` kept so far (in effect a heap per query);
the order is that of :meth:`hookinf.Scores.top_k` on the dense scores, ties included (the smaller column first).
With per-token parts (``[n_query, c, S]`` per layer, Grosse et al. 2023 §3.3), the chosen entries keep theirs too:
memory ``O(n_query × (k + chunk) × T)`` per layer. Pure: tensors in, tensors out; :func:`hookinf.top_k` feeds it.

Index conventions: ``q`` queries, ``c`` training examples of a chunk, ``k`` kept entries, ``S``/``T`` positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from hookinf.errors import ConfigurationError, DataError
from hookinf.pairwise import pad_cat
from hookinf.ranking import top_entries
from hookinf.scores import TopK


@dataclass(frozen=True)
class Retrieved(TopK):
    """A :class:`~hookinf.TopK` found by streaming, with each chosen entry's per-layer parts.

    Columns (``harmful``, ``helpful``) are those of the dense :class:`~hookinf.Scores`: the position in ``train``,
    or for a gradient store the rank of the example's id among the stored ids (column ``j`` is example ``j`` when
    the ids are dataset indices).

    Attributes:
        harmful_parts: layer → ``[n_query, k]``: each layer's part of ``harmful_scores`` (they sum to it).
        helpful_parts: the same for ``helpful_scores``.
        method: the method's name (``"exact"``, ``"ekfac"``, ...).
        damping: ``λ_l`` per layer as used.
        n_train: how many training examples were ranked (scored, with ``candidates``).
        harmful_tokens: with ``top_k(..., per_token=True)``, layer → ``[n_query, k, T]``: each chosen entry's part
            split over the training example's positions (tokens), summing over ``T`` to ``harmful_parts`` (``T``
            the longest training sequence ranked; shorter ones padded with zeros), as ``Scores.per_token`` holds
            them; ``None`` otherwise.
        helpful_tokens: the same for the most helpful entries.
    """

    harmful_parts: dict[str, Tensor] = field(repr=False)
    helpful_parts: dict[str, Tensor] = field(repr=False)
    method: str = ""
    damping: dict[str, float] = field(default_factory=dict, repr=False)
    n_train: int = 0
    harmful_tokens: dict[str, Tensor] | None = field(default=None, repr=False)
    helpful_tokens: dict[str, Tensor] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        n_query, k = (int(n) for n in self.harmful.shape)
        lines = [f"Retrieved(method={self.method!r}, n_query={n_query}, k={k}, n_train={self.n_train})"]
        for q in range(min(n_query, 3)):
            harmful = _shown(self.harmful_ids, q, k)
            helpful = _shown(self.helpful_ids, q, k)
            lines.append(f"  query {q}: harmful {harmful}  helpful {helpful}")
        if n_query > 3:
            lines.append(f"  … {n_query - 3} more queries")
        return "\n".join(lines)


def _shown(ids: Tensor | list[list[str]], q: int, k: int) -> str:
    row = ids[q].tolist() if isinstance(ids, Tensor) else ids[q]
    return "[" + ", ".join(str(v) for v in row[:5]) + (", …]" if k > 5 else "]")


@dataclass
class _Side:
    """The entries kept for one direction: ``[q, k']`` scores, columns and per-layer parts (``k' ≤ k``).

    ``tokens`` holds, with per-token parts, layer → ``[q, k', T]`` (zero-padded to ``T`` positions); else nothing.
    """

    scores: Tensor
    columns: Tensor
    parts: dict[str, Tensor]
    tokens: dict[str, Tensor] = field(default_factory=dict)

    def take(self, at: Tensor) -> _Side:
        """The entries at positions ``at`` ``[q, k'']`` of each row."""
        return _Side(
            self.scores.gather(1, at), self.columns.gather(1, at),
            {name: part.gather(1, at) for name, part in self.parts.items()},
            {name: part.gather(1, at[..., None].expand(-1, -1, part.shape[2])) for name, part in self.tokens.items()},
        )  # fmt: skip

    def join(self, other: _Side) -> _Side:
        """This side's entries and then ``other``'s, per row (per-token parts padded to the longer ``T``)."""
        return _Side(
            torch.cat([self.scores, other.scores], dim=1), torch.cat([self.columns, other.columns], dim=1),
            {name: torch.cat([part, other.parts[name]], dim=1) for name, part in self.parts.items()},
            {name: pad_cat([part, other.tokens[name]]) for name, part in self.tokens.items()},
        )  # fmt: skip

    def padded(self, positions: int) -> _Side:
        """This side with its per-token parts zero-padded to ``positions``."""
        tokens = {name: F.pad(part, (0, positions - part.shape[2])) for name, part in self.tokens.items()}
        return _Side(self.scores, self.columns, self.parts, tokens)


class RunningTopK:
    """The ``k`` most harmful and most helpful entries per query, updated one chunk of scores at a time.

    Args:
        k: entries kept per query and direction.
        candidates: optional ``[n_query, m]`` training columns: query ``q`` ranks only its own candidates (its
            entries for other columns are ignored). ``k`` must not exceed ``m``.

    Raises:
        ConfigurationError: ``k`` is not a positive integer, or exceeds the candidates per query.
    """

    def __init__(self, k: int, candidates: Tensor | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"top_k(k={k!r}): k must be a positive integer.")
        if candidates is not None and k > int(candidates.shape[1]):
            raise ConfigurationError(f"k={k} exceeds the {int(candidates.shape[1])} candidates given per query.")
        self.k = k
        self.candidates = None if candidates is None else candidates.sort(dim=1).values
        self.seen = 0
        self.positions = 0  # the longest T of the per-token parts seen
        self._harmful: _Side | None = None
        self._helpful: _Side | None = None

    def update(self, parts: Mapping[str, Tensor], columns: Tensor, tokens: Mapping[str, Tensor] | None = None) -> None:
        """Adds one chunk: ``parts`` layer → ``[n_query, c]`` scores (model order), ``columns`` ``[c]`` int64.

        ``tokens``: optionally, layer → ``[n_query, c, S]`` per-token parts (summing over ``S`` to ``parts``), kept
        for the chosen entries; give them with every chunk or with none.
        """
        names = list(parts)
        device = parts[names[0]].device
        total = torch.stack([parts[name].to(device) for name in names]).sum(dim=0)  # as Scores.total sums them
        columns = columns.to(device)
        self.seen += int(columns.numel())
        split = {name: tokens[name].to(device) for name in names} if tokens else {}
        chunk = _Side(total, columns.expand_as(total), {name: parts[name].to(device) for name in names}, split)
        self.positions = max([self.positions, *(int(part.shape[2]) for part in split.values())])
        mask = None if self.candidates is None else candidate_mask(self.candidates.to(device), columns)
        for largest in (True, False):
            scores = total if mask is None else total.masked_fill(~mask, -torch.inf if largest else torch.inf)
            at = top_entries(scores, columns, min(self.k, int(scores.shape[1])), largest=largest)  # the chunk's own
            side = _Side(scores, chunk.columns, chunk.parts, chunk.tokens).take(at)
            kept = self._harmful if largest else self._helpful
            if kept is not None:  # the best k of the kept and the chunk's best: the best k of everything so far
                merged = kept.join(side)
                side = merged.take(top_entries(merged.scores, merged.columns, self.k, largest=largest))
            if largest:
                self._harmful = side
            else:
                self._helpful = side

    def kept(self) -> tuple[_Side, _Side] | None:
        """The harmful and helpful entries kept so far, unchecked (``None`` before the first chunk).

        What one rank contributes to the merge of :func:`hookinf.distributed_scores.merged_top_k`, which checks the
        merged entries as :meth:`sides` checks these.
        """
        if self._harmful is None or self._helpful is None:
            return None
        return self._harmful, self._helpful

    def sides(self) -> tuple[_Side, _Side]:
        """The kept harmful and helpful entries (per-token parts padded to the longest ``T`` seen).

        Raises:
            DataError: nothing was ranked, or fewer than ``k`` candidates of a query were among the chunks.
        """
        if self._harmful is None or self._helpful is None:
            raise DataError("train is empty: there is nothing to rank.")
        finite = bool(torch.isfinite(self._harmful.scores).all() & torch.isfinite(self._helpful.scores).all())
        if self.candidates is not None and not finite:
            raise DataError(
                f"some candidates are not among the training examples ranked: each query needs at least k={self.k} "
                f"candidates among the {self.seen} training columns."
            )
        return self._harmful.padded(self.positions), self._helpful.padded(self.positions)


def candidate_mask(candidates: Tensor, columns: Tensor) -> Tensor:
    """``[n_query, c]`` bool: whether each of a chunk's ``columns`` ``[c]`` is among each query's sorted candidates.

    Args:
        candidates: ``[n_query, m]`` training columns, sorted within each row.
        columns: ``[c]`` the chunk's columns.
    """
    wanted = columns.expand(candidates.shape[0], -1).contiguous()
    at = torch.searchsorted(candidates, wanted).clamp_(max=candidates.shape[1] - 1)
    return candidates.gather(1, at) == wanted
