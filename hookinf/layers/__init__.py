"""Registry of layer adapters, resolved by the module's MRO so subclasses of supported types work.

Supported: ``nn.Linear`` (peft LoRA's ``lora_A``/``lora_B`` included), ``nn.Conv1d``, ``nn.Conv2d`` and
``transformers.pytorch_utils.Conv1D`` (GPT-2). Other code can add a type with :func:`register_adapter`.
"""

from __future__ import annotations

from torch import nn

from hookinf.errors import UnsupportedModuleError
from hookinf.layers.base import LayerAdapter
from hookinf.layers.conv import ConvAdapter
from hookinf.layers.linear import GPT2Conv1DAdapter, LinearAdapter

__all__ = ["LayerAdapter", "adapter_for", "is_supported", "register_adapter", "supported_types"]

_REGISTRY: dict[type[nn.Module], type[LayerAdapter]] = {}
# Types of optional packages, matched by qualified name so that hookinf never imports those packages itself
# (a module of such a type can only exist once its package is imported).
_BY_QUALNAME: dict[str, type[LayerAdapter]] = {"transformers.pytorch_utils.Conv1D": GPT2Conv1DAdapter}


def register_adapter(module_type: type[nn.Module], adapter: type[LayerAdapter]) -> None:
    """Makes ``module_type`` (and its subclasses) trackable through ``adapter``."""
    _REGISTRY[module_type] = adapter


def _lookup(module: nn.Module) -> type[LayerAdapter] | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        by_name = _BY_QUALNAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if by_name is not None:
            return by_name
    return None


def is_supported(module: nn.Module) -> bool:
    """Whether some adapter handles ``module``'s type."""
    return _lookup(module) is not None


def supported_types() -> list[str]:
    """Names of the supported module types, for error messages."""
    return sorted({f"{t.__module__}.{t.__qualname__}" for t in _REGISTRY} | set(_BY_QUALNAME))


def adapter_for(name: str, module: nn.Module) -> LayerAdapter:
    """Builds the adapter for ``module`` (named ``name`` in the model).

    Raises:
        UnsupportedModuleError: no adapter handles the module's type, or its configuration is unsupported.
    """
    adapter = _lookup(module)
    if adapter is None:
        raise UnsupportedModuleError(
            f"layer '{name}' is a {type(module).__name__}, which hookinf cannot track. Supported types: "
            f"{', '.join(supported_types())}."
        )
    return adapter(name, module)


for _adapter in (LinearAdapter, ConvAdapter):
    for _type in _adapter.module_types:
        register_adapter(_type, _adapter)
