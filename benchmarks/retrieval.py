"""Retrieval at scale: streaming top-k vs the dense score matrix, and FAISS recall@10 vs exact streaming top-k.

    .venv/bin/python benchmarks/retrieval.py [--quick] [--threads 2]

Model: Linear(64, 32) with bias → tanh → Linear(32, 10); only the first layer is tracked and compressed with
``hookinf.LoGra(16, 16)``, so every stored gradient has ``r = 256`` entries (float32). Inputs are drawn from 64
Gaussian clusters (labels by cluster), so gradients have structure an index can exploit. 100 queries, ``k = 10``,
exact damped blocks (``hookinf.fit(..., method="exact")`` on the first 10,000 examples, damping 0.1). Stores are
logged with ``flush_every=4096`` (shards of 4,096 rows, the streaming chunk).

1. For ``n_train`` = 10k, 30k, 100k: seconds of ``hookinf.top_k(model, store, ...)`` (streaming) and of
   ``hookinf.influence(model, store, ...).top_k(10)`` (dense), best of 2; and the peak bytes of tensors alive at once
   during each call (a ``TorchDispatchMode`` that tracks every storage the call allocates, measured in a separate
   run: a CPU stand-in for ``torch.cuda.max_memory_allocated``). Both give the same entries (checked).
2. For the 100k store preconditioned once (``hookinf.precondition_store``, float32): a FAISS IVF inner-product index
   (``FaissIndex.build(kind="ivf")``, ``nlist = √n``) searched with several ``nprobe``; recall@10 = the share of
   the exact streaming top-10 (``hookinf.top_k`` on the preconditioned store) found, for the harmful and the
   helpful side; seconds per search of the 100 queries (best of 3) and the speed-up over the exact streaming top-k
   on the same preconditioned store (its query gradients included; they take < 1% of it) and over FAISS's exact
   flat index. A full run writes ``benchmarks/results/retrieval.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _memory import LiveBytes
from _report import Report, Section
from rich.console import Console
from torch import nn

import hookinf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "retrieval.md"
K = 10
N_QUERY = 100
CLUSTERS = 64


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval()


def data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    centres = torch.randn(CLUSTERS, 64, generator=torch.Generator().manual_seed(1)) * 2
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLUSTERS, (n,), generator=gen)
    x = centres[labels] + 0.5 * torch.randn(n, 64, generator=gen)
    y = labels % 10
    return [(x[i : i + 1024], y[i : i + 1024]) for i in range(0, n, 1024)]


def loss_fn(net: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(net(batch[0]), batch[1], reduction="none")


def best(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return min(times), out


def peak_mib(run: Callable[[], Any]) -> float:
    with LiveBytes() as live:
        run()
    return live.peak / 2**20


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True))
    return hits / exact.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k and 20k rows only, no results file")
    parser.add_argument("--threads", type=int, default=2, help="torch (and FAISS) threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [10_000, 20_000] if args.quick else [10_000, 30_000, 100_000]
    console = Console(width=max(150, Console().width))
    report = Report(console, "Retrieval at scale: streaming top-k and FAISS recall")
    report.run_header(__file__, sys.argv[1:], args.threads)
    begin = time.perf_counter()
    net, compress = model(), hookinf.LoGra(16, 16)
    common: dict[str, Any] = {"modules": "0", "progress": False}
    query = data(N_QUERY, seed=99)
    curvature = hookinf.fit(net, data(10_000, seed=0), loss_fn, method="exact", compress=compress, **common)
    section = Section(
        f"1. top-{K} of {N_QUERY} queries over n_train stored gradients (r = 256, float32, shards of 4,096)",
        ["n_train", "streaming s", "dense s", "streaming peak MiB", "dense peak MiB", "dense score matrix MiB"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = None
        for n in sizes:
            path = Path(tmp) / f"store-{n}"
            store = hookinf.log(net, data(n, seed=0), loss_fn, compress=compress, path=path, flush_every=4096, **common)
            ranked = {"k": K, "method": curvature, **common}

            def streaming(s: hookinf.GradientStore = store, r: dict[str, Any] = ranked) -> hookinf.Retrieved:
                return hookinf.top_k(net, s, query, loss_fn, **r)

            def dense(s: hookinf.GradientStore = store) -> hookinf.TopK:
                return hookinf.influence(net, s, query, loss_fn, method=curvature, **common).top_k(K)

            stream_s, got = best(streaming, 2)
            dense_s, expected = best(dense, 2)
            assert torch.equal(got.harmful, expected.harmful), "streaming and dense top-k differ"
            assert torch.equal(got.helpful, expected.helpful), "streaming and dense top-k differ"
            matrix = N_QUERY * n * 8 / 2**20  # float64 scores (exact curvature): the total alone
            stream_peak, dense_peak = peak_mib(streaming), peak_mib(dense)
            section.rows.append(
                [f"{n:,}", f"{stream_s:.2f}", f"{dense_s:.2f}", f"{stream_peak:.1f}", f"{dense_peak:.1f}",
                 f"{matrix:.1f}"]
            )  # fmt: skip
            console.print(section.rows[-1])
        section.notes.append(
            "peak MiB: tensors alive at once during the call (the store's memory-mapped shards not counted); the "
            "dense path holds the per-layer and total [n_query, n_train] float64 matrices, streaming "
            "[n_query, k + 4096] merges and the ids"
        )
        report.add(section)
        assert store is not None
        faiss_section(report, net, store, query, curvature, Path(tmp), common, args.threads)
    report.line(f"total {time.perf_counter() - begin:.0f} s · load average at end {os.getloadavg()[0]:.2f}")
    if not args.quick:
        RESULTS.write_text(report.markdown(), encoding="utf-8")
        console.print(f"wrote {os.path.relpath(RESULTS)}")


def faiss_section(
    report: Report,
    net: nn.Module,
    store: hookinf.GradientStore,
    query: list[Any],
    curvature: hookinf.Curvature,
    tmp: Path,
    common: dict[str, Any],
    threads: int,
) -> None:
    try:
        import faiss
    except ImportError:
        report.line("FAISS: not installed (pip install 'hookinf[faiss]'); section 2 skipped")
        return
    from hookinf.faiss_index import FaissIndex
    from hookinf.runner import Runner

    faiss.omp_set_num_threads(threads)
    n = len(store)
    start = time.perf_counter()
    pre = hookinf.precondition_store(store, curvature, tmp / "pre", dtype=torch.float32, progress=False)
    precondition_s = time.perf_counter() - start
    exact_s, exact = best(lambda: hookinf.top_k(net, pre, query, loss_fn, k=K, **common), 2)
    with Runner(net, loss_fn, modules="0", compress=hookinf.LoGra(16, 16), progress=False) as runner:
        raw = runner.query_gradients(query)
    vectors = torch.cat([raw[name].flatten(1) for name in pre.layers], dim=1)
    section = Section(
        f"2. FAISS on the {n:,}-row store preconditioned once ({precondition_s:.1f} s): recall@{K} vs exact "
        f"streaming top-{K} ({exact_s:.2f} s for {N_QUERY} queries)",
        ["index", "build s", "search s", "recall@10 harmful", "recall@10 helpful", "speed-up vs streaming"],
    )
    start = time.perf_counter()
    flat = FaissIndex.build(pre, kind="flat")
    build_flat = time.perf_counter() - start
    flat_s, found = best(lambda: flat.search(vectors, K), 3)
    section.rows.append(
        ["flat (exact)", f"{build_flat:.1f}", f"{flat_s:.4f}", f"{recall(found.harmful, exact.harmful):.3f}",
         f"{recall(found.helpful, exact.helpful):.3f}", f"{exact_s / flat_s:.2g}×"]
    )  # fmt: skip
    start = time.perf_counter()
    ivf = FaissIndex.build(pre, kind="ivf")
    build_ivf = time.perf_counter() - start
    for nprobe in (1, 4, 16, 64):
        ivf.index.nprobe = nprobe
        search_s, found = best(partial(ivf.search, vectors, K), 3)
        section.rows.append(
            [f"ivf nlist={ivf.index.nlist} nprobe={nprobe}", f"{build_ivf:.1f}", f"{search_s:.4f}",
             f"{recall(found.harmful, exact.harmful):.3f}", f"{recall(found.helpful, exact.helpful):.3f}",
             f"{exact_s / search_s:.2g}×"]
        )  # fmt: skip
        report.console.print(section.rows[-1])
    section.notes.append(
        "search s: FaissIndex.search of the 100 raw query vectors, harmful and helpful sides (two searches); "
        "speed-up: exact streaming top-k seconds ÷ search seconds"
    )
    report.add(section)


if __name__ == "__main__":
    main()
