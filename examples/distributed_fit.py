"""hookinf.fit, hookinf.log and hookinf.top_k on every rank of a torchrun job (CPU, gloo), checked against one process.

    torchrun --nproc-per-node 2 examples/distributed_fit.py [--store DIR] [--epochs N]

Every rank trains the same DDP-wrapped MLP on its ``DistributedSampler`` shard of scikit-learn's digits for a few
epochs, then calls ``hookinf.fit`` (EK-FAC) and ``hookinf.log`` with its own shard: the statistics are all-reduced,
every rank gets the same curvature, and the ranks' parts of the gradient store are merged by rank 0. Then every rank
ranks the training digits for the same 16 queries with ``hookinf.top_k``: from the store (each rank scores its block
of the store's rows, with an exact curvature fitted over the store across the ranks) and from its shard (with the
EK-FAC curvature); the ranks gather only their top 5 per query. Rank 0 checks the contract against one process
(``group=None``) over the concatenated shards — including the example that ``DistributedSampler`` repeats to pad the
last shard (1,797 digits on 2 ranks: 899 + 899) — that the store holds every id once, and that both top-k are one
process's. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import hookinf


def dataset() -> TensorDataset:
    """Digits as float64 features in [0, 1], labels, and each example's index (its id in the store)."""
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float64) / 16
    return TensorDataset(x, torch.tensor(labels), torch.arange(len(x)))


def loss_fn(model: nn.Module, batch: list[Tensor]) -> Tensor:
    """Per-example cross-entropy."""
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def same_top_k(got: hookinf.Retrieved, want: hookinf.Retrieved, examples: Tensor) -> bool:
    """The same training examples per query (``examples[column]``, their dataset indices), scores within 1e-6.

    Compared by dataset index: the example ``DistributedSampler`` repeats is two columns with the same score up to
    rounding, which one process and two ranks may order either way.
    """
    scale = max(float(want.harmful_scores.abs().max()), float(want.helpful_scores.abs().max()))
    return (
        torch.equal(examples[got.harmful], examples[want.harmful])
        and torch.equal(examples[got.helpful], examples[want.helpful])
        and float((got.harmful_scores - want.harmful_scores).abs().max()) <= 1e-6 * scale
        and float((got.helpful_scores - want.helpful_scores).abs().max()) <= 1e-6 * scale
    )


def main(argv: list[str] | None = None) -> float:
    """Runs on one rank of the job; returns the largest relative difference to one process (rank 0; 0 elsewhere)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=None, help="gradient store directory (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    # a rank that fails makes the others fail within this timeout at worst (at once when it raises)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        data = dataset()
        sampler = DistributedSampler(data, shuffle=False)  # rank r: examples r, r + world, ... (padded)
        shard = DataLoader(data, batch_size=64, sampler=sampler)
        model = nn.parallel.DistributedDataParallel(
            nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(args.epochs):
            for batch in shard:
                optimizer.zero_grad()
                loss_fn(model, batch).mean().backward()
                optimizer.step()

        curvature = hookinf.fit(model, shard, loss_fn, method="ekfac", progress=False)  # every rank: the same
        store_dir = args.store or Path(tempfile.gettempdir()) / "hookinf-distributed-example"
        store = hookinf.log(model, shard, loss_fn, compress=hookinf.LoGra(8, 8), path=store_dir,
                            ids=lambda batch: batch[2], overwrite=True, progress=False)  # fmt: skip
        queries = [data[:16]]  # the same queries on every rank
        from_store = hookinf.top_k(model, store, queries, loss_fn, k=5, method="exact", progress=False)
        from_shards = hookinf.top_k(model, shard, queries, loss_fn, k=5, method=curvature, progress=False)
        worst = 0.0
        if rank == 0:  # the contract, checked against one process over every rank's shard
            everything = [
                data[list(DistributedSampler(data, num_replicas=world, rank=r, shuffle=False))] for r in range(world)
            ]
            batches = [[torch.cat(parts) for parts in zip(*everything, strict=True)]]
            single = hookinf.fit(model.module, batches, loss_fn, method="ekfac", progress=False, group=None)
            for name, shape in single.layers.items():
                grads = torch.randn(4, shape.out_features, shape.in_features, dtype=torch.float64)
                want = single.apply(name, grads)
                diff = float((curvature.apply(name, grads) - want).abs().max() / want.abs().max())
                worst = max(worst, diff)
            print(f"{world} ranks: {curvature.num_examples} examples (with the sampler's padding), layers "
                  f"{list(curvature.layers)}; largest relative difference to one process: {worst:.1e}")  # fmt: skip
            ids = sorted(store.ids.tolist())
            print(f"store {store_dir}: {len(store)} examples, every id once: {ids == list(range(len(data)))}")
            single = hookinf.top_k(model.module, store, queries, loss_fn, k=5, method="exact", progress=False,
                                   group=None)  # fmt: skip
            same = same_top_k(from_store, single, store.ids.sort().values)  # columns: the ids in order
            single = hookinf.top_k(model.module, batches, queries, loss_fn, k=5, method=curvature, progress=False,
                                   group=None)  # fmt: skip
            same &= same_top_k(from_shards, single, batches[0][2])  # columns: the shards' examples in rank order
            print(f"top-k across the ranks, from the store and from the shards: the same as one process: {same}")
            shown = batches[0][2][from_shards.harmful[0]].tolist()  # columns of the shards → dataset indices
            print(f"query 0 (a {int(data[0][1])}): most harmful training digits {from_store.harmful_ids[0].tolist()} "
                  f"(store, exact in LoGra space), {shown} (shards, EK-FAC)")  # fmt: skip
            if worst > 1e-6 or ids != list(range(len(data))) or not same:
                sys.exit(1)
            curvature.save(store_dir.parent / "hookinf-distributed-curvature")  # save is local: on one rank
        return worst
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
