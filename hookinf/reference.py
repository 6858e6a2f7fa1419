"""Brute-force oracles for tests: explicit per-example gradients and explicit damped Gauss-Newton blocks.

Nothing here uses hooks or factor tricks: gradients come from ``torch.func`` (``vmap(grad(...))``), blocks are
built as dense ``d × d`` matrices and solved with ``torch.linalg.solve``. Only for small models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from hookinf.damping import Damping


def per_example_gradients(
    model: nn.Module,
    example_loss: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    params: Sequence[str],
) -> dict[str, Tensor]:
    """Per-example gradients by ``torch.func``.

    Args:
        model: the model.
        example_loss: ``example_loss(model, example)`` → scalar loss of ONE example (no batch dimension in
            ``example``, which is the batch indexed at one position along dim 0 of each tensor leaf).
        batch: a tensor or tuple of tensors with the examples along dim 0.
        params: qualified parameter names to differentiate.

    Returns:
        ``{name: [B, *param.shape]}``.
    """
    names = list(params)
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in names}
    frozen.update(dict(model.named_buffers()))
    chosen = {k: v.detach() for k, v in model.named_parameters() if k in names}

    def loss(p: dict[str, Tensor], example: Any) -> Tensor:
        class _Bound(nn.Module):
            def forward(self, *args: Any, **kwargs: Any) -> Any:
                return functional_call(model, {**frozen, **p}, args, kwargs)

        return example_loss(_Bound(), example)

    result: dict[str, Tensor] = vmap(grad(loss), in_dims=(None, 0))(chosen, batch)
    return result


def layer_blocks(grads: Mapping[str, Tensor], damping: Damping) -> dict[str, tuple[Tensor, float]]:
    """Explicit damped blocks ``G_l + λ_l I`` from flattened per-example gradients ``{layer: [n, d_l]}``."""
    out: dict[str, tuple[Tensor, float]] = {}
    for name, g in grads.items():
        g = g.double()
        block = g.T @ g / g.shape[0]
        lam = damping.value(float(torch.trace(block)) / block.shape[0])
        out[name] = (block + lam * torch.eye(block.shape[0], dtype=torch.float64, device=block.device), lam)
    return out


def influence_scores(
    train_grads: Mapping[str, Tensor],
    query_grads: Mapping[str, Tensor],
    damping: Damping | None,
) -> dict[str, Tensor]:
    """Per-layer ``−g_qᵀ (G_l + λ_l I)⁻¹ g`` with explicit solves; ``damping=None`` means the identity method.

    Args:
        train_grads: ``{layer: [n_train, d_l]}`` flattened per-example training gradients.
        query_grads: ``{layer: [n_query, d_l]}``.
        damping: the damping rule, or ``None`` for ``(G + λI)⁻¹ := I``.

    Returns:
        ``{layer: [n_query, n_train]}``.
    """
    out: dict[str, Tensor] = {}
    blocks = layer_blocks(train_grads, damping) if damping is not None else {}
    for name, g in train_grads.items():
        q = query_grads[name].double()
        solved = torch.linalg.solve(blocks[name][0], q.T).T if damping is not None else q
        out[name] = -(solved @ g.double().T)
    return out
