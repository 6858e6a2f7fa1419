"""``identity``: no curvature, ``(G_l + λ_l I)⁻¹ := I`` — the TracIn / "Hessian-free" baseline.

Influence is then ``−Σ_l ⟨g_l(z_q), g_l(z)⟩`` (Pruthi et al. 2020, TracIn at a single checkpoint; the
"Hessian-free" baseline of Kwon et al. 2023, §4.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.compress import Compressor
from hookinf.curvature import Curvature, LayerStatistics
from hookinf.damping import Damping
from hookinf.methods.base import Accumulator, Method, RunPass
from hookinf.shapes import LayerShape


@dataclass(frozen=True)
class NoStatistics(LayerStatistics):
    """The identity keeps nothing per layer."""


class IdentityCurvature(Curvature):
    """Returns gradients unchanged; holds no statistics and no damping."""

    method = "identity"
    statistics_type = NoStatistics

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


class _CountOnly(Accumulator):
    def __init__(self, shapes: Mapping[str, LayerShape], compressor: Compressor | None) -> None:
        super().__init__(compressor)
        self.shapes = dict(shapes)

    def _update(self, step: Step) -> None:
        return None

    def finish(self, damping: Damping) -> Curvature:
        return identity(self.shapes, damping, self.count, self.compressor)


def identity(
    shapes: Mapping[str, LayerShape], damping: Damping, count: int, compressor: Compressor | None
) -> IdentityCurvature:
    """The identity curvature of the given layers."""
    return IdentityCurvature(shapes, damping, count, dict.fromkeys(shapes, NoStatistics()), compressor)


class Identity(Method):
    """The identity method (no pass over the data, no damping)."""

    name = "identity"

    def accumulator(
        self, shapes: Mapping[str, LayerShape], dtype: torch.dtype, compressor: Compressor | None = None
    ) -> Accumulator:
        """Counts examples and nothing else."""
        return _CountOnly(shapes, compressor)

    def fit(
        self,
        run_pass: RunPass,
        shapes: Mapping[str, LayerShape],
        damping: Damping,
        dtype: torch.dtype,
        compressor: Compressor | None = None,
    ) -> Curvature:
        """Returns the identity without reading the data."""
        return identity(shapes, damping, 0, compressor)
