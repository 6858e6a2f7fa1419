"""LoGra (Choe et al. 2024, "What is your data worth to GPT?"): Kronecker-factored projection of the factors.

Per layer, ``P_in ∈ R^{r_in × I}`` (``I`` counts the bias coordinate) and ``P_out ∈ R^{r_out × O}``; an example's
compressed gradient is ``Σ_s (P_out δ_s)(P_in a_s)ᵀ = P_out g P_inᵀ``, i.e. ``(P_out ⊗ P_in) vec(g)``, at a cost of
``O(S (I r_in + O r_out))`` per example — no full gradient is ever formed. Because the projected factors keep the
canonical ``[B, S, ·]`` form, K-FAC and EK-FAC can be fitted on them directly (LogIX's recipe).

Inside a watch the projections run in the hooks: ``a P_inᵀ`` in the forward hook — an affine map of the layer's
input for dense layers, a convolution with ``r_in`` kernels for convolutions (no unfold) — and ``δ P_outᵀ`` in the
gradient hook, so only the ``[B, S, r]`` factors are ever held.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from hookinf.capture import LayerCapture
from hookinf.compress.base import BoundCompressor, Compressor, layer_generator
from hookinf.errors import ConfigurationError
from hookinf.layers import LayerAdapter
from hookinf.shapes import LayerShape


def draw(rows: int, cols: int, init: str, generator: torch.Generator) -> Tensor:
    """A ``[rows, cols]`` float64 projection: Gaussian ``N(0, 1/rows)`` or with orthonormal rows."""
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64, device="cpu")
    if init == "gaussian":
        return gaussian / math.sqrt(rows)
    q, r = torch.linalg.qr(gaussian.T)  # [cols, rows] with orthonormal columns
    basis: Tensor = q * torch.sign(torch.diagonal(r))  # sign fix: a unique, seed-determined basis
    return basis.T


@dataclass(frozen=True)
class LoGra(Compressor):
    """LoGra's per-layer projections ``P_in`` ``[r_in, I]`` and ``P_out`` ``[r_out, O]``.

    Attributes:
        r_in: input rank (clipped to each layer's ``I``).
        r_out: output rank (clipped to each layer's ``O``).
        init: ``"gaussian"`` (entries ``N(0, 1/r)``) or ``"orthogonal"`` (orthonormal rows; at full rank the
            projection is orthogonal and influence is unchanged).
        seed: seeds every layer's projections (combined with the layer's name).
    """

    r_in: int
    r_out: int
    init: Literal["gaussian", "orthogonal"] = "gaussian"
    seed: int = 0
    kind = "logra"

    def __post_init__(self) -> None:
        for name in ("r_in", "r_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"LoGra({name}={value!r}) must be a positive integer.")
        if self.init not in ("gaussian", "orthogonal"):
            raise ConfigurationError(f"LoGra(init={self.init!r}) must be 'gaussian' or 'orthogonal'.")

    def bind(self, shapes: Mapping[str, LayerShape]) -> BoundLoGra:
        """Draws ``P_in`` and ``P_out`` for each layer."""
        return BoundLoGra(self, shapes)


class BoundLoGra(BoundCompressor):
    """LoGra projections drawn for specific layers."""

    compressor: LoGra

    def __init__(self, compressor: LoGra, shapes: Mapping[str, LayerShape]) -> None:
        super().__init__(compressor, shapes)
        self.p_in: dict[str, Tensor] = {}
        self.p_out: dict[str, Tensor] = {}
        for name, shape in shapes.items():
            r_in, r_out = min(compressor.r_in, shape.in_features), min(compressor.r_out, shape.out_features)
            # one generator per factor, so changing r_in leaves P_out unchanged (and Gaussian ranks nest)
            self.p_in[name] = draw(
                r_in, shape.in_features, compressor.init, layer_generator(compressor.seed, name + "/in")
            )
            self.p_out[name] = draw(
                r_out, shape.out_features, compressor.init, layer_generator(compressor.seed, name + "/out")
            )
            self.shapes[name] = LayerShape(r_out, r_in, ())

    def project_activations(self, layer: str, a: Tensor) -> Tensor:
        """``a' = a P_inᵀ``."""
        return _project(a, self.placed(self.p_in[layer], a))

    def activations(self, layer: str, adapter: LayerAdapter, x: Tensor) -> Tensor:
        """``a P_inᵀ`` from the module's input, never forming ``a`` (see the adapter's ``projected_activations``)."""
        return adapter.projected_activations(x, self.placed(self.p_in[layer], x))

    def project_output_gradients(self, layer: str, delta: Tensor) -> Tensor:
        """``δ' = δ P_outᵀ``."""
        return _project(delta, self.placed(self.p_out[layer], delta))

    def combine(self, layer: str, a: Tensor, delta: Tensor) -> LayerCapture:
        """The projected factors are the compressed capture (``Σ_s δ'_s a'_sᵀ = P_out g P_inᵀ``)."""
        return LayerCapture(name=layer, a=a, delta=delta, adapter=None)

    def projection(self, layer: str) -> Tensor:
        """``P_out ⊗ P_in`` ``[r_out r_in, O I]``."""
        return torch.kron(self.p_out[layer], self.p_in[layer])


def _project(factor: Tensor, projection: Tensor) -> Tensor:
    """``factor Pᵀ`` for ``[B, S, F]`` factors, without copying a factor that is a transposed view.

    A convolution's ``δ`` is its ``[B, O, L]`` output gradient seen as ``[B, L, O]``; ``factor @ Pᵀ`` would first copy
    it into ``[B·L, O]`` rows, while ``(P @ factorᵀ)ᵀ`` reads it as it lies.
    """
    if factor.dim() == 3 and factor.stride(-2) == 1 and factor.shape[-2] > 1 and not factor.is_contiguous():
        return (projection @ factor.mT).mT
    return factor @ projection.T
