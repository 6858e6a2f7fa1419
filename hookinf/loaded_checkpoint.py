"""Loading a checkpoint's weights into the model for the length of a block, and putting the model's own back.

:class:`LoadedCheckpoint` copies a checkpoint's tensors into the model's parameters and buffers in place (the
same tensor objects, so hooks, optimizers and tied weights see the change) and, when the block ends — normally or
by an exception — copies back the values they had, bit for bit, from a host copy of only the tensors it
overwrote, and restores every module's training flag and every parameter's ``requires_grad``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from hookinf.errors import CheckpointError
from hookinf.selection import Selection

_SHOWN = 5


def tracked_names(selection: Selection) -> list[str]:
    """The state-dict names of the tracked layers' trainable parameters: what every checkpoint must hold."""
    return [
        f"{layer}.{name}" if layer else name
        for layer, module in selection.modules.items()
        for name, param in module.named_parameters(recurse=False)
        if param.requires_grad
    ]


class LoadedCheckpoint:
    """Runs a ``with`` block with ``state``'s tensors in the model, then restores the model exactly as it was.

    ``state`` may be partial (only the trainable or tracked parameters): the model's other tensors keep their
    values. Afterwards — also when the block raises — every tensor the checkpoint overwrote holds its old value
    bit for bit (from a host copy of only those tensors), and every module's ``training`` flag and every
    parameter's ``requires_grad`` are as before. Tensors are converted to each target's dtype and device when
    copied; the reference to ``state`` is dropped once copied, so a checkpoint read for the block is freed then.

    Args:
        model: the architecture, holding its own weights.
        state: state-dict name → tensor (see :func:`hookinf.checkpoints.read_checkpoint`).
        require: names the checkpoint must hold (the tracked parameters: scoring a checkpoint with the final
            model's values for a tracked layer would be silently wrong).
        what: how errors name the checkpoint.

    Raises:
        CheckpointError: a name the model does not have, a tensor of the wrong shape, or a required name missing
            (the message names the checkpoint, the names and the shapes); raised before the model is touched.
    """

    def __init__(
        self, model: nn.Module, state: Mapping[str, Tensor], *, require: Sequence[str] = (), what: str = "checkpoint"
    ) -> None:
        self._targets = _targets(model, state, require, what)
        self._model = model
        self._state: Mapping[str, Tensor] | None = state
        self._kept: dict[int, tuple[Tensor, Tensor]] = {}  # id(target) → (target, host copy of its value)
        self._modes: list[tuple[nn.Module, bool]] = []
        self._flags: list[tuple[Tensor, bool]] = []

    def __enter__(self) -> None:
        state, self._state = self._state, None
        if state is None:
            raise CheckpointError("a LoadedCheckpoint block cannot be entered twice.")
        self._modes = [(module, module.training) for module in self._model.modules()]
        self._flags = [(param, param.requires_grad) for param in self._model.parameters()]
        for target in self._targets.values():
            self._kept.setdefault(id(target), (target, target.detach().to("cpu", copy=True)))
        try:
            with torch.no_grad():
                for name, target in self._targets.items():
                    target.copy_(state[name])
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        with torch.no_grad():
            for target, value in self._kept.values():
                target.copy_(value)
        for module, training in self._modes:
            module.training = training
        for param, flag in self._flags:
            param.requires_grad_(flag)
        self._kept.clear()


def _targets(model: nn.Module, state: Mapping[str, Tensor], require: Sequence[str], what: str) -> dict[str, Tensor]:
    """The model's tensor for each of the checkpoint's names, after checking names and shapes."""
    own = model.state_dict(keep_vars=True)
    unknown = [name for name in state if name not in own]
    if unknown:
        example = next(iter(own), "")
        raise CheckpointError(
            f"{what} holds {len(unknown)} name(s) the model does not have: {_listed(unknown)} (the model's names "
            f"look like {example!r}). A checkpoint must come from this architecture, saved from its state_dict()."
        )
    wrong = [
        f"{name!r}: {list(state[name].shape)} in the checkpoint, {list(own[name].shape)} in the model"
        for name in state
        if state[name].shape != own[name].shape
    ]
    if wrong:
        raise CheckpointError(f"{what} has tensors of the wrong shape: {'; '.join(wrong[:_SHOWN])}.")
    missing = [name for name in require if name not in state]
    if missing:
        raise CheckpointError(
            f"{what} has no value for {len(missing)} tracked parameter(s): {_listed(missing)}. A checkpoint must "
            f"hold every tracked layer's trainable parameters (snapshot them with hookinf.Snapshots, or save "
            f"model.state_dict())."
        )
    return {name: own[name] for name in state}


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
