"""Damping ``λ_l`` added to each layer's Gauss-Newton block before it is inverted.

The relative rule (the default) follows the DataInf paper (Kwon et al. 2023, §3, the choice
``λ_l = 0.1 × (n d_l)⁻¹ Σ_i ‖∇_{θ_l} ℓ_i‖²``) and the EK-FAC paper (Grosse et al. 2023, damping as a fraction of
the mean eigenvalue): ``λ_l = relative × tr(G_l) / d_l``, i.e. a fraction of the block's mean eigenvalue, so one
number suits layers whose gradients differ in scale by orders of magnitude. ``Damping(absolute=x)`` sets
``λ_l = x`` for every layer.

Without ``damping=``, each method uses its own relative damping, :data:`DEFAULT_RELATIVE`, chosen by the LDS on
three models (``benchmarks/defaults.py``, ``docs/methods.md#defaults-measured``): 1.0 for ``exact`` and 0.1 for the
others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from hookinf.errors import ConfigurationError


@dataclass(frozen=True)
class Damping:
    """How ``λ_l`` is chosen per layer; give exactly one of ``relative`` and ``absolute``.

    Attributes:
        relative: ``λ_l = relative × tr(G_l)/d_l`` (default 0.1 when neither is given).
        absolute: ``λ_l = absolute`` for every layer.
    """

    relative: float | None = None
    absolute: float | None = None

    def __post_init__(self) -> None:
        if self.relative is None and self.absolute is None:
            object.__setattr__(self, "relative", 0.1)
        elif self.relative is not None and self.absolute is not None:
            raise ConfigurationError(
                "Damping takes either relative= or absolute=, not both (e.g. Damping(relative=0.1))."
            )
        value = self.relative if self.relative is not None else self.absolute
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            which = "relative" if self.relative is not None else "absolute"
            raise ConfigurationError(f"Damping({which}={value!r}) must be a finite number >= 0.")

    def value(self, mean_eigenvalue: float) -> float:
        """``λ_l`` for a block whose mean eigenvalue (``tr(G_l)/d_l``) is ``mean_eigenvalue``."""
        if self.absolute is not None:
            return float(self.absolute)
        assert self.relative is not None
        return float(self.relative) * float(mean_eigenvalue)

    def __str__(self) -> str:
        return f"relative {self.relative:g}" if self.relative is not None else f"absolute {self.absolute:g}"


def as_damping(damping: float | Damping) -> Damping:
    """Normalises the ``damping=`` argument: a number is relative, a :class:`Damping` is taken as is."""
    if isinstance(damping, Damping):
        return damping
    if isinstance(damping, bool) or not isinstance(damping, int | float):
        raise ConfigurationError(
            f"damping={damping!r} must be a number (relative damping) or hookinf.Damping(absolute=...)."
        )
    return Damping(relative=float(damping))


DEFAULT_RELATIVE: Mapping[str, float] = MappingProxyType(
    {"exact": 1.0, "kfac": 0.1, "ekfac": 0.1, "datainf": 0.1, "lissa": 0.1, "identity": 0.1}
)
"""Method name → the relative damping it uses when ``damping=`` is not given (measured: ``benchmarks/defaults.py``)."""


def default_damping(method: str) -> Damping:
    """The damping rule a method uses without ``damping=``: relative :data:`DEFAULT_RELATIVE` (0.1 if not listed)."""
    return Damping(relative=DEFAULT_RELATIVE.get(method, 0.1))
