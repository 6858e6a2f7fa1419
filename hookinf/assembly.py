"""What a watch's hooks received for the open step, and assembling the finished step from it (no hook here).

Each tracked layer may have been called several times in one forward (a shared module); its calls' ``a`` and ``δ``
are concatenated along the position axis ``S``, so their contributions sum in ``Σ_s δ_s a_sᵀ``. Every layer must
see the same batch size ``B`` (its first dimension). With ``loss_reduction="mean"`` the loss averaged the batch, so
``δ`` is multiplied by ``B`` to make each example's gradient its own loss's. When the hooks mapped the factors (a
:class:`~hookinf.pipeline.FactorMap`, e.g. a compressor's projections), the same happens to the mapped factors —
the maps act per position and linearly on ``δ``, so the order does not matter — and the map builds the capture.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hookinf.autograd import without_autocast
from hookinf.capture import FiniteCheck, LayerCapture, all_finite
from hookinf.errors import CaptureError
from hookinf.layers import LayerAdapter
from hookinf.layers.base import memory_key
from hookinf.pipeline import FactorMap


@dataclass(eq=False)
class Call:
    """One forward call of one tracked module, waiting for its output gradient."""

    name: str
    adapter: LayerAdapter
    a: Tensor  # the activations, or the module's input when they are formed later (see received)
    dtype: torch.dtype  # the layer's weight dtype: both factors are captured in it (see hookinf.hooks)
    done: bool = False
    size: tuple[int, ...] = ()  # the activations' (B, S) when ``a`` is the input (checked, not formed, in forward)


@dataclass
class Pending:
    """What the current (not yet closed) step has received."""

    fired: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    flags: list[tuple[str, str, Tensor]] = field(default_factory=list)  # finiteness of the raw factors, unread
    versions: dict[str, list[int]] = field(default_factory=dict)  # deferred: each input's version when it fired
    formed: dict[Hashable, Tensor] = field(default_factory=dict)  # activations formed, by the adapter's sharing key
    checked: dict[Hashable, Tensor] = field(default_factory=dict)  # finiteness flags of inputs, by their memory

    def __bool__(self) -> bool:
        return bool(self.fired)

    def input_finite(self, x: Tensor) -> Tensor:
        """:func:`~hookinf.capture.all_finite` of a layer's input, reduced once for layers that read the same one."""
        key = memory_key(x)
        if key is None:
            return all_finite(x)
        if key not in self.checked:
            self.checked[key] = all_finite(x)
        return self.checked[key]

    def is_whole(self, layers: Sequence[str]) -> bool:
        """Whether a backward reached every one of ``layers`` and every forward call made."""
        return bool(self.fired) and all(n in self.fired for n in layers) and all(c.done for c in self.calls)


MISSING_HINT = (
    "A module whose own forward() is never called (e.g. nn.MultiheadAttention uses out_proj's weights directly) "
    "has no captures, and its influence would be silently missing: exclude it with watch(model, modules=[...]) "
    "listing the layers to track."
)


def check_received(fired: Mapping[str, object], layers: Sequence[str]) -> None:
    """Refuses a step in which a tracked layer received no output gradient.

    Raises:
        CaptureError: naming the layers that received none.
    """
    missing = [name for name in layers if name not in fired]
    if missing:
        raise CaptureError(
            f"{len(missing)} tracked layer(s) received no output gradient in this forward/backward: "
            f"{', '.join(repr(n) for n in missing)}. Either its output does not reach the loss or {MISSING_HINT}"
        )


def finite_check(flags: list[tuple[str, str, Tensor]], layers: Sequence[str]) -> FiniteCheck:
    """The step's check from the hooks' flags, in model order (an error names the first non-finite layer)."""
    order = {name: index for index, name in enumerate(layers)}
    return FiniteCheck.of(sorted(flags, key=lambda flag: order[flag[0]]))


