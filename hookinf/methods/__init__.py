"""Influence methods: how ``(G_l + λ_l I)⁻¹`` is approximated. ``method=`` strings resolve here."""

from __future__ import annotations

from hookinf.errors import ConfigurationError
from hookinf.methods.base import Method, Preconditioner
from hookinf.methods.exact import Exact
from hookinf.methods.identity import Identity

__all__ = ["Exact", "Identity", "Method", "Preconditioner", "resolve_method"]

_BY_NAME: dict[str, type[Method]] = {"exact": Exact, "identity": Identity}


def resolve_method(method: str | Method) -> Method:
    """Turns ``method="exact"`` (etc.) into a :class:`Method`; a :class:`Method` is returned as is."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method in _BY_NAME:
        return _BY_NAME[method]()
    raise ConfigurationError(f"method={method!r} is not known; use one of {sorted(_BY_NAME)} or a hookinf.Method.")
