"""``identity``: no curvature, ``(G_l + λ_l I)⁻¹ := I`` — the TracIn / "Hessian-free" baseline.

Influence is then ``−Σ_l ⟨g_l(z_q), g_l(z)⟩`` (Pruthi et al. 2020, TracIn at a single checkpoint; the
"Hessian-free" baseline of Kwon et al. 2023, §4.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

from hookinf.capture import Step
from hookinf.damping import Damping
from hookinf.layers.base import LayerAdapter
from hookinf.methods.base import Method, Preconditioner


class IdentityPreconditioner(Preconditioner):
    """Returns gradients unchanged (in float64)."""

    def __init__(self) -> None:
        self.damping = {}
        self.num_examples = 0

    def apply(self, layer: str, grads: Tensor) -> Tensor:
        """Returns ``grads`` as float64."""
        return grads.double()


class Identity(Method):
    """The identity method (no fit, no damping)."""

    name = "identity"
    needs_fit = False

    def fit(self, steps: Iterable[Step], adapters: Mapping[str, LayerAdapter], damping: Damping) -> Preconditioner:
        """Returns the identity; ``steps`` is not read."""
        return IdentityPreconditioner()
