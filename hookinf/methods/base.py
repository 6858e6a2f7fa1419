"""What every influence method provides: a fit over training steps that yields a :class:`Preconditioner`.

A preconditioner applies ``(G_l + λ_l I)⁻¹`` (or the method's approximation of it) to per-example gradients of
layer ``l`` given as matrices ``[N, O, I]``. Scores are then ``−⟨P_l g_l(z_q), g_l(z)⟩`` per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

from torch import Tensor

from hookinf.capture import Step
from hookinf.damping import Damping
from hookinf.layers.base import LayerAdapter


class Preconditioner(ABC):
    """A fitted inverse-curvature approximation, per layer.

    Attributes:
        damping: ``λ_l`` per layer as used (empty for methods without curvature).
        num_examples: number of training examples the fit saw (0 when it needs none).
    """

    damping: dict[str, float]
    num_examples: int

    @abstractmethod
    def apply(self, layer: str, grads: Tensor) -> Tensor:
        """Applies the layer's inverse-curvature approximation.

        Args:
            layer: layer name.
            grads: ``[N, O, I]`` gradient matrices.

        Returns:
            ``[N, O, I]``, the preconditioned gradients, in float64.
        """


class Method(ABC):
    """An influence method: how ``(G_l + λ_l I)⁻¹`` is approximated."""

    #: the name used by ``method=`` and in reports.
    name: str
    #: whether :meth:`fit` reads the training data (``False`` lets the helpers skip that pass).
    needs_fit: bool = True

    def check(self, adapters: Mapping[str, LayerAdapter]) -> None:  # noqa: B027 - optional hook
        """Refuses layers the method cannot handle before any data is read (default: accepts all)."""

    @abstractmethod
    def fit(self, steps: Iterable[Step], adapters: Mapping[str, LayerAdapter], damping: Damping) -> Preconditioner:
        """Builds the preconditioner from the training steps (per-example gradient factors of every layer)."""
