"""The spawn harness and the shared case of the distributed tests (imported by ``test_distributed*.py``).

:func:`spawn` starts two gloo ranks on CPU from a test, each running ``worker(rank, out)``, and kills them after
``TIMEOUT_S``; a rank that raises leaves ``error-<rank>.txt`` in ``out`` (read with :func:`error`). The case: a small
float64 MLP and 20 examples, with :data:`SHARDS` the rows each rank passes — rank 0 three batches (5, 5, 3 examples),
rank 1 two (4, 4) whose last repeats example 0, the padding ``DistributedSampler`` adds.
"""

from __future__ import annotations

import datetime
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

WORLD = 2
TIMEOUT_S = 120  # a spawned run that takes longer is killed and fails the test
SHARDS = {0: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12]], 1: [[13, 14, 15, 16], [17, 18, 19, 0]]}

Batch = tuple[Tensor, Tensor, Tensor]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def examples() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(20, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (20,), generator=generator)


def batches(shard: list[list[int]]) -> list[Batch]:
    x, y = examples()
    return [(x[idx], y[idx], idx) for idx in (torch.tensor(b) for b in shard)]


def loss(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def ids(batch: Batch) -> Tensor:
    return batch[2]


def _entry(worker: Callable[[int, Path], None], rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    try:
        worker(rank, out)
    except BaseException as err:
        (out / f"error-{rank}.txt").write_text(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spawn(worker: Callable[[int, Path], None], out: Path) -> dict[int, int | None]:
    """Runs ``worker(rank, out)`` on two gloo ranks; returns their exit codes (killed after ``TIMEOUT_S``)."""
    port = free_port()
    context = mp.get_context("spawn")
    procs = [context.Process(target=_entry, args=(worker, rank, port, out)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if time.monotonic() > deadline:
        pytest.fail(f"the two ranks did not finish within {TIMEOUT_S} s")
    return {rank: proc.exitcode for rank, proc in enumerate(procs)}


def error(out: Path, rank: int) -> str:
    path = out / f"error-{rank}.txt"
    return path.read_text() if path.is_file() else ""
