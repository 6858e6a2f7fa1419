"""``HookinfCallback`` under a real DDP ``transformers.Trainer`` on two spawned gloo ranks (CPU).

Each rank runs the Trainer as ``torchrun`` would start it (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; accelerate uses
the process group the harness initialised): a tiny float64 MLP, 20 examples (a ``DistributedSampler`` gives each
rank 10, with no padding), ``learning_rate=0`` so the weights stay those of one model, two epochs with the last one
captured. The references are one process's ``hookinf.log`` and ``hookinf.fit`` over the same 20 examples: the
store and the K-FAC statistics are sums of the same per-example float64 terms grouped otherwise, equal up to
rounding (1e-10 of the largest entry still catches a missing or doubled example, or a wrong loss scale, by orders
of magnitude).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import close
from distributed_harness import WORLD, error, spawn
from torch import Tensor, nn
from torch.utils.data import DataLoader

import hookinf
from hookinf.store_parts import part_path

transformers = pytest.importorskip("transformers")

from hookinf.integrations import HookinfCallback, ModelLoss  # noqa: E402  (after the skip: imports transformers)

N, FEATURES, CLASSES = 20, 4, 3
FULL = hookinf.Dropout(keep=1.0, seed=3)  # keeps every gradient entry: the store holds the full gradients
TOL = 1e-10


class Tiny(nn.Module):
    """A float64 MLP returning the mean cross-entropy of its batch (a ``forward`` without ``**kwargs``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 6), nn.Tanh(), nn.Linear(6, CLASSES)).double()

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.net(x.double())
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def dataset() -> list[dict[str, Any]]:
    """``N`` rows with ids ``100 + 7 i`` (not positions)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, FEATURES, generator=gen, dtype=torch.float64), torch.randint(0, CLASSES, (N,), generator=gen)
    return [{"x": x[i].tolist(), "labels": int(y[i]), "idx": 100 + 7 * i} for i in range(N)]


def _train(callback: HookinfCallback, out: Path, batch: int = 5) -> None:
    """Two epochs at ``learning_rate=0``; each rank's 10 examples in micro-batches of ``batch``, two per step."""
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=batch, gradient_accumulation_steps=2,
        num_train_epochs=2, learning_rate=0.0, remove_unused_columns=False, report_to=[], use_cpu=True,
        ddp_backend="gloo", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=Tiny(), args=args, train_dataset=dataset(), data_collator=transformers.default_data_collator,
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()


