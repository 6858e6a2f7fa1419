"""Influence methods: how ``(G_l + λ_l I)⁻¹`` is approximated. ``method=`` strings resolve here."""

from __future__ import annotations

from hookinf.errors import ConfigurationError
from hookinf.methods.base import Method, Preconditioned, QueryMethod, RunPass, check_basis_compressor, empty_train
from hookinf.methods.datainf import DataInf
from hookinf.methods.ekfac import EKFAC, EKFACCurvature
from hookinf.methods.exact import Exact, ExactCurvature
from hookinf.methods.identity import Identity, IdentityCurvature
from hookinf.methods.kfac import KFAC, KFACCurvature
from hookinf.methods.lissa import LiSSA

__all__ = [
    "EKFAC",
    "DataInf",
    "LiSSA",
    "Preconditioned",
    "QueryMethod",
    "KFAC",
    "EKFACCurvature",
    "Exact",
    "ExactCurvature",
    "Identity",
    "IdentityCurvature",
    "KFACCurvature",
    "Method",
    "RunPass",
    "check_basis_compressor",
    "empty_train",
    "resolve_method",
]

_BY_NAME: dict[str, type[Method] | type[QueryMethod]] = {
    "exact": Exact,
    "identity": Identity,
    "kfac": KFAC,
    "ekfac": EKFAC,
    "datainf": DataInf,
    "lissa": LiSSA,
}


def resolve_method(method: str | Method | QueryMethod) -> Method | QueryMethod:
    """Turns ``method="exact"`` (etc.) into a method object; a method object is returned as is."""
    if isinstance(method, Method | QueryMethod):
        return method
    if isinstance(method, str) and method in _BY_NAME:
        return _BY_NAME[method]()
    raise ConfigurationError(
        f"method={method!r} is not known; use one of {sorted(_BY_NAME)}, a hookinf.Method such as "
        f"hookinf.Exact(max_dim=...), or a fitted hookinf.Curvature."
    )
