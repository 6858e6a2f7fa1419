"""Questions to autograd and one way to run a backward: pure helpers, no hook and no state of hookinf's.

* :func:`in_backward` / :func:`in_functorch`: where the current Python code runs (inside a backward pass, e.g. a
  checkpoint's recomputation; inside a ``torch.func`` transform), which hooks use to ignore calls that are not the
  user's batch.
* :func:`without_autocast`: the hooks' own arithmetic runs in the dtypes it chooses, not autocast's.
* :func:`differentiate`: runs the backward of a loss far enough to reach given tensors, keeping no gradient, also
  through a reentrant checkpoint (which refuses ``torch.autograd.grad``), with every ``.grad`` put back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def in_functorch() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, ...) is running: its tensors are not the user's batch."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def in_backward() -> bool:
    """Whether autograd is executing a backward pass on this thread (true during checkpoint recomputation)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and bool(task_id() != -1)


def without_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A block in which autocast is off on ``device_type`` (a no-op context when it is off already).

    A forward hook runs inside the user's ``torch.autocast`` region, where ``F.linear``, ``F.conv2d`` and ``@`` would
    cast hookinf's projections to bfloat16 or float16; the hooks compute in the layer's weight dtype instead.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def differentiate(loss: Tensor, targets: Sequence[Tensor], model: nn.Module) -> None:
    """Runs the backward of ``loss`` far enough to reach ``targets`` (firing the watch's hooks); keeps no gradient.

    ``torch.autograd.grad`` where possible. A reentrant checkpoint in the graph runs only under ``backward()``
    (``torch.utils.checkpoint`` raises otherwise), so then the ``.grad`` of every parameter of ``model`` and of every
    other leaf of the graph is saved and restored around it: the user's model is left as it was.
    """
    leaves = _reentrant_checkpoint_leaves(loss)
    if leaves is None:
        torch.autograd.grad(loss, targets, allow_unused=True)
        return
    known = {id(leaf) for leaf in leaves}
    leaves += [p for p in model.parameters() if p.requires_grad and id(p) not in known]
    saved = [leaf.grad for leaf in leaves]
    try:
        for leaf in leaves:
            leaf.grad = None
        loss.backward()
    finally:
        for leaf, grad in zip(leaves, saved, strict=True):
            leaf.grad = grad


def _reentrant_checkpoint_leaves(loss: Tensor) -> list[Tensor] | None:
    """The graph's leaves when it holds a reentrant checkpoint, else ``None`` (a walk over ``loss``'s graph).

    The parameters used inside a checkpointed segment are not in this graph (its first forward ran without grad);
    :func:`differentiate` adds the model's parameters for them.
    """
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    leaves: list[Tensor] = []
    found = False
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name == "CheckpointFunctionBackward":
            found = True
        elif name == "AccumulateGrad":
            leaves.append(node.variable)  # type: ignore[attr-defined]  # AccumulateGrad holds its leaf
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves if found else None