def _worker(rank: int, out: Path) -> None:
    """Every check in one spawned run (transformers is imported once per rank); what each rank saw goes to JSON."""
    for key, value in {"RANK": rank, "WORLD_SIZE": WORLD, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": WORLD}.items():
        os.environ[key] = str(value)  # as torchrun sets them: the Trainer trains on the initialised process group
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    seen: dict[str, Any] = {}
    callback = HookinfCallback(fit="kfac", save_to=out / "kfac", log_to=out / "grads", compress=FULL, flush_every=2)
    _train(callback, out)
    assert callback.store is not None
    assert callback.curvature is not None
    seen["store"] = str(callback.store.path)
    seen["ids"] = sorted(callback.store.ids.tolist())
    callback.curvature.save(out / f"kfac-{rank}")  # every rank holds the summed curvature

    try:  # group=None under distributed training: refused before anything is captured
        _train(HookinfCallback(log_to=out / "local", compress=FULL, group=None), out)
    except hookinf.ConfigurationError as err:
        seen["local"] = str(err)
    try:  # 20 examples in micro-batches of 3 on 2 ranks: accelerate would repeat examples to fill the last batches
        _train(HookinfCallback(log_to=out / "padded", compress=FULL), out, batch=3)
    except hookinf.ConfigurationError as err:
        seen["padded"] = str(err)

    if rank == 1:  # closing rank 1's store at the end of the epoch fails
        original = hookinf.logger.GradientLogger.close

        def broken(self: Any) -> None:
            original(self)
            raise OSError("rank 1's disk is full")

        hookinf.logger.GradientLogger.close = broken  # type: ignore[method-assign]
    try:
        _train(HookinfCallback(log_to=out / "failed", compress=FULL, flush_every=2), out)
    except (OSError, hookinf.DistributedError) as err:
        seen["failed"] = f"{type(err).__name__}: {err}"
    (out / f"seen-{rank}.json").write_text(json.dumps(seen))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trainer")
    codes = spawn(_worker, out)
    assert codes == {0: 0, 1: 0}, (codes, error(out, 0), error(out, 1))
    return out


def _seen(out: Path, rank: int) -> dict[str, Any]:
    return dict(json.loads((out / f"seen-{rank}.json").read_text()))


def _loader() -> DataLoader:
    return DataLoader(dataset(), batch_size=4, collate_fn=transformers.default_data_collator)


def _by_id(store: hookinf.GradientStore) -> tuple[list[int], dict[str, Tensor]]:
    ids, chunks = [], []
    for chunk_ids, chunk in store.chunks():
        ids.append(chunk_ids)
        chunks.append(chunk)
    all_ids = torch.cat(ids)
    order = torch.argsort(all_ids)
    return all_ids[order].tolist(), {name: torch.cat([c[name] for c in chunks])[order] for name in chunks[0]}


def test_two_ranks_log_one_merged_store_equal_to_one_process(run: Path, tmp_path: Path) -> None:
    expected_ids = [100 + 7 * i for i in range(N)]
    for rank in range(WORLD):
        seen = _seen(run, rank)
        assert seen["store"] == str(run / "grads")  # after the epoch, every rank's store is the merged one
        assert seen["ids"] == expected_ids
        assert part_path(run / "grads", rank).is_dir()  # each rank logged its part; the merge keeps its shards
    store = hookinf.GradientStore(run / "grads")
    assert store.manifest.merged
    assert store.verify().examples == len(store) == N
    reference = hookinf.log(
        Tiny(), _loader(), ModelLoss(), compress=FULL, path=tmp_path / "ref", ids=ModelLoss().ids, progress=False,
        group=None,
    )  # fmt: skip
    ids, grads = _by_id(store)
    ref_ids, ref_grads = _by_id(reference)
    assert ids == ref_ids == expected_ids  # every id once
    for layer, want in ref_grads.items():
        assert bool(want.abs().max() > 0), layer
        close(grads[layer], want, TOL, f"stored gradients of {layer!r}")


def test_two_ranks_sum_the_curvature_and_rank_0_saves_it(run: Path) -> None:
    reference = hookinf.fit(Tiny(), _loader(), ModelLoss(), method="kfac", compress=FULL, progress=False, group=None)
    saved = [hookinf.load(run / name) for name in ("kfac", "kfac-0", "kfac-1")]
    for curvature in saved:
        assert curvature.num_examples == reference.num_examples == N
        assert set(curvature.tensors) == set(reference.tensors)
        for key, value in reference.tensors.items():
            close(curvature.tensors[key], value, TOL, key)


def test_group_none_and_repeated_examples_are_refused_under_distributed_training(run: Path) -> None:
    for rank in range(WORLD):
        seen = _seen(run, rank)
        assert "the Trainer trains on 2 process(es), but the callback's group= has 1 rank(s)" in seen["local"]
        assert "20 training examples are not a multiple of 2 ranks × per_device_train_batch_size=3" in seen["padded"]


def test_a_rank_failing_at_the_epochs_end_raises_distributed_error_on_the_other(run: Path) -> None:
    assert _seen(run, 1)["failed"].startswith("OSError: rank 1's disk is full")
    mine = _seen(run, 0)["failed"]
    assert mine.startswith("DistributedError"), mine
    assert "rank 1 of 2 failed before the end of logging" in mine, mine
    store = hookinf.GradientStore(run / "failed")  # nothing merged; every flushed shard kept, and it opens
    assert not store.manifest.merged
    assert sorted(store.ids.tolist()) == [100 + 7 * i for i in range(N)]
