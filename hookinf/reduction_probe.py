"""Checks the first backward of a :func:`hookinf.watch` block against its declared ``loss_reduction``.

The captured output gradients cannot tell a summed loss from an averaged one: both are gradients of the one scalar
that was differentiated, so the per-example gradients always add up to ``.grad``, whatever ``loss_reduction``
says — a sum loss under the default ``"mean"`` gives per-example gradients ``B`` times too large that still average
to ``.grad``. The information is in the loss's autograd graph, at its root. :class:`ReductionProbe` is a
``TorchFunctionMode`` active from the block's start until the first backward that reaches the watched model: it sees
the scalar passed to ``Tensor.backward``, ``torch.autograd.backward`` or ``torch.autograd.grad``, reads how its graph
reduces the batch (:func:`reduction_of`), and raises before the backward runs when that contradicts the declared
reduction. It then removes itself at the next module call (so the steps after the first run without it).

Only unambiguous roots decide; anything else is not judged (no error):

- ``loss.mean()`` (``MeanBackward0/1``) is a mean, ``loss.sum()`` (``SumBackward0/1``) a sum;
- a loss function's own ``reduction=`` (``cross_entropy``/``nll_loss``, ``mse_loss``, ``binary_cross_entropy``, ...)
  is what it says;
- either divided by a constant: a mean stays a mean (gradient accumulation), a sum divided by the batch size is a
  mean, a sum divided by another number is not judged (e.g. by a token count);
- a product (a loss scaler's ``loss * scale``), a sum of several terms (a regulariser), or a batch of one example:
  not judged.

The mode stack is read with ``torch.overrides._get_current_function_mode_stack`` (private in torch 2.x): the probe
pops itself only when it is the innermost mode, and otherwise stays, passing every call through, until it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils.hooks import RemovableHandle

from hookinf.errors import ConfigurationError

_BACKWARDS = (Tensor.backward, torch.autograd.backward, torch.autograd.grad)
_REDUCTION_CODES = {1: "mean", 2: "sum"}  # at::Reduction: 0 none, 1 mean, 2 sum


def reduction_of(loss: Tensor, batch_size: int) -> tuple[str, str] | None:
    """``(reduction, node name)`` that the scalar ``loss`` applies over the batch, or ``None`` when not clear."""
    node = loss.grad_fn
    if node is None:
        return None
    divided_by: float | None = None
    if type(node).__name__ in ("DivBackward0", "DivBackward1") and node.next_functions[-1][0] is None:
        other = getattr(node, "_saved_other", None)
        divided_by = float(other) if isinstance(other, Tensor | int | float) and _numel(other) == 1 else None
        if divided_by is None:
            return None
        node = node.next_functions[0][0]
    if node is None:
        return None
    name = type(node).__name__
    found: str | None = None
    if name.startswith("MeanBackward"):
        found = "mean"
    elif name.startswith("SumBackward"):
        found = "sum"
    else:
        code = getattr(node, "_saved_reduction", None)
        found = _REDUCTION_CODES.get(code) if isinstance(code, int) else None
    if found is None:
        return None
    if divided_by is not None and found == "sum":
        return ("mean", f"{name} / {divided_by:g}") if divided_by == batch_size else None
    return found, name + (f" / {divided_by:g}" if divided_by is not None else "")


def _reaches(loss: Tensor, params: set[int], limit: int = 200_000) -> bool:
    """Whether ``loss``'s autograd graph reaches one of ``params`` (by id); ``True`` past ``limit`` nodes."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if len(seen) >= limit:
            return True
        seen.add(node)
        if id(getattr(node, "variable", None)) in params:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def _numel(value: Any) -> int:
    return value.numel() if isinstance(value, Tensor) else 1


class ReductionProbe(TorchFunctionMode):
    """The mode described in the module docstring.

    Args:
        declared: the watch's ``loss_reduction``.
        batch_size: ``() → B`` of the watched forward awaiting its backward, or ``None`` when there is none.
        params: the tracked parameters: a backward whose graph reaches none of them (another model's, a
            discriminator's) is not judged.
    """

    def __init__(self, declared: str, batch_size: Callable[[], int | None], params: Sequence[Tensor]) -> None:
        super().__init__()
        self.declared = declared
        self.batch_size = batch_size
        self.params = {id(p) for p in params}
        self.done = False
        self._pushed = False
        self._cleanup: RemovableHandle | None = None

    def start(self) -> None:
        """Pushes the mode (once)."""
        if not self.done and not self._pushed:
            self.__enter__()
            self._pushed = True

    def stop(self) -> None:
        """Pops the mode if it is the innermost one (else it stays, passing every call through, until it is)."""
        self.done = True
        if self._pushed and _get_current_function_mode_stack()[-1:] == [self]:
            self.__exit__(None, None, None)
            self._pushed = False
        if not self._pushed and self._cleanup is not None:
            self._cleanup.remove()
            self._cleanup = None

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if not self.done and func in _BACKWARDS:
            self._judge(args[0] if args else kwargs.get("tensors", kwargs.get("outputs")))
        return func(*args, **kwargs)

    def _judge(self, outputs: Any) -> None:
        batch = self.batch_size()
        loss = outputs[0] if isinstance(outputs, list | tuple) and len(outputs) == 1 else outputs
        if batch is None or not isinstance(loss, Tensor) or not _reaches(loss, self.params):
            return  # not the watched model's backward
        self.done = True  # one verdict per watch; the mode leaves at the next module call
        self._cleanup = nn.modules.module.register_module_forward_pre_hook(lambda module, args: self.stop())
        if batch <= 1 or loss.numel() != 1 or loss.grad_fn is None:
            return
        verdict = reduction_of(loss, batch)
        if verdict is None or verdict[0] == self.declared:
            return
        reduction, node = verdict
        factor = "large" if reduction == "sum" else "small"
        raise ConfigurationError(
            f"watch(loss_reduction={self.declared!r}), but the loss being differentiated is a {reduction} over the "
            f"batch of {batch} (its autograd graph ends in {node}): every per-example gradient would be {batch}× too "
            f"{factor}. Pass hookinf.watch(model, loss_reduction={reduction!r}), or change the loss to a "
            f"{self.declared} over the batch."
        )
