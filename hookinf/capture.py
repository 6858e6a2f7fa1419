"""The typed objects the hooks produce: one :class:`LayerCapture` per layer per step, grouped in a :class:`Step`.

A *step* is what one backward pass left behind: for every tracked layer, the activations ``a`` ``[B, S, I]`` and
output gradients ``δ`` ``[B, S, O]`` of the same ``B`` examples, with ``δ`` already scaled so that
``Σ_s δ[b, s] a[b, s]ᵀ`` is the gradient of example ``b``'s own loss (see ``loss_reduction`` in
:func:`hookinf.watch`). Every consumer (statistics, compressors, influence) reads these objects and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError, DataError, NonFiniteGradientError
from hookinf.layers.base import LayerAdapter
from hookinf.linalg import per_example_gradients


@dataclass(frozen=True)
class LayerCapture:
    """The factors of one layer's per-example gradients for one step.

    Attributes:
        name: the layer's qualified name in ``model.named_modules()``.
        a: activations ``[B, S, I]`` (ones column last when the layer has a tracked bias).
        delta: output gradients ``[B, S, O]``, per-example scaled.
        adapter: the layer's adapter (maps gradient matrices back to parameter shapes); ``None`` for a compressed
            capture, whose gradient lives in the compressed space.
    """

    name: str
    a: Tensor
    delta: Tensor
    adapter: LayerAdapter | None = field(repr=False)

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.a.shape[0])

    def check_finite(self) -> None:
        """Refuses captured factors holding NaN or infinity (influence from them would be meaningless).

        Raises:
            NonFiniteGradientError: names the layer and which factor.
        """
        for what, tensor in (("output gradients", self.delta), ("input activations", self.a)):
            # A NaN/inf entry makes the sum non-finite, so one reduction screens the tensor (an overflowing sum of
            # finite values is confirmed or cleared by the full elementwise check).
            if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteGradientError(
                    f"layer '{self.name}': captured {what} contain NaN or infinity. Check the loss and the inputs of "
                    f"this batch (a diverging learning rate or a log of zero are common causes); influence computed "
                    f"from them would be meaningless."
                )

    def gradients(self) -> Tensor:
        """Per-example gradients as matrices ``[B, O, I]`` (``Σ_s δ_s a_sᵀ``)."""
        return per_example_gradients(self.a, self.delta)

    def param_gradients(self) -> dict[str, Tensor]:
        """Per-example gradients in the layer's parameter shapes: ``{"weight": [B, *w.shape], "bias": [B, O]}``."""
        if self.adapter is None:
            raise ConfigurationError(f"layer '{self.name}': a compressed capture has no parameter-shaped gradients.")
        return self.adapter.param_gradients(self.gradients())


@dataclass(frozen=True)
class Step:
    """All layers' captures from one backward pass.

    Attributes:
        index: 0-based count of steps since the watch started.
        batch_size: ``B``, shared by every layer.
        layers: layer name → capture, in model order.
        ids: ``[B]`` int64 ids of the step's examples (on the CPU), when the loop named them
            (:meth:`hookinf.Watch.tag`); ``None`` otherwise.
    """

    index: int
    batch_size: int
    layers: dict[str, LayerCapture]
    ids: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.ids is not None and self.ids.numel() != self.batch_size:
            raise DataError(f"{self.ids.numel()} ids were given for a batch of {self.batch_size} examples.")

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
