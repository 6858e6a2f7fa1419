"""Distributed benchmark: hookinf.fit and hookinf.log on one process vs two gloo processes, on the same data.

    .venv/bin/python benchmarks/distributed.py [--quick] [--repeats N]   (writes benchmarks/results/distributed.md)

The data (an MLP 256-512-512-10, float32, N examples in batches of 128) is fitted (EK-FAC: two passes, the
correction replayed from the cached first pass) and logged (LoGra(16, 16)) once by one process over all of it, and
once by two processes (torch.multiprocessing spawn, gloo on CPU), each over half of it, with the all-reduces and the
merge of the store included. Each process uses ``torch.get_num_threads() // world`` threads, so both runs use the
same cores. Times are the medians of ``--repeats`` runs, measured inside the processes from a barrier before the
call to its end (process start-up, imports and one warm-up fit excluded). A third run, one process with one thread,
is the baseline for the parallel speed-up of two ranks with a core each. On a machine with 2 cores, two processes
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
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _report import Report, Section
from rich.console import Console
from torch import Tensor, nn
from torch.multiprocessing.spawn import spawn

import hookinf

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.md"


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


def measure(world: int, n: int, repeats: int, out: Path, threads: int) -> tuple[float, float]:
    """Median (fit, log) seconds of ``world`` processes with ``threads`` torch threads each."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spawn(run, args=(world, port, n, repeats, threads, out), nprocs=world, start_method="spawn")
    fit, log = (float(v) for v in (out / f"times-{world}.txt").read_text().split())
    (out / f"times-{world}.txt").unlink()
    return fit, log


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the three configurations, prints the table and (unless ``--quick``) writes the results file.

    Returns the 2-process time ÷ each 1-process time, per call (``fit``, ``log``; ``*_one_thread`` against the
    1-thread process).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,048 examples, 1 repeat, no results file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    n, repeats = (2048, 1) if args.quick else (8192, args.repeats)
    threads = torch.get_num_threads()
    console = Console(width=max(150, Console().width))
    report = Report(console, "Distributed: one process against two gloo processes")
    report.run_header(__file__, argv or sys.argv[1:], None)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        one = measure(1, n, repeats, Path(tmp), threads)
        single = measure(1, n, repeats, Path(tmp), 1)
        two = measure(2, n, repeats, Path(tmp), max(1, threads // 2))
    section = Section(
        f"hookinf.fit (EK-FAC) and hookinf.log (LoGra(16, 16)): MLP 256-512-512-10, {n:,} examples in batches of "
        f"128, median of {repeats}",
        ["call", f"1 process, {threads} threads", "1 process, 1 thread", f"2 gloo processes, {max(1, threads // 2)} "
         "thread each", f"2 ÷ 1 ({threads} threads)", "2 ÷ 1 (1 thread)"],
    )  # fmt: skip
    results = {}
    for k, label in enumerate(("fit", "log")):
        section.rows.append(
            [label, f"{one[k]:.2f} s", f"{single[k]:.2f} s", f"{two[k]:.2f} s", f"{two[k] / one[k]:.2f}",
             f"{two[k] / single[k]:.2f}"]
        )  # fmt: skip
        results[label], results[f"{label}_one_thread"] = two[k] / one[k], two[k] / single[k]
    section.notes += [
        "Times inside the processes, from a barrier before the call to a barrier after it (start-up, imports and a "
        "warm-up fit excluded); the 2-process times include the all-reduces of the statistics, the shared "
        "eigenbases and the merge of the store's parts.",
        f"This machine has {os.cpu_count()} cores: 2 ÷ 1 against the 1-thread process is the parallel speed-up of "
        "splitting the data over 2 ranks with a core each (ideal 0.5); against the process that uses every core "
        "for its matrix products it is what the ranks' collectives and store parts cost or gain beside that.",
    ]
    report.add(section)
    report.line(f"total {time.perf_counter() - begin:.0f} s · load average at end {os.getloadavg()[0]:.2f}")
    if not args.quick:
        RESULTS.write_text(report.markdown(), encoding="utf-8")
        console.print(f"wrote {os.path.relpath(RESULTS)}")
    return results


if __name__ == "__main__":
    main()
