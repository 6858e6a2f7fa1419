"""The typed objects the hooks produce: one :class:`LayerCapture` per layer per step, grouped in a :class:`Step`.

A *step* is what one backward pass left behind: for every tracked layer, the activations ``a`` ``[B, S, I]`` and
output gradients ``δ`` ``[B, S, O]`` of the same ``B`` examples, with ``δ`` already scaled so that
``Σ_s δ[b, s] a[b, s]ᵀ`` is the gradient of example ``b``'s own loss (see ``loss_reduction`` in
:func:`hookinf.watch`). Every consumer (statistics, compressors, influence) reads these objects and nothing else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError, DataError, NonFiniteGradientError
from hookinf.ids import Ids, id_count
from hookinf.layers.base import LayerAdapter
from hookinf.linalg import per_example_gradients
from hookinf.shapes import LayerShape


class LayerCapture:
    """The factors of one layer's per-example gradients for one step.

    ``a`` may be given as a function that builds it: a bare :class:`~hookinf.Watch` keeps each layer's input and
    forms ``a`` (for a convolution, its unfolded patches: ``k²`` times the input) only when something reads it.

    Attributes:
        name: the layer's qualified name in ``model.named_modules()``.
        a: activations ``[B, S, I]`` (ones column last when the layer has a tracked bias).
        delta: output gradients ``[B, S, O]``, per-example scaled.
        adapter: the layer's adapter (maps gradient matrices back to parameter shapes); ``None`` for a compressed
            capture, whose gradient lives in the compressed space.
    """

    __slots__ = ("_a", "_build", "adapter", "delta", "name")

    def __init__(
        self, name: str, a: Tensor | Callable[[], Tensor], delta: Tensor, adapter: LayerAdapter | None
    ) -> None:
        self.name = name
        self._a: Tensor | None = a if isinstance(a, Tensor) else None
        self._build: Callable[[], Tensor] | None = None if isinstance(a, Tensor) else a
        self.delta = delta
        self.adapter = adapter

    @property
    def a(self) -> Tensor:
        """Activations ``[B, S, I]``, formed on first use when the capture was given a function."""
        if self._a is None:
            assert self._build is not None
            self._a, self._build = self._build(), None
        return self._a

    def with_delta(self, delta: Tensor) -> LayerCapture:
        """This capture with other output gradients (the same activations, formed once between the two)."""
        return LayerCapture(self.name, self._a if self._a is not None else lambda: self.a, delta, self.adapter)

    def __repr__(self) -> str:
        shown = list(self._a.shape) if self._a is not None else "not formed yet"
        return f"LayerCapture(name={self.name!r}, a={shown}, delta={list(self.delta.shape)})"

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.delta.shape[0])

    def gradients(self) -> Tensor:
        """Per-example gradients as matrices ``[B, O, I]`` (``Σ_s δ_s a_sᵀ``)."""
        return per_example_gradients(self.a, self.delta)

    def param_gradients(self) -> dict[str, Tensor]:
        """Per-example gradients in the layer's parameter shapes: ``{"weight": [B, *w.shape], "bias": [B, O]}``."""
        if self.adapter is None:
            raise ConfigurationError(f"layer '{self.name}': a compressed capture has no parameter-shaped gradients.")
        return self.adapter.param_gradients(self.gradients())


@dataclass(eq=False)
class FiniteCheck:
    """Whether every captured factor of a step is finite: computed where the factors live, read when asked.

    The flags are device tensors (one 0-dim bool per factor, fused into one per device), so building a check makes no
    device-to-host read; :meth:`ok` reads the fused flags once (one read per device) and remembers the answer. A
    watch reads each step's check one step later, when the device has long finished it.

    Attributes:
        flags: ``(layer, factor, 0-dim bool)`` per captured factor.
    """

    flags: list[tuple[str, str, Tensor]]
    _fused: list[Tensor] = field(default_factory=list, repr=False)
    _ok: bool | None = field(default=None, repr=False)

    @classmethod
    def of(cls, flags: list[tuple[str, str, Tensor]]) -> FiniteCheck:
        """The (unread) check of a step from its flags (see :func:`all_finite`), fused per device."""
        by_device: dict[torch.device, list[Tensor]] = {}
        for _, _, flag in flags:
            by_device.setdefault(flag.device, []).append(flag)
        return cls(flags, [torch.stack(group).all() for group in by_device.values()])

    @property
    def known(self) -> bool:
        """Whether the flags were read already."""
        return self._ok is not None

    def ok(self) -> bool:
        """Whether every factor is finite (reads the fused flags the first time)."""
        if self._ok is None:
            self._ok = all(bool(flag) for flag in self._fused)
        return self._ok

    def raise_if_not_finite(self) -> None:
        """Raises :class:`~hookinf.NonFiniteGradientError` naming the first non-finite layer and factor."""
        if self.ok():
            return
        name, what = next((name, what) for name, what, flag in self.flags if not bool(flag))
        raise NonFiniteGradientError(
            f"layer '{name}': captured {what} contain NaN or infinity. Check the loss and the inputs of this batch (a "
            f"diverging learning rate or a log of zero are common causes); influence computed from them would be "
            f"meaningless."
        )


