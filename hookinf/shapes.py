"""``LayerShape``: a tracked layer's gradient shape, and the fingerprint of a model's tracked layers.

A pure data type shared by the capture, the compressors, the curvatures and the stores, so none of them needs
another to know what a layer looks like.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hookinf.layers.base import LayerAdapter


@dataclass(frozen=True)
class LayerShape:
    """A tracked layer's gradient shape ``(O, I)`` (``I`` counts the bias column) and parameter shapes."""

    out_features: int
    in_features: int
    params: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def dim(self) -> int:
        """``d_l = O × I``."""
        return self.out_features * self.in_features

    @classmethod
    def of(cls, adapter: LayerAdapter) -> LayerShape:
        """The shape of an adapter's layer."""
        out_features, in_features = adapter.shape
        weight = ("weight", tuple(adapter.weight_shape))
        params = (weight, ("bias", (out_features,))) if adapter.has_bias else (weight,)
        return cls(out_features, in_features, params)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"out": self.out_features, "in": self.in_features, "params": [[n, list(s)] for n, s in self.params]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LayerShape:
        """Inverse of :meth:`to_json`."""
        params = tuple((str(n), tuple(int(x) for x in s)) for n, s in data["params"])
        return cls(int(data["out"]), int(data["in"]), params)


def layer_shapes(adapters: Mapping[str, LayerAdapter]) -> dict[str, LayerShape]:
    """Layer name → :class:`LayerShape` of each adapter, in the given (model) order."""
    return {name: LayerShape.of(adapter) for name, adapter in adapters.items()}


def fingerprint(layers: Mapping[str, LayerShape]) -> str:
    """A short hash of the tracked layers' names and parameter shapes (identifies the model architecture)."""
    text = json.dumps({name: shape.to_json() for name, shape in layers.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
