"""Logging into one gradient store from every rank: each rank writes its own part, rank 0 merges them at the end.

Both front doors log so — :func:`hookinf.log` (through :func:`shared_store`, around its whole pass) and a
:func:`hookinf.watch` with ``log_to=`` around the user's loop (:class:`~hookinf.loop.LoopWatch`, which calls the two
phases from its constructor and its ``__exit__``, and may be entered several times) — see :mod:`hookinf.store_parts`
for the layout. The phases:

1. :func:`join_store` (before any rank opens its part): the ranks agree on one run token (rank 0's, recorded with the
   weights in every part, so that the run may resume its own store after its weights moved) and, with
   ``overwrite``, rank 0 removes the old store while the others wait.
2. Each rank logs into its part ``path/rank-NNNNN`` (the :class:`LogTarget`), skipping the ids stored anywhere in the
   store (so a rerun resumes whatever the world size).
3. :func:`leave_store` (once every rank closed its part, or failed): the ranks meet once. When none failed, rank 0
   merges the parts (one atomic manifest rename, recording the weights its part ended at) and the others wait for
   it; when a rank failed, it tells the others there, which raise :class:`~hookinf.errors.DistributedError` — and
   the store keeps every shard any rank flushed, unmerged, so logging again into the same path resumes it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hookinf.distributed import Ranks, announcing
from hookinf.errors import DistributedError
from hookinf.store_parts import clear_store, merge_parts, part_path
from hookinf.weights import WeightsRecord


@dataclass(frozen=True)
class LogTarget:
    """Where one rank logs.

    Attributes:
        path: the store (one process) or this rank's part of it.
        overwrite: whether the logger replaces what ``path`` holds (rank 0 clears a shared store itself).
        run: the run token every rank records (``None``: the logger's own).
        whole: the whole store when ``path`` is a part, else ``None``.
    """

    path: Path
    overwrite: bool
    run: str | None
    whole: Path | None


def join_store(path: str | os.PathLike[str], ranks: Ranks | None, overwrite: bool) -> LogTarget:
    """Phase 1 (module docstring): this rank's :class:`LogTarget`; with several ranks a collective.

    Raises:
        DistributedError: another rank failed, or died, while the run token was shared or the store cleared.
        StoreError: this rank (rank 0) could not clear the store (the others raise ``DistributedError``).
    """
    if ranks is None:
        return LogTarget(Path(path), overwrite, None, None)
    run = ranks.broadcast(uuid.uuid4().hex[:16], "sharing the run's token")
    with announcing(ranks, "clearing the store"):
        if overwrite and ranks.rank == 0:
            clear_store(Path(path))
    return LogTarget(part_path(path, ranks.rank), False, run, Path(path))


def leave_store(target: LogTarget, ranks: Ranks | None, *, failed: bool, weights: WeightsRecord | None = None) -> None:
    """Phase 3 (module docstring): meets the other ranks once this rank closed its part (or failed to).

    Does nothing for a store of one process. A rank that ``failed`` only tells the others (and then raises its own
    error, as the caller does). When none failed, rank 0 merges the parts, recording ``weights`` (the weights its
    logging ended at; ``None``: those the parts record).

    Raises:
        DistributedError: another rank failed or died while logging, or while the parts were merged.
        StoreError: this rank (rank 0) could not merge the parts (the others raise ``DistributedError``).
    """
    if ranks is None or target.whole is None:
        return
    if failed:
        with contextlib.suppress(DistributedError):
            ranks.agree(failed=True, what="the end of logging")
        return
    ranks.agree(failed=False, what="the end of logging")
    with announcing(ranks, "merging the store's parts"):
        if ranks.rank == 0:
            merge_parts(target.whole, weights=weights)


@contextlib.contextmanager
def shared_store(path: str | os.PathLike[str], ranks: Ranks | None, overwrite: bool) -> Iterator[LogTarget]:
    """This rank's :class:`LogTarget` for the block (:func:`join_store`), then :func:`leave_store` at its end.

    Raises:
        DistributedError: another rank raised or died while logging, or while clearing or merging the store.
    """
    target = join_store(path, ranks, overwrite)
    try:
        yield target
    except BaseException:
        leave_store(target, ranks, failed=True)
        raise
    leave_store(target, ranks, failed=False)
