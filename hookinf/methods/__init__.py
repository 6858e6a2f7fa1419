"""Influence methods: how ``(G_l + λ_l I)⁻¹`` is approximated. ``method=`` strings resolve here."""

from __future__ import annotations

from hookinf.errors import ConfigurationError
from hookinf.methods.base import Method, Passes
from hookinf.methods.exact import Exact, ExactCurvature
from hookinf.methods.identity import Identity, IdentityCurvature
from hookinf.methods.kfac import EKFAC, KFAC, EKFACCurvature, KFACCurvature

__all__ = [
    "EKFAC",
    "KFAC",
    "EKFACCurvature",
    "Exact",
    "ExactCurvature",
    "Identity",
    "IdentityCurvature",
    "KFACCurvature",
    "Method",
    "Passes",
    "resolve_method",
]

_BY_NAME: dict[str, type[Method]] = {"exact": Exact, "identity": Identity, "kfac": KFAC, "ekfac": EKFAC}


def resolve_method(method: str | Method) -> Method:
    """Turns ``method="exact"`` (etc.) into a :class:`Method`; a :class:`Method` is returned as is."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method in _BY_NAME:
        return _BY_NAME[method]()
    raise ConfigurationError(
        f"method={method!r} is not known; use one of {sorted(_BY_NAME)}, a hookinf.Method such as "
        f"hookinf.Exact(max_dim=...), or a fitted hookinf.Curvature."
    )
