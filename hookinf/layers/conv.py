"""Adapters for ``nn.Conv1d`` and ``nn.Conv2d`` (Grosse & Martens 2016, "KFC": patches as the shared axis).

The input is padded exactly as the module pads it (any ``padding``/``padding_mode``, including ``"same"``) and
unfolded into patches: ``a`` is ``[B, L, C·k]`` with ``L`` output positions and ``C·k`` the flattened receptive
field in the weight's ``(in_channels, *kernel_size)`` order, and ``δ`` is ``[B, L, O]``. Grouped convolutions
(``groups > 1``) have a block-diagonal weight that does not fit the ``[O, I]`` layout and are refused.

A projection of the patches ``a Pᵀ`` (LoGra's ``P_in``) is itself a convolution of the padded input with ``r`` output
channels whose kernels are ``P``'s rows (:meth:`ConvAdapter.projected_activations`), so it never unfolds: ``k``
times less memory than the patches and one convolution instead of an unfold and a matrix product.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hookinf.errors import UnsupportedModuleError
from hookinf.layers.base import LayerAdapter


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d`` / ``nn.Conv2d`` with ``groups == 1``; weight ``[O, C, *k]`` seen as ``[O, C·Πk]``."""

    module_types = (nn.Conv1d, nn.Conv2d)

    def __init__(self, name: str, module: nn.Module) -> None:
        assert isinstance(module, nn.Conv1d | nn.Conv2d)
        if module.groups != 1:
            raise UnsupportedModuleError(
                f"layer '{name}' ({type(module).__name__}) has groups={module.groups}; hookinf supports "
                f"groups=1 only (a grouped weight is block-diagonal, not one [out, in] matrix). Exclude it with "
                f"watch(model, modules=[...])."
            )
        self._spatial = 2 if isinstance(module, nn.Conv2d) else 1
        self._kernel = _pair(module.kernel_size, self._spatial)
        self._stride = _pair(module.stride, self._spatial)
        self._dilation = _pair(module.dilation, self._spatial)
        self._pad = tuple(module._reversed_padding_repeated_twice)
        self._pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        super().__init__(name, module)

    def _factor_dims(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module.weight, Tensor)
        out_channels, in_per_group, *kernel = module.weight.shape
        receptive = in_per_group
        for k in kernel:
            receptive *= k
        return int(out_channels), int(receptive)

    def _padded(self, x: Tensor) -> Tensor:
        """The input as the module's convolution sees it, as a 2-D batch ``[B, C, H, W]``."""
        self._require_batched(x, self._spatial + 2, f"a {self._spatial + 2}-D input [B, C, ...]")
        if any(self._pad):
            x = F.pad(x, self._pad, mode=self._pad_mode)
        return x.unsqueeze(2) if self._spatial == 1 else x  # [B, C, 1, L]: a Conv1d is a Conv2d of height 1

    def positions(self, x: Tensor) -> tuple[int, int]:
        """``(B, L)``: the batch and the number of output positions (the convolution's size arithmetic)."""
        self._require_batched(x, self._spatial + 2, f"a {self._spatial + 2}-D input [B, C, ...]")
        sizes = (1, int(x.shape[-1])) if self._spatial == 1 else (int(x.shape[-2]), int(x.shape[-1]))
        pads = (
            (0, self._pad[0] + self._pad[1])
            if self._spatial == 1
            else (self._pad[2] + self._pad[3], self._pad[0] + self._pad[1])
        )
        count = 1
        for size, pad, k, d, s in zip(sizes, pads, self._kernel, self._dilation, self._stride, strict=True):
            count *= max(0, (size + pad - d * (k - 1) - 1) // s + 1)
        return int(x.shape[0]), count

    def _activations(self, x: Tensor) -> Tensor:
        patches = F.unfold(self._padded(x), kernel_size=self._kernel, dilation=self._dilation, stride=self._stride)
        return patches.transpose(1, 2)  # [B, C·Πk, L] → [B, L, C·Πk]

    def projected_activations(self, x: Tensor, projection: Tensor) -> Tensor:
        """``a Pᵀ`` ``[B, L, r]`` as one convolution with kernels ``P`` ``[r, C, *k]`` (and ``P``'s bias column).

        Unfolding orders a patch's entries as the weight does, ``(C, *k)``, so row ``j`` of ``P`` reshaped to the
        weight's shape is the kernel whose convolution with the padded input gives ``(a Pᵀ)[:, :, j]`` at every
        output position.
        """
        x = self._padded(x.detach())
        kernels = projection[:, : self.in_features].reshape(projection.shape[0], x.shape[1], *self._kernel)
        bias = projection[:, self.in_features] if self.has_bias else None
        out = F.conv2d(x, kernels, bias, stride=self._stride, dilation=self._dilation)
        return out.flatten(2).transpose(1, 2)  # [B, r, *spatial] → [B, L, r]

    def output_gradients(self, grad_output: Tensor) -> Tensor:
        """``[B, O, *spatial]`` → ``[B, L, O]``."""
        return grad_output.flatten(2).transpose(1, 2)  # [B, O, *spatial] → [B, L, O]

    def _weight_gradient(self, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], *self.weight_shape)


def _pair(value: int | tuple[int, ...] | str, spatial: int) -> tuple[int, int]:
    """Kernel/stride/dilation as the 2-D tuple ``F.unfold`` wants (height 1 for Conv1d)."""
    values = (value,) * spatial if isinstance(value, int) else tuple(int(v) for v in value)
    return (1, values[0]) if spatial == 1 else (values[0], values[1])