def received(
    pending: Pending, call: Call, grad: Tensor, factor_map: FactorMap | None, deferred: bool
) -> tuple[Tensor, Tensor]:
    """One call's ``(a, δ)`` once its output gradient ``grad`` arrived (inside backward), flagged for finiteness.

    The forward hook kept the module's input (or, with a factor map, the mapped activations). Unless ``deferred``,
    the activations are formed here, during backward: the input is then exactly what the forward saw (autograd
    refuses a backward through a saved input modified in place), and the unfolded patches of a convolution exist
    only from now on, not from the forward. ``deferred`` (a watch without consumers or factor map) keeps the input
    and its version, and forms ``a`` when the step's capture is first read (:func:`deferred_activations`).

    Raises:
        CaptureError: the output gradient does not line up with the layer's activations.
    """
    delta = call.adapter.output_gradients(grad.detach())
    a = call.a
    if factor_map is None and not deferred:
        a = _activations(pending, call)
    size = call.size if factor_map is None and deferred else tuple(a.shape)
    if tuple(delta.shape[:2]) != size[:2]:
        raise CaptureError(
            f"layer '{call.name}': output gradient {list(delta.shape)} does not match its activations "
            f"{list(size)} in the batch/position dimensions; the module's output was reshaped in a way "
            f"hookinf cannot follow. Exclude the layer with watch(model, modules=[...])."
        )
    pending.flags.append((call.name, "output gradients", all_finite(delta)))
    delta = delta.to(call.dtype)  # under autocast δ is bfloat16/float16 while the weight is float32
    if factor_map is not None:
        with without_autocast(delta.device.type):
            delta = factor_map.output_gradients(call.name, delta)
    elif deferred:
        pending.versions.setdefault(call.name, []).append(a._version)
    return a, delta


def _activations(pending: Pending, call: Call) -> Tensor:
    """The call's activations, formed from its input once per step for every layer that reads it alike.

    Layers whose adapters give the input the same :meth:`~hookinf.layers.LayerAdapter.sharing_key` (q, k and v
    reading one hidden state) get the same tensor, so consumers can recognise it and do their work on it once.
    """
    key = call.adapter.sharing_key(call.a)
    if key is not None and key in pending.formed:
        return pending.formed[key]
    with without_autocast(call.a.device.type):
        a = call.adapter.activations(call.a)
    if key is not None:
        pending.formed[key] = a
    return a


def deferred_activations(
    name: str, adapter: LayerAdapter, inputs: Sequence[Tensor], versions: Sequence[int]
) -> Callable[[], Tensor]:
    """What forms a layer's ``a`` from its calls' inputs when first read, refusing inputs modified since backward.

    Raises (when called):
        CaptureError: an input was modified in place after its backward (a reused input buffer): its activations
            are gone, and forming them from the new values would be silently wrong.
    """

    def build() -> Tensor:
        if any(x._version != version for x, version in zip(inputs, versions, strict=True)):
            raise CaptureError(
                f"layer '{name}': its input was modified in place after the backward (e.g. a reused input buffer) "
                f"before the step's activations were read. Read w.last_step or w.per_example_gradients() right "
                f"after the backward, before the next batch is written into the buffer."
            )
        with without_autocast(inputs[0].device.type):
            parts = [adapter.activations(x) for x in inputs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    return build


def assemble(
    fired: Mapping[str, Sequence[tuple[Tensor, Tensor]]],
    adapters: Mapping[str, LayerAdapter],
    loss_reduction: str,
    factor_map: FactorMap | None = None,
    versions: Mapping[str, Sequence[int]] | None = None,
) -> tuple[dict[str, LayerCapture], int]:
    """The step's captures (in ``adapters``' order) and its batch size.

    Args:
        fired: layer → the ``(a [B, S_k, I], δ [B, S_k, O])`` of each of its calls, every tracked layer present
            (with ``versions``: the call's input in place of ``a``).
        adapters: layer → adapter, in model order.
        loss_reduction: ``"mean"`` or ``"sum"`` (see :func:`hookinf.watch`).
        factor_map: what mapped the factors in the hooks (it then builds each capture), or ``None``.
        versions: for a deferred step (see :func:`received`), each call's input version when its gradient came.

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
        delta = calls[0][1] if len(calls) == 1 else torch.cat([c[1] for c in calls], dim=1)
        if loss_reduction == "mean":
            delta = delta * batch_size
        if versions is not None:
            build = deferred_activations(name, adapters[name], [c[0] for c in calls], versions[name])
            layers[name] = LayerCapture(name, build, delta, adapters[name])
            continue
        a = calls[0][0] if len(calls) == 1 else torch.cat([c[0] for c in calls], dim=1)
        if factor_map is None:
            layers[name] = LayerCapture(name=name, a=a, delta=delta, adapter=adapters[name])
        else:
            layers[name] = factor_map.capture(name, a, delta, adapters[name])
    assert batch_size is not None
    return layers, batch_size