def all_finite(tensor: Tensor) -> Tensor:
    """A 0-dim bool: no NaN or infinity in ``tensor``.

    Exact with one reduction and no temporary the size of the tensor: the minimum and the maximum are finite exactly
    when every entry is (a NaN propagates through both; an infinity is one of them). About 9× cheaper than
    ``isfinite(t).all()`` on a [16, 128, 1024] float32 tensor, 2 CPU threads.
    """
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


@dataclass(frozen=True)
class Step:
    """All layers' captures from one backward pass.

    Attributes:
        index: 0-based count of steps since the watch started.
        batch_size: ``B``, shared by every layer.
        layers: layer name → capture, in model order.
        ids: the ids of the step's examples (``int64 [B]`` on the CPU, or ``B`` strings), when the loop named them
            (:meth:`hookinf.Watch.tag`); ``None`` otherwise.
        finite: whether the captured factors are finite (:class:`FiniteCheck`, read lazily); ``None`` when not
            checked (a step read from a store).
    """

    index: int
    batch_size: int
    layers: dict[str, LayerCapture]
    ids: Ids | None = field(default=None, repr=False)
    finite: FiniteCheck | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.ids is not None and id_count(self.ids) != self.batch_size:
            raise DataError(f"{id_count(self.ids)} ids were given for a batch of {self.batch_size} examples.")

    def gradients(self) -> dict[str, Tensor]:
        """Per-example gradient matrices ``[B, O, I]`` per layer."""
        return {name: cap.gradients() for name, cap in self.layers.items()}

    def param_gradients(self) -> dict[str, Tensor]:
        """Per-example gradients keyed by qualified parameter name (``"fc1.weight"``), ``[B, *param.shape]``."""
        out: dict[str, Tensor] = {}
        for name, cap in self.layers.items():
            for pname, grad in cap.param_gradients().items():
                out[f"{name}.{pname}" if name else pname] = grad
        return out


def shared_activations(step: Step) -> Counter[int]:
    """How many of the step's layers hold each activation tensor, by identity (``id(capture.a)``).

    Layers that read one input get the same ``a`` object (:meth:`~hookinf.layers.LayerAdapter.sharing_key`); a
    consumer whose work on ``a`` does not depend on the layer (``Σ aᵀa``, a rotation by a shared eigenbasis) does it
    once for all of them. Reads (forms) every capture's activations.
    """
    return Counter(id(capture.a) for capture in step.layers.values())


def store_step(index: int, gradients: Mapping[str, Tensor], layers: Mapping[str, LayerShape]) -> Step:
    """Stored gradients ``{layer: [n, O'·I']}`` as a :class:`Step` whose captures reproduce them exactly.

    Each ``[O', I']`` gradient ``g`` is written in the canonical form with ``S = I'`` positions: ``a_s = e_s``
    (identity rows, an expanded view: no memory) and ``δ_s = g[:, s]``, so ``Σ_s δ_s a_sᵀ = g``. Every method that
    consumes per-example gradients (and the scoring) then reads stored gradients like captured ones.
    """
    captures: dict[str, LayerCapture] = {}
    batch = 0
    for name, shape in layers.items():
        flat = gradients[name]
        batch = int(flat.shape[0])
        matrices = flat.reshape(batch, shape.out_features, shape.in_features)
        eye = torch.eye(shape.in_features, dtype=flat.dtype, device=flat.device).expand(batch, -1, -1)
        captures[name] = LayerCapture(name=name, a=eye, delta=matrices.transpose(1, 2), adapter=None)
    return Step(index=index, batch_size=batch, layers=captures)
