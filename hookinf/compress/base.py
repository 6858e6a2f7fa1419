"""Gradient compressors: per layer, a seeded map from captured factors to a compressed gradient.

A compressor is configured once (a frozen dataclass: ranks, seed) and *bound* to the tracked layers' shapes, which
draws each layer's projection from ``(seed, layer name)`` in float64 (so a float32 and a float64 model get the same
projection up to rounding). A bound compressor maps every :class:`~hookinf.capture.LayerCapture` of a step to a
compressed capture of the same canonical form, so every influence method runs unchanged in the compressed space.
Compression is three maps: one of the activations, one of the output gradients (each per position) and their
combination into the compressed capture. So a bound compressor is also a :class:`~hookinf.pipeline.FactorMap`: a
watch applies the first two inside its hooks and keeps only what they return (LoGra's ``[B, S, r]``), and
:meth:`BoundCompressor.compress` applies all three to a step captured without it — the same numbers.


* LoGra keeps the factor structure: ``a' = a P_inᵀ`` ``[B, S, r_in]``, ``δ' = δ P_outᵀ`` ``[B, S, r_out]``, and
  the compressed gradient is ``Σ_s δ'_s a'_sᵀ = P_out g P_inᵀ`` (``(P_out ⊗ P_in) vec(g)``).
* Dropout and Gaussian give a vector ``g'`` ``[B, r]`` stored as ``δ' = g'`` ``[B, 1, r]`` with ``a' = 1``
  ``[B, 1, 1]``, i.e. an ``[r, 1]`` gradient matrix.

Each bound compressor exposes what it did (:meth:`BoundCompressor.projection`, the explicit ``[r, d]`` matrix) so
tests can check it against the projection of a ``torch.func`` gradient.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor

from hookinf.capture import LayerCapture, Step
from hookinf.errors import ConfigurationError
from hookinf.layers import LayerAdapter
from hookinf.shapes import LayerShape


def layer_generator(seed: int, layer: str) -> torch.Generator:
    """A generator seeded from ``seed`` and the layer's name (stable across runs and processes)."""
    digest = hashlib.sha256(f"{seed}:{layer}".encode()).digest()
    # a host generator: projections are drawn on the CPU in float64 whatever the model's device, so a CUDA and a CPU
    # run (or torch.set_default_device) draw the same numbers
    generator = torch.Generator(device="cpu")
    return generator.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


class Compressor(ABC):
    """Configuration of a compressor (ranks, seed); :meth:`bind` draws the per-layer projections."""

    #: short name used in manifests and reports.
    kind: str

    def config(self) -> dict[str, Any]:
        """JSON-ready configuration (identifies the compressor in stores and curvatures)."""
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]

    @abstractmethod
    def bind(self, shapes: Mapping[str, LayerShape]) -> BoundCompressor:
        """Draws the projections for the given layers."""


def require_compressor(compress: object) -> None:
    """Refuses anything but a hookinf compressor (``None`` passes: no compression), naming the three there are."""
    if compress is not None and not isinstance(compress, Compressor):
        raise ConfigurationError(
            f"compress={compress!r} must be a hookinf compressor: hookinf.LoGra(r_in, r_out), "
            f"hookinf.Dropout(r=...) or hookinf.Gaussian(r)."
        )


class BoundCompressor(ABC):
    """A compressor with its projections drawn for specific layers.

    Attributes:
        compressor: the configuration.
        shapes: compressed layer shapes ``(O', I')`` per layer, in model order.
    """

    def __init__(self, compressor: Compressor, shapes: Mapping[str, LayerShape]) -> None:
        self.compressor = compressor
        self.original = dict(shapes)
        self.shapes: dict[str, LayerShape] = {}
        self._placed: dict[tuple[int, torch.dtype | None, torch.device], Tensor] = {}

    def placed(self, tensor: Tensor, like: Tensor, cast: bool = True) -> Tensor:
        """``tensor`` (a host-side projection or index) on ``like``'s device (and in its dtype when ``cast``).

        Cached per tensor, dtype and device: after a layer's first step no projection is cast or copied again, so a
        step on an accelerator makes no host-to-device copy.
        """
        dtype = like.dtype if cast else None
        key = (id(tensor), dtype, like.device)
        out = self._placed.get(key)
        if out is None:
            out = self._placed[key] = tensor.to(device=like.device, dtype=dtype)
        return out

    def compress(self, step: Step) -> Step:
        """The step with every layer's factors replaced by their compressed form."""
        layers = {name: self.compress_layer(capture) for name, capture in step.layers.items()}
        return replace(step, layers=layers)

    def compress_layer(self, capture: LayerCapture) -> LayerCapture:
        """Compressed factors of one layer."""
        name = capture.name
        a = self.project_activations(name, capture.a)
        return self.combine(name, a, self.project_output_gradients(name, capture.delta))

    # ---- the same maps inside a watch's hooks (hookinf.pipeline.FactorMap)
    def activations(self, layer: str, adapter: LayerAdapter, x: Tensor) -> Tensor:
        """The module's input → the activations' compressed form (what the forward hook keeps)."""
        return self.project_activations(layer, adapter.activations(x))

    def output_gradients(self, layer: str, delta: Tensor) -> Tensor:
        """``δ`` ``[B, S, O]`` → its compressed form (what the gradient hook keeps)."""
        return self.project_output_gradients(layer, delta)

    def capture(self, layer: str, a: Tensor, delta: Tensor, adapter: LayerAdapter) -> LayerCapture:
        """The compressed capture from the step's mapped factors."""
        return self.combine(layer, a, delta)

    @abstractmethod
    def project_activations(self, layer: str, a: Tensor) -> Tensor:
        """``a`` ``[B, S, I]`` → ``[B, S, ·]``, per position."""

    @abstractmethod
    def project_output_gradients(self, layer: str, delta: Tensor) -> Tensor:
        """``δ`` ``[B, S, O]`` → ``[B, S, ·]``, per position and linear."""

    @abstractmethod
    def combine(self, layer: str, a: Tensor, delta: Tensor) -> LayerCapture:
        """The compressed capture from the two projected factors."""

    @abstractmethod
    def projection(self, layer: str) -> Tensor:
        """The explicit ``[r, d]`` matrix (float64) with ``vec(compressed g) = projection @ vec(g)``."""


def vector_capture(name: str, compressed: Tensor) -> LayerCapture:
    """A ``[B, r]`` compressed gradient in canonical form: ``δ' = g'`` ``[B, 1, r]``, ``a' = 1`` ``[B, 1, 1]``."""
    ones = compressed.new_ones(compressed.shape[0], 1, 1)
    return LayerCapture(name=name, a=ones, delta=compressed[:, None, :], adapter=None)


def vector_shape(r: int) -> LayerShape:
    """The :class:`LayerShape` of an ``r``-dimensional compressed gradient."""
    return LayerShape(r, 1, ())
