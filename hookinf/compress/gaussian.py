"""Gaussian projection of the full per-example gradient (the TRAK / Johnson–Lindenstrauss baseline).

Per layer a dense ``P ∈ R^{r × d_l}`` with entries ``N(0, 1/r)``; the compressed gradient is ``P vec(g)``. It needs
the full per-example gradient (``O(B d_l)``) and the projection (``O(r d_l)`` memory and time per example) — the
cost the dropout-compression paper and LoGra avoid; hookinf offers it as the baseline, and refuses projections
larger than ``max_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hookinf.capture import LayerCapture
from hookinf.compress.base import BoundCompressor, Compressor, layer_generator, vector_capture, vector_shape
from hookinf.errors import ConfigurationError
from hookinf.shapes import LayerShape


@dataclass(frozen=True)
class Gaussian(Compressor):
    """A dense Gaussian projection to ``r`` dimensions per layer.

    Attributes:
        r: projected dimension per layer (clipped to ``d_l``).
        seed: seeds every layer's projection (combined with the layer's name).
        max_bytes: refuse when the projections of all layers together (float64) would exceed this (default 2 GiB).
    """

    r: int
    seed: int = 0
    max_bytes: int = 2 * 2**30
    kind = "gaussian"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigurationError(f"Gaussian(r={self.r!r}) must be a positive integer.")

    def bind(self, shapes: Mapping[str, LayerShape]) -> BoundGaussian:
        """Draws each layer's ``[r, d_l]`` projection (refusing sizes above ``max_bytes``)."""
        total = sum(8 * min(self.r, s.dim) * s.dim for s in shapes.values())
        if total > self.max_bytes:
            worst = max(shapes, key=lambda n: shapes[n].dim)
            raise ConfigurationError(
                f"Gaussian(r={self.r}) needs {total / 2**30:.2f} GiB of projection matrices (O(r·d) per layer; the "
                f"largest layer, '{worst}', has d={shapes[worst].dim}), above max_bytes={self.max_bytes}. Use "
                f"hookinf.LoGra or hookinf.Dropout, which need no dense projection, a smaller r, or raise max_bytes."
            )
        return BoundGaussian(self, shapes)


class BoundGaussian(BoundCompressor):
    """Dense projections per layer."""

    compressor: Gaussian

    def __init__(self, compressor: Gaussian, shapes: Mapping[str, LayerShape]) -> None:
        super().__init__(compressor, shapes)
        self.matrices: dict[str, Tensor] = {}
        for name, shape in shapes.items():
            r = min(compressor.r, shape.dim)
            generator = layer_generator(compressor.seed, name)
            drawn = torch.randn(r, shape.dim, generator=generator, dtype=torch.float64, device="cpu")
            self.matrices[name] = drawn / math.sqrt(r)
            self.shapes[name] = vector_shape(r)

    def project_activations(self, layer: str, a: Tensor) -> Tensor:
        """``a`` itself: the dense projection needs the whole gradient."""
        return a

    def project_output_gradients(self, layer: str, delta: Tensor) -> Tensor:
        """``δ`` itself."""
        return delta

    def combine(self, layer: str, a: Tensor, delta: Tensor) -> LayerCapture:
        """``P vec(g)`` for every example (forms the per-example gradients)."""
        grads = LayerCapture(name=layer, a=a, delta=delta, adapter=None).gradients().flatten(1)
        matrix = self.placed(self.matrices[layer], grads)
        return vector_capture(layer, grads @ matrix.T)

    def projection(self, layer: str) -> Tensor:
        """``P`` ``[r, d]``."""
        return self.matrices[layer]
