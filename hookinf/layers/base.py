"""The adapter protocol: one supported module type → the canonical ``[batch, shared, features]`` factors.

An adapter turns a module's input into activations ``a`` of shape ``[B, S, I]`` and the gradient of its output into
``δ`` of shape ``[B, S, O]`` so that the gradient of the module's weights (bias included as the last input
coordinate) for example ``b`` is ``Σ_s δ[b, s] a[b, s]ᵀ`` (shape ``[O, I]``). ``S`` is 1 for a plain batch of
vectors, the number of sequence positions for token inputs and the number of patches for convolutions. Adapters
hold no state beyond the module's static configuration and never modify the module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hookinf.errors import UnsupportedModuleError


def memory_key(x: Tensor) -> Hashable | None:
    """What identifies the values ``x`` reads: its storage, offset, shape, strides, dtype and device.

    Equal for the same tensor and for views of it that read the same elements alike (the ``detach()`` each hook takes
    of one input). Within one step every input is held by its call, so no other tensor can reuse that memory
    meanwhile. ``None`` (never equal) for a tensor without plain storage: meta, sparse, or a subclass.
    """
    if x.device.type == "meta" or x.is_sparse:
        return None
    try:
        pointer = x.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (pointer, x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


class LayerAdapter(ABC):
    """Maps one module's input / output gradient to the canonical factors and back to parameter gradients.

    Args:
        name: qualified name of the module in ``model.named_modules()`` (used in error messages).
        module: the module; it is read, never modified.
    """

    #: module classes handled by this adapter (subclasses match too; resolution is by MRO).
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            trainable = bias is not None and bias.requires_grad
            detail = "only its bias is trainable" if trainable else "its weight is frozen"
            raise UnsupportedModuleError(
                f"layer '{name}' ({type(module).__name__}): {detail}; hookinf tracks layers whose weight is "
                f"trainable. Exclude it with watch(model, modules=[...]) or make its weight trainable."
            )
        #: whether the bias is part of the tracked parameters (a trainable bias exists).
        self.has_bias = isinstance(bias, Tensor) and bias.requires_grad
        #: parameter names inside the module, in the order they appear in the gradient's input axis.
        self.param_names: tuple[str, ...] = ("weight", "bias") if self.has_bias else ("weight",)
        self.weight_shape = tuple(weight.shape)
        self.out_features, self.in_features = self._factor_dims(module)

    @property
    def shape(self) -> tuple[int, int]:
        """``(O, I)``: the shape of one example's gradient as a matrix (``I`` counts the bias column)."""
        return self.out_features, self.in_features + int(self.has_bias)

    @property
    def dim(self) -> int:
        """Number of tracked parameters ``d_l = O × I``."""
        out_dim, in_dim = self.shape
        return out_dim * in_dim

    @abstractmethod
    def _factor_dims(self, module: nn.Module) -> tuple[int, int]:
        """Returns ``(O, I_without_bias)`` for the module."""

    @abstractmethod
    def _activations(self, x: Tensor) -> Tensor:
        """Maps the module's input to ``[B, S, I_without_bias]``."""

    @abstractmethod
    def output_gradients(self, grad_output: Tensor) -> Tensor:
        """Maps the gradient of the module's output to ``δ`` of shape ``[B, S, O]``."""

    @abstractmethod
    def _weight_gradient(self, grad: Tensor) -> Tensor:
        """Maps ``[N, O, I_without_bias]`` matrices to ``[N, *weight.shape]``."""

    def input_tensor(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """Returns the tensor the module was called with (first positional argument or ``input=``)."""
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, Tensor):
            raise UnsupportedModuleError(
                f"layer '{self.name}' was called without a tensor as its first argument; hookinf needs the "
                f"input tensor to capture activations."
            )
        return x

    def activations(self, x: Tensor) -> Tensor:
        """Maps the module's input to ``a`` of shape ``[B, S, I]`` (a ones column appended for the bias)."""
        a = self._activations(x.detach())
        if self.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def positions(self, x: Tensor) -> tuple[int, int]:
        """``(B, S)`` of the activations of input ``x``, without forming them (checks the input's shape).

        This default maps a meta copy of ``x`` (slow: hundreds of microseconds); the built-in adapters compute it.
        """
        shape = self.activations(x.detach().to("meta")).shape
        return int(shape[0]), int(shape[1])

    def sharing_key(self, x: Tensor) -> Hashable | None:
        """What identifies the activations this adapter forms from input ``x``, or ``None`` (never shared).

        Layers that read one input and form their activations from it alike (the query, key and value projections
        of an attention block, the gate and up projections of a gated MLP, the ``lora_A`` of several adapters on
        them) return equal keys: their ``a`` is formed once, held once, and every consumer that sees the same
        ``a`` object does its work on it once (K-FAC's ``Σ aᵀa`` and its eigendecomposition, EK-FAC's rotation
        ``a Q_A``). The default shares nothing.
        """
        return None

    def projected_activations(self, x: Tensor, projection: Tensor) -> Tensor:
        """``a Pᵀ`` ``[B, S, r]`` for a ``[r, I]`` projection ``P``, without forming ``a`` where the layer allows.

        The bias's ones column is never built: ``a Pᵀ = a₀ P₀ᵀ + p_I`` with ``P₀`` the first ``I − 1`` columns and
        ``p_I`` the last (an affine map, :func:`torch.nn.functional.linear`). Convolutions override this with a
        convolution, so their patches are never unfolded.
        """
        bias = projection[:, self.in_features] if self.has_bias else None
        return F.linear(self._activations(x.detach()), projection[:, : self.in_features], bias)

    def param_gradients(self, grad: Tensor) -> dict[str, Tensor]:
        """Splits per-example gradient matrices into the module's parameter shapes.

        Args:
            grad: ``[N, O, I]`` per-example gradients in this adapter's layout.

        Returns:
            ``{"weight": [N, *weight.shape], "bias": [N, O]}`` (bias only when it is tracked).
        """
        out: dict[str, Tensor] = {"weight": self._weight_gradient(grad[..., : self.in_features])}
        if self.has_bias:
            out["bias"] = grad[..., self.in_features]
        return out

    def _require_batched(self, x: Tensor, min_dim: int, what: str) -> None:
        if x.dim() < min_dim:
            raise UnsupportedModuleError(
                f"layer '{self.name}' got an input of shape {list(x.shape)}; hookinf needs {what} with the batch "
                f"as the first dimension. Add a batch dimension (x.unsqueeze(0)) for a single example."
            )
