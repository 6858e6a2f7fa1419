"""Logging into one gradient store from every rank: each rank writes its own part, rank 0 merges them at the end.

:func:`shared_store` wraps the logging of :func:`hookinf.log` on one rank (see :mod:`hookinf.store_parts` for the
layout). On entering, the ranks agree on one run token (rank 0's, recorded with the weights in every part) and, with
``overwrite``, rank 0 removes the old store before any rank opens its part. Each rank then logs into its part
``path/rank-NNNNN``, skipping the ids stored anywhere in the store (so a rerun resumes whatever the world size). On
leaving, the ranks meet once: when every rank closed its part, rank 0 merges them (one atomic manifest rename) and the
others wait for it; when a rank raised, it tells the others there, which raise
:class:`~hookinf.errors.DistributedError` — and the store keeps every shard any rank flushed, unmerged, so logging
again into the same path resumes it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hookinf.distributed import Ranks, announcing
from hookinf.store_parts import clear_store, merge_parts, part_path


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


@contextlib.contextmanager
def shared_store(path: str | os.PathLike[str], ranks: Ranks | None, overwrite: bool) -> Iterator[LogTarget]:
    """This rank's :class:`LogTarget` for the block; merges the parts when every rank leaves it (module docstring).

    Raises:
        DistributedError: another rank raised or died while logging, or while clearing or merging the store.
    """
    if ranks is None:
        yield LogTarget(Path(path), overwrite, None, None)
        return
    run = ranks.broadcast(uuid.uuid4().hex[:16], "sharing the run's token")
    with announcing(ranks, "clearing the store"):
        if overwrite and ranks.rank == 0:
            clear_store(Path(path))
    with announcing(ranks, "the end of logging"):
        yield LogTarget(part_path(path, ranks.rank), False, run, Path(path))
    with announcing(ranks, "merging the store's parts"):
        if ranks.rank == 0:
            merge_parts(Path(path))
