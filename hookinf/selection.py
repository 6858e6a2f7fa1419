"""Which modules a watch tracks: ``modules=`` resolved to named layers and their adapters, tied weights refused.

:func:`select` turns a ``modules=`` specification (``None``, names, glob patterns, module types) into a
:class:`Selection`: the tracked layers in model order with their adapters and gradient shapes. It registers no hook
and touches nothing of the model; :class:`hookinf.Watch` and everything that builds consumers for it start here.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hookinf.errors import (
    ConfigurationError,
    HookinfWarning,
    NoTrackableModuleError,
    PatternMatchError,
    UnsupportedModuleError,
)
from hookinf.layers import LayerAdapter, adapter_for, is_supported, supported_types
from hookinf.shapes import LayerShape, layer_shapes

ModuleSpec = str | type[nn.Module]
"""One entry of ``modules=``: a qualified name, a glob pattern or an ``nn.Module`` type."""


@dataclass(frozen=True)
class Selection:
    """The tracked layers of a model, in model order.

    Attributes:
        modules: layer name → module.
        adapters: layer name → its adapter (canonical ``a``/``δ`` form, shapes, parameter names).
    """

    modules: dict[str, nn.Module]
    adapters: dict[str, LayerAdapter]

    @property
    def layers(self) -> tuple[str, ...]:
        """Tracked layer names in model order."""
        return tuple(self.adapters)

    @property
    def shapes(self) -> dict[str, LayerShape]:
        """Layer name → gradient shape, in model order."""
        return layer_shapes(self.adapters)

    @property
    def devices(self) -> dict[str, torch.device]:
        """Layer name → the device of its parameters (layers of one model may live on several devices)."""
        return {name: next(module.parameters(recurse=False)).device for name, module in self.modules.items()}

    def parameters(self) -> list[Tensor]:
        """The tracked layers' own trainable parameters."""
        return [p for m in self.modules.values() for p in m.parameters(recurse=False) if p.requires_grad]


def select(model: nn.Module, modules: ModuleSpec | Sequence[ModuleSpec] | Selection | None = None) -> Selection:
    """Resolves ``modules=`` (see :func:`select_modules`) to a :class:`Selection`; a selection is returned as is."""
    if isinstance(modules, Selection):
        return modules
    chosen = select_modules(model, modules)
    _check_materialised(chosen)
    return Selection(dict(chosen), {name: adapter_for(name, module) for name, module in chosen})


