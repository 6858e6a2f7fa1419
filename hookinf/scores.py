"""``Scores``: influence of training examples on queries, kept per layer.

``Scores.per_layer[l][q, j] = −g_l(z_q)ᵀ (G_l + λ_l I)⁻¹ g_l(z_j)`` and ``Scores.total = Σ_l per_layer[l]``.
Positive scores are *harmful* (up-weighting training example ``j`` increases query ``q``'s loss), negative scores
are *helpful*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from torch import Tensor

from hookinf.errors import ConfigurationError


@dataclass(frozen=True)
class TopK:
    """The ``k`` most harmful and most helpful training examples per query.

    Attributes:
        harmful: ``[n_query, k]`` training indices, most harmful (largest score) first.
        harmful_scores: ``[n_query, k]`` their scores.
        helpful: ``[n_query, k]`` training indices, most helpful (most negative score) first.
        helpful_scores: ``[n_query, k]`` their scores.
    """

    harmful: Tensor
    harmful_scores: Tensor
    helpful: Tensor
    helpful_scores: Tensor


@dataclass(frozen=True)
class Scores:
    """Per-layer influence scores of ``n_train`` training examples on ``n_query`` queries.

    Attributes:
        per_layer: layer name (model order) → ``[n_query, n_train]`` contribution of that layer.
        method: the method's name (``"exact"``, ``"identity"``, ...).
        damping: ``λ_l`` per layer as used (empty for ``identity``).
        per_token: with ``influence(..., per_token=True)``, layer → ``[n_query, n_train, T]`` scores split over
            the training examples' positions (summing over ``T`` to ``per_layer``); otherwise ``None``.
        ids: ``[n_train]`` ids of the training examples (one per column) when scored against a
            :class:`~hookinf.GradientStore`; otherwise ``None`` (column ``j`` is the ``j``-th training example).
        total: ``[n_query, n_train]``, the sum of the per-layer parts.
    """

    per_layer: dict[str, Tensor]
    method: str
    damping: dict[str, float] = field(default_factory=dict)
    per_token: dict[str, Tensor] | None = field(default=None, repr=False)
    ids: Tensor | None = field(default=None, repr=False)
    total: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.per_layer:
            raise ConfigurationError("Scores need at least one layer.")
        shapes = {tuple(t.shape) for t in self.per_layer.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ConfigurationError(f"per-layer scores must all be [n_query, n_train]; got shapes {sorted(shapes)}.")
        if self.ids is not None and tuple(self.ids.shape) != (next(iter(shapes))[1],):
            raise ConfigurationError(f"ids {list(self.ids.shape)} must have one id per column (n_train).")
        object.__setattr__(self, "total", torch.stack(list(self.per_layer.values())).sum(dim=0))

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
        """The ``k`` most harmful and most helpful training examples for each query."""
        if not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"top_k(k={k!r}): k must be a positive integer.")
        k = min(k, self.shape[1])
        harmful_scores, harmful = self.total.topk(k, dim=1, largest=True)
        helpful_scores, helpful = self.total.topk(k, dim=1, largest=False)
        return TopK(harmful, harmful_scores, helpful, helpful_scores)

    def layer_shares(self) -> dict[str, float]:
        """Each layer's share of the total absolute influence ``Σ_{q,j} |per_layer[l]|`` (sums to 1)."""
        mass = {name: float(part.abs().sum()) for name, part in self.per_layer.items()}
        total = sum(mass.values()) or 1.0
        return {name: value / total for name, value in mass.items()}

    def layer_table(self, title: str | None = None) -> Table:
        """A rich table: per layer, its share of |influence|, signed sum, and how many queries it dominates."""
        table = Table(title=title or f"Per-layer influence ({self.method})", title_justify="left")
        table.add_column("layer")
        table.add_column("share of |influence|", justify="right")
        table.add_column("signed sum", justify="right")
        table.add_column("dominates queries", justify="right")
        table.add_column("λ", justify="right")
        stacked = torch.stack([p.abs().sum(dim=1) for p in self.per_layer.values()])  # [L, n_query]
        dominant = torch.bincount(stacked.argmax(dim=0), minlength=len(self.per_layer))
        for idx, (name, share) in enumerate(self.layer_shares().items()):
            bar = "█" * round(20 * share)
            lam = self.damping.get(name)
            table.add_row(
                name or "<model>",
                f"{share:6.1%} {bar}",
                f"{float(self.per_layer[name].sum()):.4g}",
                str(int(dominant[idx])),
                "—" if lam is None else f"{lam:.3g}",
            )
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        n_query, n_train = self.shape
        yield f"Scores[{self.method}]: {n_query} queries × {n_train} training examples, {len(self.layers)} layers"
        yield self.layer_table()

    def __repr__(self) -> str:
        n_query, n_train = self.shape
        lines = [f"Scores(method={self.method!r}, n_query={n_query}, n_train={n_train}, layers={len(self.layers)})"]
        width = max(len(name) for name in self.layers) if self.layers else 0
        for name, share in self.layer_shares().items():
            lines.append(f"  {name or '<model>':<{width}}  {share:6.1%} of |influence|")
        return "\n".join(lines)
