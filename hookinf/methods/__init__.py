"""Influence methods: how ``(G_l + λ_l I)⁻¹`` is approximated. ``method=`` strings resolve here."""

from __future__ import annotations

from collections.abc import Mapping

from hookinf.errors import ConfigurationError
from hookinf.methods.base import Method, Preconditioned, QueryMethod, RunPass, check_basis_compressor, empty_train
from hookinf.methods.datainf import DataInf
from hookinf.methods.ekfac import EKFAC, EKFACCurvature
from hookinf.methods.exact import Exact, ExactCurvature
from hookinf.methods.identity import Identity, IdentityCurvature
from hookinf.methods.kfac import KFAC, KFACCurvature
from hookinf.methods.lissa import LiSSA
from hookinf.shapes import LayerShape

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


def resolve_method(
    method: str | Method | QueryMethod, shapes: Mapping[str, LayerShape] | None = None
) -> Method | QueryMethod:
    """Turns ``method="exact"`` (etc.) into a method object; a method object is returned as is.

    ``"auto"`` (the default of :func:`hookinf.fit`, :func:`hookinf.influence` and :func:`hookinf.self_influence`)
    is ``"exact"`` when every layer's block fits :class:`Exact`'s default ``max_dim`` (8,192 parameters per layer,
    compressed dimensions when compressing), and ``"ekfac"`` otherwise; the result (a curvature's or the scores'
    ``method``) names the one chosen.

    Raises:
        ConfigurationError: an unknown name, or ``"auto"`` where the layers' shapes are not known.
    """
    if isinstance(method, Method | QueryMethod):
        return method
    if method == "auto":
        if shapes is None:
            raise ConfigurationError("method='auto' chooses from the layers' sizes; name the method here.")
        return Exact() if all(shape.dim <= Exact().max_dim for shape in shapes.values()) else EKFAC()
    if isinstance(method, str) and method in _BY_NAME:
        return _BY_NAME[method]()
    raise ConfigurationError(
        f"method={method!r} is not known; use 'auto' or one of {sorted(_BY_NAME)}, a hookinf.Method such as "
        f"hookinf.Exact(max_dim=...), or a fitted hookinf.Curvature."
    )
