"""Assembling one step from the (activation, output-gradient) pairs a watch's hooks received (pure; no hook).

Each tracked layer may have been called several times in one forward (a shared module); its calls' ``a`` and ``δ``
are concatenated along the position axis ``S``, so their contributions sum in ``Σ_s δ_s a_sᵀ``. Every layer must
see the same batch size ``B`` (its first dimension). With ``loss_reduction="mean"`` the loss averaged the batch, so
``δ`` is multiplied by ``B`` to make each example's gradient its own loss's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hookinf.capture import LayerCapture
from hookinf.errors import CaptureError
from hookinf.layers import LayerAdapter


def assemble(
    fired: Mapping[str, Sequence[tuple[Tensor, Tensor]]], adapters: Mapping[str, LayerAdapter], loss_reduction: str
) -> tuple[dict[str, LayerCapture], int]:
    """The step's captures (in ``adapters``' order) and its batch size.

    Args:
        fired: layer → the ``(a [B, S_k, I], δ [B, S_k, O])`` of each of its calls, every tracked layer present.
        adapters: layer → adapter, in model order.
        loss_reduction: ``"mean"`` or ``"sum"`` (see :func:`hookinf.watch`).

    Raises:
        CaptureError: a layer's calls, or two layers, saw different batch sizes.
    """
    layers: dict[str, LayerCapture] = {}
    batch_size: int | None = None
    first = ""
    for name in adapters:
        calls = fired[name]
        sizes = sorted({int(a.shape[0]) for a, _ in calls})
        if len(sizes) > 1:
            raise CaptureError(
                f"layer '{name}' was called with different batch sizes {sizes} within one forward/backward; "
                f"per-example gradients need one batch per step. Run one backward per batch."
            )
        if batch_size is None:
            batch_size, first = sizes[0], name
        elif sizes[0] != batch_size:
            raise CaptureError(
                f"layer '{name}' captured a batch of {sizes[0]} examples while layer '{first}' captured "
                f"{batch_size} in the same forward/backward. Each tracked layer must see the batch as its first "
                f"dimension: if the model reshapes [B, T, ...] to [B*T, ...] before this layer, exclude it with "
                f"watch(model, modules=[...]); if the backward mixes batches, run one backward per batch."
            )
        a = calls[0][0] if len(calls) == 1 else torch.cat([c[0] for c in calls], dim=1)
        delta = calls[0][1] if len(calls) == 1 else torch.cat([c[1] for c in calls], dim=1)
        if loss_reduction == "mean":
            delta = delta * batch_size
        layers[name] = LayerCapture(name=name, a=a, delta=delta, adapter=adapters[name])
    assert batch_size is not None
    return layers, batch_size
