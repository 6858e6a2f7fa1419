"""``SelfScores``: the self-influence of every training example, kept per layer.

``SelfScores.per_layer[l][j] = g_l(z_j)ᵀ (G_l + λ_l I)⁻¹ g_l(z_j)`` and ``SelfScores.total = Σ_l per_layer[l]``: the
diagonal of ``influence(model, train, train, ...)`` with the opposite sign (Koh & Liang 2017, §5.4; Kwon et al.
2023, §4.2). Large values mark training examples the model finds hard to fit, often mislabeled ones.

Like :class:`~hookinf.Scores` these are data and the operations on them (top-k with ids, layer shares); they import
no rendering code. ``total`` is what code written for the bare tensor :func:`hookinf.self_influence` used to return
reads: ``len``, indexing, ``.tolist()``, ``.shape`` and ``.topk(k).indices`` act on it, and :func:`hookinf.metrics.auc`
and the reports take a :class:`SelfScores` as they take that tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError, HookinfError
from hookinf.ids import Ids, check_ids, take
from hookinf.self_scores_file import SavedSelfScores, read_self_scores, write_self_scores


@dataclass(frozen=True)
class SelfTopK:
    """The ``k`` training examples with the largest self-influence, largest first.

    Attributes:
        values: ``[k]`` their self-influence (float64).
        indices: ``[k]`` their positions in :attr:`SelfScores.total` (int64).
        ids: their ids: the store's ids (``int64 [k]`` or ``k`` strings) when the scores have ids, else
            ``indices``.
    """

    values: Tensor
    indices: Tensor
    ids: Ids


@dataclass(frozen=True)
class SelfScores:
    """Per-layer self-influence of ``n`` training examples.

    Attributes:
        per_layer: layer name (model order) → ``[n]`` float64 contribution of that layer (``≥ 0`` for a positive
            definite damped curvature).
        method: the method's name (``"exact"``, ``"ekfac"``, ...).
        damping: ``λ_l`` per layer as used (empty when the method does not report it).
        ids: the ids of the training examples (one per entry) when computed from a :class:`~hookinf.GradientStore`,
            as the store holds them, sorted (``int64 [n]`` or a list of ``n`` strings); otherwise ``None`` (entry
            ``j`` is the ``j``-th training example).
        total: ``[n]`` float64, the sum of the per-layer parts.
    """

    per_layer: dict[str, Tensor]
    method: str
    damping: dict[str, float] = field(default_factory=dict)
    ids: Ids | None = field(default=None, repr=False)
    total: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.per_layer:
            raise ConfigurationError("SelfScores need at least one layer.")
        shapes = {tuple(part.shape) for part in self.per_layer.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ConfigurationError(f"per-layer self-influence must all be [n]; got shapes {sorted(shapes)}.")
        if self.ids is not None:
            check_ids(self.ids, next(iter(shapes))[0])
        device = next(iter(self.per_layer.values())).device  # layers on several devices are summed on the first's
        total = torch.stack([part.to(device).double() for part in self.per_layer.values()]).sum(dim=0)
        object.__setattr__(self, "total", total)

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names in model order."""
        return tuple(self.per_layer)

    @property
    def shape(self) -> torch.Size:
        """``(n,)``, the shape of :attr:`total`."""
        return self.total.shape

    def __len__(self) -> int:
        return int(self.total.shape[0])

    def __getitem__(self, index: Any) -> Tensor:
        """``total[index]``."""
        return self.total[index]

    def tolist(self) -> list[float]:
        """:attr:`total` as Python floats."""
        values: list[float] = self.total.tolist()
        return values

    def topk(self, k: int) -> SelfTopK:
        """The ``k`` largest self-influences (at most ``n``), with their positions and ids.

        Raises:
            ConfigurationError: ``k`` is not a positive integer.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"topk(k={k!r}): k must be a positive integer.")
        values, indices = self.total.topk(min(k, len(self)))
        return SelfTopK(values, indices, indices if self.ids is None else take(self.ids, indices.cpu()))

    def layer_shares(self) -> dict[str, float]:
        """Each layer's share of the total ``Σ_j |per_layer[l][j]|`` (sums to 1)."""
        mass = {name: float(part.abs().sum()) for name, part in self.per_layer.items()}
        total = sum(mass.values()) or 1.0
        return {name: value / total for name, value in mass.items()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Saves to the directory ``path`` (created when missing), all-or-nothing; returns it.

        One safetensors file named by its content and a sealed JSON manifest naming it with its size and SHA-256,
        renamed last (:mod:`hookinf.self_scores_file`): a save killed at any point leaves the previous self-influence
        or this one, never a mix, and :func:`load_self_scores` refuses a damaged or edited directory.

        Raises:
            HookinfError: the directory or a file in it cannot be written (names the directory; chained from the
                ``OSError``). The directory keeps what it held before.
        """
        directory = Path(path)
        write_self_scores(directory, SavedSelfScores(self.per_layer, self.method, self.damping, self.ids))
        return directory

    def __repr__(self) -> str:
        lines = [f"SelfScores(method={self.method!r}, n={len(self)}, layers={len(self.layers)})"]
        width = max(len(name or "<model>") for name in self.layers)
        for name, share in self.layer_shares().items():
            lines.append(f"  {name or '<model>':<{width}}  {share:6.1%} of self-influence")
        return "\n".join(lines)


def load_self_scores(path: str | os.PathLike[str]) -> SelfScores:
    """Loads :class:`SelfScores` saved by :meth:`SelfScores.save`, checking the files first.

    Raises:
        HookinfError: no self-influence at ``path``, or damaged or edited files (the message names the file).
    """
    directory = Path(path)
    saved = read_self_scores(directory)
    try:
        return SelfScores(saved.per_layer, saved.method, saved.damping, saved.ids)
    except ConfigurationError as err:
        raise HookinfError(f"{directory}: corrupt hookinf self-influence ({err})") from err
