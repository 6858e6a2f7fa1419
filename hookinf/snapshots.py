"""Snapshots of a model's trainable parameters at chosen steps of the user's own loop: ``checkpoints=`` sources.

One line in a training loop (``snaps.take(epoch)``, also inside a :func:`hookinf.watch` block: it reads the
weights and touches no hook) keeps a copy of what training changes — the parameters with ``requires_grad`` and the
persistent buffers (batch-norm statistics), not frozen weights — on the host, or as one safetensors file per step
written atomically (``step-00000100.safetensors``). :attr:`Snapshots.checkpoints` lists them in step order for
``hookinf.influence(..., checkpoints=snaps.checkpoints)``; :func:`saved_snapshots` lists a directory's files from
another process. A LoRA model's snapshot is its adapters only: a few MB.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import Tensor, nn

from hookinf.checkpoints import CheckpointSource
from hookinf.errors import ConfigurationError, HookinfError
from hookinf.io import write_safetensors

_FILE = re.compile(r"step-(\d+)\.safetensors")


class Snapshots:
    """Keeps the trainable weights at chosen steps (or epochs) of a training loop.

    Example::

        snaps = hookinf.Snapshots(model, every=25)            # or to="snapshots/" for files
        for epoch in range(1, 101):
            train_one_epoch(model)
            snaps.take(epoch)                                 # keeps epochs 25, 50, 75, 100
        scores = hookinf.influence(model, train, query, loss_fn, checkpoints=snaps.checkpoints)

    Args:
        model: the model being trained.
        every: take a snapshot at every positive multiple of this step.
        at: take snapshots at exactly these steps (with ``every``, either one triggers).
        to: a directory for the snapshots (created when missing; one safetensors file per step, written atomically),
            or ``None`` to keep them in host memory.
        buffers: also keep the persistent buffers (batch-norm running statistics, which change during training
            and which eval-mode scoring uses).

    Attributes:
        steps: the steps snapshotted so far, in the order taken.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int | None = None,
        at: Iterable[int] | None = None,
        to: str | os.PathLike[str] | None = None,
        buffers: bool = True,
    ) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigurationError(f"Snapshots(every={every!r}): give a positive integer number of steps.")
        chosen = set(at) if at is not None else set()
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in chosen):
            raise ConfigurationError(f"Snapshots(at={sorted(chosen, key=str)!r}): steps are non-negative integers.")
        if every is None and not chosen:
            raise ConfigurationError("Snapshots needs every= (a number of steps) or at= (the steps to keep).")
        self.model = model
        self.every = every
        self.at = frozenset(chosen)
        self.directory = Path(to) if to is not None else None
        self.buffers = buffers
        self.steps: list[int] = []
        self._kept: dict[int, CheckpointSource] = {}

    def due(self, step: int) -> bool:
        """Whether :meth:`take` keeps ``step`` (a multiple of ``every`` or one of ``at``, not yet taken)."""
        if step in self._kept:
            return False
        return step in self.at or (self.every is not None and step > 0 and step % self.every == 0)

    def take(self, step: int, *, force: bool = False) -> bool:
        """Snapshots the weights if ``step`` is due (or ``force``); returns whether it did.

        Args:
            step: the loop's step or epoch counter (a non-negative integer).
            force: snapshot even when ``step`` is not one of the chosen steps (e.g. the last step of training);
                a step already taken is never taken twice.

        Raises:
            HookinfError: the snapshot file cannot be written (names it; chained from the ``OSError``).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigurationError(f"Snapshots.take(step={step!r}): give the step as a non-negative integer.")
        if step in self._kept or not (force or self.due(step)):
            return False
        tensors = trainable_state(self.model, buffers=self.buffers)
        if self.directory is None:
            self._kept[step] = {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}
        else:
            path = self.directory / f"step-{step:08d}.safetensors"
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                write_safetensors(path, tensors)
            except OSError as err:
                raise HookinfError(f"cannot write the snapshot {path}: {err}") from err
            self._kept[step] = path
        self.steps.append(step)
        return True

    __call__ = take

    @property
    def checkpoints(self) -> list[CheckpointSource]:
        """The snapshots in step order: state dicts (in memory) or file paths, for ``checkpoints=``."""
        return [self._kept[step] for step in sorted(self._kept)]

    def __len__(self) -> int:
        return len(self._kept)

    def __repr__(self) -> str:
        where = "memory" if self.directory is None else repr(str(self.directory))
        return f"Snapshots(every={self.every}, at={sorted(self.at)}, in {where}: steps {sorted(self._kept)})"


def trainable_state(model: nn.Module, *, buffers: bool = True) -> dict[str, Tensor]:
    """The model's state-dict entries that training changes: parameters with ``requires_grad`` (and buffers)."""
    params = {id(p) for p in model.parameters() if p.requires_grad}
    kept = {id(b) for b in model.buffers()} if buffers else set()
    own: Mapping[str, Tensor] = model.state_dict(keep_vars=True)
    return {name: t for name, t in own.items() if id(t) in params or id(t) in kept}


def saved_snapshots(directory: str | os.PathLike[str]) -> list[Path]:
    """The snapshot files :class:`Snapshots` wrote to ``directory`` (``step-N.safetensors``), in step order.

    Raises:
        HookinfError: ``directory`` does not exist.
    """
    path = Path(directory)
    if not path.is_dir():
        raise HookinfError(f"{path}: no such snapshot directory.")
    found = [(int(m.group(1)), p) for p in path.iterdir() if (m := _FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]
