"""What every influence method provides: a fit over training passes that yields a :class:`~hookinf.Curvature`.

A method reads the training data through ``passes(description)``, which runs one pass and yields the captured
:class:`~hookinf.capture.Step` objects (per-example factors ``a`` ``[B, S, I]`` and ``δ`` ``[B, S, O]`` of every
layer). Multi-pass methods (EK-FAC) call it more than once; the data is iterated in the same order each time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping

import torch

from hookinf.capture import Step
from hookinf.curvature import Curvature, LayerShape
from hookinf.damping import Damping

Passes = Callable[[str], Iterable[Step]]
"""``passes(description)`` runs one pass over the training data and yields its steps."""


class Method(ABC):
    """An influence method: how ``(G_l + λ_l I)⁻¹`` is approximated."""

    #: the name used by ``method=`` and in reports.
    name: str

    def check(self, shapes: Mapping[str, LayerShape]) -> None:  # noqa: B027 - optional hook
        """Refuses layers the method cannot handle before any data is read (default: accepts all)."""

    @abstractmethod
    def fit(
        self,
        passes: Passes,
        shapes: Mapping[str, LayerShape],
        damping: Damping,
        dtype: torch.dtype,
    ) -> Curvature:
        """Accumulates the method's statistics over the training data.

        Args:
            passes: runs a pass over the training data (see the module docstring).
            shapes: tracked layers and their gradient shapes, in model order.
            damping: the damping rule stored with the curvature.
            dtype: the dtype statistics accumulate in (float64 for float64 models, float32 at least otherwise).
        """
