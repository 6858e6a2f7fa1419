"""Dropout compression (the dropout-compression paper, ``../shared/papers``, eq. (3)): keep ``r`` gradient entries.

Per layer, ``r`` distinct entries ``(row_k, col_k)`` of the ``[O, I]`` gradient matrix (bias column included) are
drawn once from the seed without replacement; an example's compressed gradient is
``g̃_k = Σ_s δ_s[row_k] a_s[col_k]``, gathered from the captured factors in ``O(S r)`` — no projection matrix and no
full gradient. In the paper's notation ``g̃ = Ĩ g`` with ``Ĩ`` ``r`` rows of the identity, and the compressed
influence is ``−g̃_qᵀ (Ĩ H Ĩᵀ + λ I)⁻¹ g̃`` (eq. (3)).
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
from hookinf.linalg import einsum
from hookinf.shapes import LayerShape


@dataclass(frozen=True)
class Dropout(Compressor):
    """Keep ``r`` random entries of each layer's gradient (or a fraction ``keep`` of them).

    Attributes:
        r: entries kept per layer (clipped to ``d_l``); give this or ``keep``.
        keep: fraction of each layer's ``d_l`` entries kept (``1.0`` keeps all, in a random order).
        seed: seeds every layer's draw (combined with the layer's name).
    """

    r: int | None = None
    keep: float | None = None
    seed: int = 0
    kind = "dropout"

    def __post_init__(self) -> None:
        if (self.r is None) == (self.keep is None):
            raise ConfigurationError("Dropout takes exactly one of r= (entries per layer) or keep= (a fraction).")
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1):
            raise ConfigurationError(f"Dropout(r={self.r!r}) must be a positive integer.")
        if self.keep is not None and not (isinstance(self.keep, int | float) and 0 < self.keep <= 1):
            raise ConfigurationError(f"Dropout(keep={self.keep!r}) must be a fraction in (0, 1].")

    def entries(self, dim: int) -> int:
        """How many entries a layer with ``dim`` parameters keeps."""
        if self.r is not None:
            return min(self.r, dim)
        assert self.keep is not None
        return max(1, min(dim, math.ceil(round(self.keep * dim, 9))))  # round: 0.07 * 100 is 7.000000000000001

    def bind(self, shapes: Mapping[str, LayerShape]) -> BoundDropout:
        """Draws each layer's kept entries."""
        return BoundDropout(self, shapes)


class BoundDropout(BoundCompressor):
    """Kept ``(row, col)`` index pairs per layer."""

    compressor: Dropout

    def __init__(self, compressor: Dropout, shapes: Mapping[str, LayerShape]) -> None:
        super().__init__(compressor, shapes)
        self.rows: dict[str, Tensor] = {}
        self.cols: dict[str, Tensor] = {}
        self._rows: dict[str, tuple[Tensor, Tensor]] = {}
        self._cols: dict[str, tuple[Tensor, Tensor]] = {}
        for name, shape in shapes.items():
            r = compressor.entries(shape.dim)
            flat = torch.randperm(shape.dim, generator=layer_generator(compressor.seed, name), device="cpu")[:r]
            self.rows[name], self.cols[name] = flat // shape.in_features, flat % shape.in_features
            # the distinct rows and columns an entry needs, and where each entry finds its own among them
            self._rows[name] = torch.unique(self.rows[name], return_inverse=True)
            self._cols[name] = torch.unique(self.cols[name], return_inverse=True)
            self.shapes[name] = vector_shape(r)

    def project_activations(self, layer: str, a: Tensor) -> Tensor:
        """The columns of ``a`` some kept entry uses (what a watch holds until the backward)."""
        return a[..., self.placed(self._cols[layer][0], a, cast=False)]

    def project_output_gradients(self, layer: str, delta: Tensor) -> Tensor:
        """The rows of ``δ`` some kept entry uses."""
        return delta[..., self.placed(self._rows[layer][0], delta, cast=False)]

    def combine(self, layer: str, a: Tensor, delta: Tensor) -> LayerCapture:
        """``g̃_k = Σ_s δ_s[row_k] a_s[col_k]`` for every example, from the kept rows and columns."""
        rows = self.placed(self._rows[layer][1], delta, cast=False)
        cols = self.placed(self._cols[layer][1], a, cast=False)
        return vector_capture(layer, einsum("bsk,bsk->bk", delta[..., rows], a[..., cols]))

    def projection(self, layer: str) -> Tensor:
        """``Ĩ``: ``r`` rows of the identity ``[r, d]``."""
        shape = self.original[layer]
        flat = self.rows[layer] * shape.in_features + self.cols[layer]
        out = torch.zeros(flat.numel(), shape.dim, dtype=torch.float64, device="cpu")
        out[torch.arange(flat.numel(), device="cpu"), flat] = 1.0
        return out
