"""hookinf.fit and hookinf.log on every rank of a torchrun job (CPU, gloo), checked against one process.

    torchrun --nproc-per-node 2 examples/distributed_fit.py [--store DIR] [--epochs N]

Every rank trains the same DDP-wrapped MLP on its ``DistributedSampler`` shard of scikit-learn's digits for a few
epochs, then calls ``hookinf.fit`` (EK-FAC) and ``hookinf.log`` with its own shard: the statistics are all-reduced,
every rank gets the same curvature, and the ranks' parts of the gradient store are merged by rank 0. Rank 0 then
checks the contract against one process (``group=None``) over the concatenated shards — including the example that
``DistributedSampler`` repeats to pad the last shard (1,797 digits on 2 ranks: 899 + 899) — and that the store holds
every id once. Exits non-zero when a check fails.
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
            if worst > 1e-6 or ids != list(range(len(data))):
                sys.exit(1)
            curvature.save(store_dir.parent / "hookinf-distributed-curvature")  # save is local: on one rank
        return worst
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
