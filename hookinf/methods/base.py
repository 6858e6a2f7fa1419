"""What every influence method provides: statistics accumulated from captured steps into a :class:`Curvature`.

The statistics of one pass are accumulated by an :class:`Accumulator`, fed one :class:`~hookinf.capture.Step` at a
time (per-example factors ``a`` ``[B, S, I]`` and ``δ`` ``[B, S, O]`` of every layer), so the same code serves
:func:`hookinf.fit` (which runs the passes itself through ``passes(description)``) and a
:func:`hookinf.watch` around the user's own loop (which feeds the steps of that loop). Multi-pass methods (EK-FAC)
override :meth:`Method.fit`; the data is iterated in the same order on each pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping

import torch

from hookinf.capture import Step
from hookinf.curvature import Curvature, LayerShape
from hookinf.damping import Damping
from hookinf.errors import DataError

Passes = Callable[[str], Iterable[Step]]
"""``passes(description)`` runs one pass over the training data and yields its steps."""


class Accumulator(ABC):
    """Additive statistics of one pass, updated step by step."""

    def __init__(self) -> None:
        self.count = 0

    def update(self, step: Step) -> None:
        """Adds one step's examples."""
        self.count += step.batch_size
        self._update(step)

    @abstractmethod
    def _update(self, step: Step) -> None:
        """Adds one step's examples to the sums."""

    @abstractmethod
    def finish(self, damping: Damping) -> Curvature:
        """The curvature of everything accumulated so far."""

    def _require_data(self) -> None:
        if self.count == 0:
            raise DataError("train is empty: pass at least one batch of training examples.")


class Method(ABC):
    """An influence method: how ``(G_l + λ_l I)⁻¹`` is approximated."""

    #: the name used by ``method=`` and in reports.
    name: str

    def check(self, shapes: Mapping[str, LayerShape]) -> None:  # noqa: B027 - optional hook
        """Refuses layers the method cannot handle before any data is read (default: accepts all)."""

    @abstractmethod
    def accumulator(self, shapes: Mapping[str, LayerShape], dtype: torch.dtype) -> Accumulator:
        """A fresh accumulator for one pass of this method over the data (single-pass statistics)."""

    def fit(
        self,
        passes: Passes,
        shapes: Mapping[str, LayerShape],
        damping: Damping,
        dtype: torch.dtype,
    ) -> Curvature:
        """Accumulates the method's statistics over the training data (one pass by default).

        Args:
            passes: runs a pass over the training data (see the module docstring).
            shapes: tracked layers and their gradient shapes, in model order.
            damping: the damping rule stored with the curvature.
            dtype: the dtype statistics accumulate in (float64 for float64 models, float32 at least otherwise).
        """
        self.check(shapes)
        accumulator = self.accumulator(shapes, dtype)
        for step in passes(f"fit {self.name}"):
            accumulator.update(step)
        return accumulator.finish(damping)
