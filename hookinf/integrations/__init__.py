"""Integrations of hookinf with training frameworks.

``hookinf.integrations.HookinfCallback`` and ``hookinf.integrations.ModelLoss`` (Hugging Face ``transformers``) live
in :mod:`hookinf.integrations.transformers`, which is imported on first use: ``import hookinf`` (and
``import hookinf.integrations``) never imports ``transformers``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hookinf.integrations.model_loss import ModelLoss
    from hookinf.integrations.transformers import HookinfCallback

__all__ = ["HookinfCallback", "ModelLoss"]

_LAZY = {"HookinfCallback": "hookinf.integrations.transformers", "ModelLoss": "hookinf.integrations.model_loss"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hookinf.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
