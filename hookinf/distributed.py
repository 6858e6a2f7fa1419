"""Running hookinf's passes on several processes through ``torch.distributed`` (the process groups of torchrun/DDP).

hookinf schedules nothing itself: :func:`hookinf.fit` and :func:`hookinf.log` called on every rank of an initialised
process group (``group="auto"``, the default, finds the default group; a ``ProcessGroup`` may be given; ``None``
keeps the call local) run over the shard of the data each rank passes, as it passes it (no re-split), and combine:

- **statistics**: every accumulator's sums and counts are summed over the ranks by :meth:`Ranks.all_reduce` at the
  end of each pass — one flat buffer per dtype (one ``all_reduce`` for float64 statistics, whose counts travel in
  the same buffer; float32 statistics add one small float64 collective for the counts), so every rank ends the pass
  with the same bits;
- **failures**: a rank whose pass raises still joins that all-reduce, with its flag set, then raises its own error;
  the other ranks raise :class:`~hookinf.errors.DistributedError` naming it at once. A rank that dies (its
  connections close) or never arrives fails the collective after the process group's ``timeout`` (pass
  ``timeout=datetime.timedelta(...)`` to ``init_process_group``; torch's default is 30 minutes for gloo); that
  failure is raised as a ``DistributedError`` too.

This module knows only tensors and process groups (no hooks, no store, no model beyond unwrapping DDP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hookinf.errors import ConfigurationError, DistributedError

Group: TypeAlias = "dist.ProcessGroup | Literal['auto'] | None"
"""``group=``: ``"auto"`` (the default process group when one is initialised with more than one rank), a
``torch.distributed.ProcessGroup``, or ``None`` (this process alone, no collectives)."""


@dataclass(frozen=True)
class Ranks:
    """The processes a pass runs on: a process group of more than one rank, and this process's place in it.

    Attributes:
        group: the process group (``None``: the default group).
        rank: this process's rank in ``group``.
        size: the number of ranks.
        device: where collectives run (the current CUDA device for ``nccl``, the host otherwise).
    """

    group: dist.ProcessGroup | None
    rank: int
    size: int
    device: torch.device

    def all_reduce(self, tensors: Sequence[Tensor], counts: Sequence[int], *, failed: bool, what: str) -> list[int]:
        """Sums ``tensors`` (in place) and ``counts`` over the ranks; announces and detects a failed rank.

        Tensors are flattened into one buffer per dtype (float64 first, holding the counts and one failure flag per
        rank). After that first buffer, a rank that reported ``failed`` makes every other rank raise.

        Args:
            tensors: summed in place; the same shapes and dtypes, in the same order, on every rank.
            counts: integers summed exactly (below ``2⁵³``).
            failed: this rank's pass raised (it joins only to tell the others, and gets the counts back).
            what: what is summed, for the error messages (``"the K-FAC factors"``).

        Returns:
            The summed counts.

        Raises:
            DistributedError: another rank reported a failure, or the collective failed (a rank died or timed out).
        """
        header = torch.zeros(len(counts) + self.size, dtype=torch.float64)
        header[: len(counts)] = torch.tensor([float(c) for c in counts], dtype=torch.float64)
        header[len(counts) + self.rank] = float(failed)
        buckets: dict[torch.dtype, list[Tensor]] = {torch.float64: [header]}
        for tensor in tensors:
            buckets.setdefault(tensor.dtype, []).append(tensor)
        float64 = buckets.pop(torch.float64)
        self._reduce(float64, what)
        flags = header[len(counts) :].tolist()
        others = [rank for rank, flag in enumerate(flags) if flag and rank != self.rank]
        if others and not failed:
            raise DistributedError(
                f"rank {self.rank}: rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} of {self.size} "
                f"failed before {what} (see {'their' if len(others) > 1 else 'its'} own error); this "
                f"rank stops too."
            )
        if not failed:
            for dtype in sorted(buckets, key=str):  # the same order on every rank
                self._reduce(buckets[dtype], what)
        return [round(value) for value in header[: len(counts)].tolist()]

    def agree(self, *, failed: bool, what: str) -> None:
        """A barrier that also tells every rank whether one failed (:meth:`all_reduce` of no tensor)."""
        self.all_reduce([], [], failed=failed, what=what)

    def broadcast(self, value: str, what: str) -> str:
        """Rank 0's ``value``, on every rank."""
        box: list[object] = [value]
        source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        self._collective(lambda: dist.broadcast_object_list(box, src=source, group=self.group), what)
        return str(box[0])

    def _reduce(self, parts: Sequence[Tensor], what: str) -> None:
        flat = torch.cat([part.detach().reshape(-1).to(self.device) for part in parts])
        self._collective(lambda: dist.all_reduce(flat, group=self.group), what)
        offset = 0
        for part in parts:
            part.copy_(flat[offset : offset + part.numel()].view_as(part))
            offset += part.numel()

    def _collective(self, run: Callable[[], object], what: str) -> None:
        try:
            run()
        except RuntimeError as err:  # gloo: a peer closed its connection or the timeout passed; nccl: the watchdog
            raise DistributedError(
                f"rank {self.rank} of {self.size}: the collective for {what} failed — another rank died, or did not "
                f"reach it within the process group's timeout (init_process_group(timeout=...)). ({err})"
            ) from err


def resolve_ranks(group: Group) -> Ranks | None:
    """The ranks ``group=`` names, or ``None`` when the call runs in this process alone.

    Raises:
        ConfigurationError: ``group`` is neither ``"auto"``, ``None`` nor a process group.
    """
    if group is None:
        return None
    if isinstance(group, str) and group == "auto":
        if not (dist.is_available() and dist.is_initialized()):
            return None
        chosen = None
    elif dist.is_available() and isinstance(group, dist.ProcessGroup):
        chosen = group
    else:
        raise ConfigurationError(
            f"group={group!r}: pass 'auto' (the default process group when one is initialised), a "
            f"torch.distributed.ProcessGroup, or None (this process alone)."
        )
    size = dist.get_world_size(chosen)
    if size == 1:
        return None
    backend = dist.get_backend(chosen)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Ranks(chosen, dist.get_rank(chosen), size, device)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper (``model`` itself otherwise).

    Its layers' names lack the ``module.`` prefix, and running it directly keeps DDP's gradient reducer (which
    expects every forward to end in a backward into the weights) out of hookinf's passes.
    """
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model
