"""Running hookinf's passes on several processes through ``torch.distributed`` (the process groups of torchrun/DDP).

hookinf schedules nothing itself: :func:`hookinf.fit` and :func:`hookinf.log` called on every rank of an initialised
process group (``group="auto"``, the default, finds the default group; a ``ProcessGroup`` may be given; ``None``
keeps the call local) run over the shard of the data each rank passes, as it passes it (no re-split), and combine:

- **statistics**: every accumulator's sums and counts are summed over the ranks by :meth:`Ranks.all_reduce` at the
  end of each pass — one flat buffer per dtype (one ``all_reduce`` for float64 statistics, whose counts travel in
  the same buffer; float32 statistics add one small float64 collective for the counts), so every rank ends the pass
  with the same bits;
- **gathers**: the scoring helpers (:mod:`hookinf.distributed_scores`) concatenate what each rank scored with
  :meth:`Ranks.gather` (sizes first, then one ``all_gather`` per dtype: nothing is summed, every value keeps its
  bits);
- **failures**: a rank whose pass raises still joins that all-reduce, with its flag set, then raises its own error;
  the other ranks raise :class:`~hookinf.errors.DistributedError` naming it at once. A block with no collective of
  its own (a scoring pass) ends with the same flags through :func:`announcing`. A rank that dies (its
  connections close) or never arrives fails the collective after the process group's ``timeout`` (pass
  ``timeout=datetime.timedelta(...)`` to ``init_process_group``; torch's default is 30 minutes for gloo); that
  failure is raised as a ``DistributedError`` too.

This module knows only tensors and process groups (no hooks, no store, no model beyond unwrapping DDP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hookinf.errors import ConfigurationError, DistributedError

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)
"""The dtypes :meth:`Ranks.gather` carries; a tensor's code in its size exchange is its index here plus one."""

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
        header = torch.zeros(len(counts) + self.size, dtype=torch.float64, device="cpu")
        header[: len(counts)] = torch.tensor([float(c) for c in counts], dtype=torch.float64, device="cpu")
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

    def gather(self, parts: Sequence[Tensor], what: str) -> list[Tensor]:
        """Each of ``parts`` concatenated over the ranks along its first dimension, in rank order, on every rank.

        The ranks' tensors may differ in their first dimension (a rank may hold ``[0, ...]``) and in the later ones,
        which are zero-padded to the largest over the ranks (as :func:`hookinf.pairwise.pad_cat` pads positions). An
        empty tensor takes the dtype the other ranks hold. Two steps: one :meth:`all_reduce` of every rank's shapes
        and dtypes (exact integers), then one ``all_gather`` per dtype of the padded tensors flattened into one
        buffer. Nothing is summed: every value arrives with its bits, so every rank returns the same tensors.

        Args:
            parts: the same number of tensors, each with the same number of dimensions, on every rank.
            what: what is gathered, for the error messages (``"the influence scores"``).

        Returns:
            The gathered tensors, each on the device of this rank's part.

        Raises:
            DistributedError: the ranks hold one tensor in different dtypes, or the collective failed (a rank died or
                timed out).
        """
        width = sum(1 + part.dim() for part in parts)
        layout = [0] * (width * self.size)
        at = width * self.rank
        for part in parts:
            layout[at] = _dtype_code(part) if part.numel() else 0
            layout[at + 1 : at + 1 + part.dim()] = list(part.shape)
            at += 1 + part.dim()
        summed = self.all_reduce([], layout, failed=False, what=what)
        rows = [summed[r * width : (r + 1) * width] for r in range(self.size)]  # each rank's codes and shapes
        plans: list[tuple[torch.dtype, list[int], list[int]]] = []  # per part: dtype, padded shape, rows per rank
        at = 0
        for index, part in enumerate(parts):
            codes = {row[at] for row in rows if row[at]}
            if len(codes) > 1:
                held = sorted(str(_DTYPES[code - 1]) for code in codes)
                raise DistributedError(
                    f"rank {self.rank} of {self.size}: the ranks hold part {index} of {what} in different dtypes "
                    f"({', '.join(held)}); every rank must score with the same model dtype and method."
                )
            dtype = _DTYPES[codes.pop() - 1] if codes else part.dtype
            shapes = [row[at + 1 : at + 1 + part.dim()] for row in rows]
            plans.append((dtype, [max(dims) for dims in zip(*shapes, strict=True)], [s[0] for s in shapes]))
            at += 1 + part.dim()
        gathered: list[Tensor | None] = [None] * len(parts)
        for dtype in sorted({plan[0] for plan in plans}, key=str):  # the same order on every rank
            chosen = [i for i, plan in enumerate(plans) if plan[0] == dtype]
            flat = torch.cat([_padded(parts[i], plans[i][1], dtype, self.device).reshape(-1) for i in chosen])
            blocks = self._all_gather(flat, what)
            offset = 0
            for i in chosen:
                shape, counts = plans[i][1], plans[i][2]
                size = int(torch.Size(shape).numel())
                pieces = [blocks[r][offset : offset + size].view(shape)[: counts[r]] for r in range(self.size)]
                gathered[i] = torch.cat(pieces).to(parts[i].device)
                offset += size
        return [tensor for tensor in gathered if tensor is not None]

    def _all_gather(self, flat: Tensor, what: str) -> list[Tensor]:
        """Every rank's ``flat`` (the same size on every rank), in rank order."""
        blocks = [torch.empty_like(flat) for _ in range(self.size)]
        if flat.numel():
            self._collective(lambda: dist.all_gather(blocks, flat, group=self.group), what)
        return blocks

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


def _dtype_code(part: Tensor) -> int:
    """The code of ``part``'s dtype in :meth:`Ranks.gather`'s size exchange (its index in ``_DTYPES`` plus one)."""
    if part.dtype not in _DTYPES:
        raise DistributedError(
            f"cannot gather a {part.dtype} tensor across ranks; hookinf gathers {', '.join(map(str, _DTYPES))}."
        )
    return _DTYPES.index(part.dtype) + 1


def _padded(part: Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``part`` in ``dtype`` on ``device``, zero-padded at the end of every dimension to ``shape``."""
    out = torch.zeros(list(shape), dtype=dtype, device=device)
    if part.numel():
        out[tuple(slice(0, n) for n in part.shape)] = part.to(device=device, dtype=dtype)
    return out


@contextlib.contextmanager
def announcing(ranks: Ranks | None, what: str) -> Iterator[None]:
    """Runs the block, then meets the other ranks, telling them whether it raised (and raising if one did).

    For a block with collectives of its own only at points every rank reaches together (a fit's passes) or none (a
    scoring pass): a rank whose block raises joins :meth:`Ranks.agree` with its failure flag and re-raises its own
    error; the ranks that finished raise :class:`~hookinf.errors.DistributedError` naming it, at once. A failure
    inside one of the block's collectives reaches every rank there, so they all announce it and meet again here.
    With ``ranks=None`` the block just runs.

    Raises:
        DistributedError: another rank's block raised (this one's finished), or the meeting failed.
    """
    if ranks is None:
        yield
        return
    try:
        yield
    except BaseException:
        with contextlib.suppress(DistributedError):
            ranks.agree(failed=True, what=what)
        raise
    ranks.agree(failed=False, what=what)


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
