"""``identity``: no curvature, ``(G_l + λ_l I)⁻¹ := I`` — the TracIn / "Hessian-free" baseline.

Influence is then ``−Σ_l ⟨g_l(z_q), g_l(z)⟩`` (Pruthi et al. 2020, TracIn at a single checkpoint; the
"Hessian-free" baseline of Kwon et al. 2023, §4.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.curvature import Curvature, LayerShape
from hookinf.damping import Damping
from hookinf.methods.base import Accumulator, Method, Passes


class IdentityCurvature(Curvature):
    """Returns gradients unchanged; holds no statistics and no damping."""

    method = "identity"

    @property
    def lambdas(self) -> dict[str, float]:
        """Empty: the identity method has no damping."""
        return {}

    def _prepare(self, layer: str) -> None:
        return None

    def _apply(self, prepared: Any, grads: Tensor) -> Tensor:
        return grads

    def _lambda(self, prepared: Any) -> float:
        return 0.0

    def _eigen_range(self, layer: str) -> tuple[float, float]:
        return 1.0, 1.0


class _NoStatistics(Accumulator):
    def __init__(self, shapes: Mapping[str, LayerShape]) -> None:
        super().__init__()
        self.shapes = dict(shapes)

    def _update(self, step: Step) -> None:
        return None

    def finish(self, damping: Damping) -> Curvature:
        return IdentityCurvature(self.shapes, damping, self.count, {})


class Identity(Method):
    """The identity method (no pass over the data, no damping)."""

    name = "identity"

    def accumulator(self, shapes: Mapping[str, LayerShape], dtype: torch.dtype) -> Accumulator:
        """Counts examples and nothing else."""
        return _NoStatistics(shapes)

    def fit(self, passes: Passes, shapes: Mapping[str, LayerShape], damping: Damping, dtype: torch.dtype) -> Curvature:
        """Returns the identity without reading the data."""
        return IdentityCurvature(shapes, damping, 0, {})
