"""Small pure linear-algebra helpers shared by the methods (tensors in, tensors out).

Index conventions used in subscripts across hookinf: ``b`` examples of a batch, ``s`` shared positions (tokens,
conv patches), ``o`` output features, ``i`` input features (bias column included), ``q`` query examples,
``n`` training examples, ``d`` flattened parameters of one layer.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import opt_einsum
import torch
from torch import Tensor


@lru_cache(maxsize=256)
def _expression(subscripts: str, shapes: tuple[tuple[int, ...], ...]) -> Any:
    return opt_einsum.contract_expression(subscripts, *shapes)


def einsum(subscripts: str, *operands: Tensor) -> Tensor:
    """``torch.einsum`` with the contraction order chosen by opt_einsum and cached per shapes.

    Args:
        subscripts: einsum subscripts using the index conventions of this module.
        *operands: the tensors.

    Returns:
        The contracted tensor.
    """
    if len(operands) <= 2:
        return torch.einsum(subscripts, *operands)
    expression = _expression(subscripts, tuple(tuple(op.shape) for op in operands))
    return expression(*operands, backend="torch")  # type: ignore[no-any-return]


def per_example_gradients(a: Tensor, delta: Tensor) -> Tensor:
    """Per-example weight gradients ``g_b = Σ_s δ_{b,s} a_{b,s}ᵀ``.

    Args:
        a: activations ``[B, S, I]``.
        delta: output gradients ``[B, S, O]``.

    Returns:
        ``[B, O, I]``.
    """
    return einsum("bso,bsi->boi", delta, a)