def _check_materialised(chosen: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuses tracked layers whose parameters hold no values (the ``meta`` device)."""
    for name, module in chosen:
        if any(p.is_meta for p in module.parameters(recurse=False)):
            raise ConfigurationError(
                f"layer '{name}' has its parameters on the 'meta' device: they have shapes but no values, so no "
                f"gradient can be computed. Materialise the model first (load its weights, e.g. "
                f"model.to_empty(device='cpu') then model.load_state_dict(...), or from_pretrained without a meta "
                f"device_map)."
            )


def _trackable(module: nn.Module) -> bool:
    return is_supported(module) and any(p.requires_grad for p in module.parameters(recurse=False))


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id → names of every module holding it directly (more than one name: tied weights)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            names = holders.setdefault(id(param), [])
            if name not in names:
                names.append(name)
    return holders


def _tied_elsewhere(name: str, module: nn.Module, holders: dict[int, list[str]]) -> list[str]:
    """Other modules (by name) that hold one of ``module``'s trainable parameters."""
    others: list[str] = []
    for param in module.parameters(recurse=False):
        if param.requires_grad:
            others += [h for h in holders.get(id(param), []) if h != name and h not in others]
    return others


def _check_tied(model: nn.Module, chosen: list[str], explicit: bool) -> list[str]:
    """Refuses (or, for the default selection, leaves out with a warning) layers whose weights are tied.

    A tracked module only sees its own use of a parameter; if another module also uses it (GPT-2's ``lm_head``
    shares ``transformer.wte``'s weight) the captured gradient would miss that use and every score through the
    layer would be wrong.
    """
    holders = _holders(model)
    by_name = dict(model.named_modules())
    kept: list[str] = []
    for name in chosen:
        others = _tied_elsewhere(name, by_name[name], holders)
        if not others:
            kept.append(name)
            continue
        shown = ", ".join(f"'{o}' ({type(model.get_submodule(o)).__name__})" for o in others)
        message = (
            f"layer '{name}' shares a trainable parameter with {shown}; hookinf sees only '{name}''s own use of "
            f"it, so its per-example gradient would be partial. Exclude it with watch(model, modules=[...]) or untie "
            f"the weights."
        )
        if explicit or any(o in chosen for o in others):
            raise UnsupportedModuleError(message)
        warnings.warn(f"{message} It is left out of the default selection.", HookinfWarning, stacklevel=6)
    return kept


def _warn_left_out(named: Sequence[tuple[str, nn.Module]], kept: set[str]) -> None:
    """Warns, for the default selection, about trainable parameters no tracked layer holds (their influence is lost).

    Embeddings, normalisation layers and other unsupported modules (and tied layers left out) hold trainable
    parameters whose gradients hookinf does not capture; the scores then attribute only through the tracked layers.
    """
    tracked = {id(p) for name, m in named if name in kept for p in m.parameters(recurse=False)}
    left: list[tuple[str, str, int]] = []
    seen: set[int] = set(tracked)
    for name, module in named:
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own and name not in kept:
            left.append((name or "<model>", type(module).__name__, sum(p.numel() for p in own)))
    if not left:
        return
    out = sum(n for *_, n in left)
    total = out + sum(p.numel() for name, m in named if name in kept for p in m.parameters(recurse=False))
    shown = ", ".join(f"'{name}' ({kind}, {n:,})" for name, kind, n in left[:4])
    more = f" and {len(left) - 4} more" if len(left) > 4 else ""
    warnings.warn(
        f"hookinf tracks {len(kept)} layer(s) and leaves out {len(left)} module(s) holding {out:,} trainable "
        f"parameters ({out / total:.1%} of them) that it cannot track: {shown}{more}. Their influence is not in the "
        f"scores. Name the layers to track with modules=[...] to silence this.",
        HookinfWarning,
        stacklevel=6,
    )


def select_modules(model: nn.Module, modules: ModuleSpec | Sequence[ModuleSpec] | None) -> list[tuple[str, nn.Module]]:
    """Resolves a ``modules=`` selection to ``(qualified name, module)`` pairs in model order.

    Args:
        model: the model.
        modules: ``None`` (every supported module with a trainable parameter of its own), or names, glob
            patterns and module types (one or a list).

    Returns:
        The selected modules in ``model.named_modules()`` order.

    Raises:
        NoTrackableModuleError: nothing to track.
        PatternMatchError: an entry matches no trackable module.
        UnsupportedModuleError: an exact name refers to a module that cannot be tracked.
        ConfigurationError: an entry is neither a string nor a module type.
    """
    named = list(model.named_modules())
    if modules is None:
        chosen = {name for name, module in named if _trackable(module)}
        if not chosen:
            kinds = sorted({type(m).__name__ for _, m in named})
            raise NoTrackableModuleError(
                f"{type(model).__name__} has no supported module with trainable parameters (it contains: "
                f"{', '.join(kinds)}). Supported types: {', '.join(supported_types())}. Check that the parameters "
                f"you want to attribute have requires_grad=True."
            )
        kept = set(_check_tied(model, [name for name, _ in named if name in chosen], explicit=False))
        if not kept:
            raise NoTrackableModuleError(
                f"{type(model).__name__}'s only supported trainable modules share their weights with other modules "
                f"(see the warning above); nothing can be tracked without a partial gradient."
            )
        _warn_left_out(named, kept)
        return [(name, module) for name, module in named if name in kept]
    specs: Iterable[ModuleSpec] = [modules] if isinstance(modules, str | type) else modules
    if isinstance(specs, Sized) and len(specs) == 0:
        raise ConfigurationError(
            "modules=[] selects no layer, so there would be nothing to attribute: pass modules=None to track every "
            "supported layer with trainable parameters, or list the layers (names, glob patterns or module types)."
        )
    by_name = dict(named)
    chosen = set()
    for spec in specs:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            matches = [name for name, module in named if isinstance(module, spec)]
            label = f"type {spec.__name__}"
        elif isinstance(spec, str):
            if spec in by_name:
                module = by_name[spec]
                if not is_supported(module):
                    adapter_for(spec, module)  # raises UnsupportedModuleError listing the supported types
                if not any(p.requires_grad for p in module.parameters(recurse=False)):
                    raise UnsupportedModuleError(
                        f"layer '{spec}' has no trainable parameter of its own (requires_grad=False); a frozen "
                        f"layer has no influence to attribute. Unfreeze it or remove it from modules=."
                    )
                chosen.add(spec)
                continue
            matches = [name for name, _ in named if fnmatch.fnmatchcase(name, spec)]
            label = f"pattern {spec!r}"
        else:
            raise ConfigurationError(
                f"modules= entries must be qualified names, glob patterns or nn.Module types; got {spec!r}."
            )
        hits = [name for name in matches if _trackable(by_name[name])]
        if not hits:
            if matches:
                shown = ", ".join(repr(m) for m in matches[:5])
                detail = (
                    f"matched {len(matches)} module(s) ({shown}) but none is a supported module with trainable "
                    f"parameters"
                )
            else:
                close = difflib.get_close_matches(str(spec), list(by_name), n=3)
                detail = "matched no module" + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "")
            raise PatternMatchError(
                f"modules= {label} {detail}. Trackable layers of this model: "
                f"{', '.join(repr(n) for n, m in named if _trackable(m)) or 'none'}."
            )
        chosen.update(hits)
    _check_tied(model, [name for name, _ in named if name in chosen], explicit=True)
    return [(name, module) for name, module in named if name in chosen]
