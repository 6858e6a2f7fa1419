"""Distributed benchmark: hookinf.fit and hookinf.log on one process vs two gloo processes, on the same data.

    .venv/bin/python benchmarks/distributed.py [--quick] [--repeats N]

The data (an MLP 256-512-512-10, float32, N examples in batches of 128) is fitted (EK-FAC: two passes, the
correction replayed from the cached first pass) and logged (LoGra(16, 16)) once by one process over all of it, and
once by two processes (torch.multiprocessing spawn, gloo on CPU), each over half of it, with the all-reduces and the
merge of the store included. Each process uses ``torch.get_num_threads() // world`` threads, so both runs use the
same cores. Times are the medians of ``--repeats`` runs, measured inside the processes from a barrier before the
call to its end (process start-up, imports and one warm-up fit excluded). On a machine with 2 cores, two processes
cannot be much faster than one process with 2 threads at the same matrix products: the ratio shows what the
collectives, the per-rank store parts and the merge cost against what splitting the Python-side work of the passes
(hooks, autograd, the store's writes) gains, not a parallel speed-up; with one core per rank and more cores than
ranks, the passes divide by the number of ranks and the all-reduce of the statistics (one buffer per pass) is the
only added cost.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import hookinf


def batches(n: int, rank: int, world: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Rank ``rank``'s shard (every ``world``-th batch) of the same ``n`` examples."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 256, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    ids = torch.arange(n)
    starts = range(0, n, 128)
    return [(x[s : s + 128], y[s : s + 128], ids[s : s + 128]) for k, s in enumerate(starts) if k % world == rank]


def model() -> nn.Module:
    """The MLP, seeded (the same weights in every process)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Per-example cross-entropy."""
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def run(rank: int, world: int, port: int, n: int, repeats: int, threads: int, out: Path) -> None:
    """One process of a run: times ``fit`` and ``log`` ``repeats`` times, rank 0 writes the medians."""
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))  # fmt: skip
    net, data = model(), batches(n, rank, world)
    hookinf.fit(net, data[:1], loss_fn, method="ekfac", progress=False)  # warm-up (lazy imports, first calls)
    times: dict[str, list[float]] = {"fit": [], "log": []}
    for k in range(repeats):
        for what in times:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            if what == "fit":
                hookinf.fit(net, data, loss_fn, method="ekfac", progress=False)
            else:
                hookinf.log(net, data, loss_fn, compress=hookinf.LoGra(16, 16), path=out / f"store-{world}-{k}",
                            ids=lambda batch: batch[2], overwrite=True, progress=False)  # fmt: skip
            if world > 1:
                dist.barrier()
            times[what].append(time.perf_counter() - start)
    if rank == 0:
        (out / f"times-{world}.txt").write_text(" ".join(f"{statistics.median(v)!r}" for v in times.values()))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, n: int, repeats: int, out: Path) -> tuple[float, float]:
    """Median (fit, log) seconds of ``world`` processes splitting the machine's threads."""
    threads = max(1, torch.get_num_threads() // world)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(run, args=(world, port, n, repeats, threads, out), nprocs=world, start_method="spawn")
    fit, log = (float(v) for v in (out / f"times-{world}.txt").read_text().split())
    return fit, log


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs both configurations and prints the table (fit and log seconds, and the 2-process ÷ 1-process ratio)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,048 examples, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    n, repeats = (2048, 1) if args.quick else (8192, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        one = measure(1, n, repeats, Path(tmp))
        two = measure(2, n, repeats, Path(tmp))
    print(f"{n} examples, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} (split between the ranks)")
    print(f"{'':6} {'1 process':>10} {'2 gloo':>10} {'2 ÷ 1':>7}")
    results = {}
    for label, a, b in (("fit", one[0], two[0]), ("log", one[1], two[1])):
        print(f"{label:6} {a:9.2f}s {b:9.2f}s {b / a:7.2f}")
        results[label] = b / a
    return results


if __name__ == "__main__":
    main()
