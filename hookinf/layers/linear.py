"""Adapters for dense layers: ``nn.Linear`` and GPT-2's ``transformers.pytorch_utils.Conv1D``.

Any leading dimensions between the batch and the features (sequence positions, heads, ...) become the shared
axis ``S``: an input ``[B, T, I]`` gives ``a`` of shape ``[B, T, I]``; an input ``[B, I]`` gives ``[B, 1, I]``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

from torch import Tensor, nn

from hookinf.layers.base import LayerAdapter, memory_key


def _to_bsf(x: Tensor) -> Tensor:
    """``[B, ..., F]`` → ``[B, S, F]`` with ``S`` the product of the middle dimensions."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def dense_sharing_key(x: Tensor, has_bias: bool) -> Hashable | None:
    """Equal for two dense layers (``nn.Linear``, GPT-2's ``Conv1D``) whose activations from ``x`` are the same.

    Both form ``a`` from the input alike (:func:`_to_bsf`, then the bias's ones column), so layers reading the same
    memory (:func:`~hookinf.layers.base.memory_key`) with equal bias flags form the same ``a``.
    """
    memory = memory_key(x)
    return None if memory is None else ("dense", has_bias, memory)


def _bs(x: Tensor) -> tuple[int, int]:
    """``(B, S)`` of :func:`_to_bsf`'s result."""
    return int(x.shape[0]), math.prod(int(d) for d in x.shape[1:-1])


class LinearAdapter(LayerAdapter):
    """``nn.Linear``: ``y = x Wᵀ + b`` with ``W`` of shape ``[O, I]`` (peft's ``lora_A`` / ``lora_B`` are these)."""

    module_types = (nn.Linear,)

    def _factor_dims(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Linear)
        return module.out_features, module.in_features

    def _activations(self, x: Tensor) -> Tensor:
        self._require_batched(x, 2, "an input of shape [B, ..., in_features]")
        return _to_bsf(x)

    def positions(self, x: Tensor) -> tuple[int, int]:
        """``(B, S)``: the batch and the product of the middle dimensions."""
        self._require_batched(x, 2, "an input of shape [B, ..., in_features]")
        return _bs(x)

    def sharing_key(self, x: Tensor) -> Hashable | None:
        """:func:`dense_sharing_key`: shared with every dense layer reading the same input."""
        return dense_sharing_key(x, self.has_bias)

    def output_gradients(self, grad_output: Tensor) -> Tensor:
        """``[B, ..., O]`` → ``[B, S, O]``."""
        return _to_bsf(grad_output)

    def _weight_gradient(self, grad: Tensor) -> Tensor:
        return grad


class GPT2Conv1DAdapter(LayerAdapter):
    """GPT-2's ``Conv1D``: ``y = x W + b`` with ``W`` of shape ``[I, O]`` (the transpose of ``nn.Linear``)."""

    def _factor_dims(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module.weight, Tensor)
        in_features, out_features = module.weight.shape
        return int(out_features), int(in_features)

    def _activations(self, x: Tensor) -> Tensor:
        self._require_batched(x, 2, "an input of shape [B, ..., nx]")
        return _to_bsf(x)

    def positions(self, x: Tensor) -> tuple[int, int]:
        """``(B, S)``: the batch and the product of the middle dimensions."""
        self._require_batched(x, 2, "an input of shape [B, ..., nx]")
        return _bs(x)

    def sharing_key(self, x: Tensor) -> Hashable | None:
        """:func:`dense_sharing_key`: shared with every dense layer reading the same input."""
        return dense_sharing_key(x, self.has_bias)

    def output_gradients(self, grad_output: Tensor) -> Tensor:
        """``[B, ..., O]`` → ``[B, S, O]``."""
        return _to_bsf(grad_output)

    def _weight_gradient(self, grad: Tensor) -> Tensor:
        return grad.transpose(-1, -2)
