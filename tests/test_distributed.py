"""hookinf.fit, hookinf.log and hookinf.watch on two gloo processes (spawned from here, bounded in time) against one
process.

Each spawned run starts two ranks on CPU, each with its own shard of the same 21 examples: rank 0 three batches
(5, 5, 3 examples), rank 1 two (4, 4) whose last repeats example 0 — the padding ``DistributedSampler`` adds. The
oracle is one process over the concatenated shards (for fit, the repeat included: fit uses the shards as given; for
the store, every id once). A rank's results are saved under the test's directory and compared here. The user's own
loop inside ``hookinf.watch(log_to=...)`` runs in a third spawned run (:func:`_watch_job`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from distributed_harness import SHARDS
from distributed_harness import batches as _batches
from distributed_harness import error as _error
from distributed_harness import ids as _ids
from distributed_harness import loss as _loss
from distributed_harness import model as _model
from distributed_harness import spawn as _spawn
from torch import Tensor, nn

import hookinf
from hookinf.losses import pass_seed
from hookinf.store_parts import part_path
from hookinf.weights import weights_hash

METHODS = ("kfac", "ekfac", "exact", "identity")
COMPRESS = hookinf.LoGra(2, 2)
WATCH_COMPRESS = hookinf.LoGra(4, 4)


def _sampled_loss() -> hookinf.CrossEntropy:
    return hookinf.CrossEntropy(logits=lambda model, batch: model(batch[0]), target=lambda batch: batch[1])


# ---------------------------------------------------------------------------------------------- workers
def _fit_and_log(rank: int, out: Path) -> None:
    model, batches = _model(), _batches(SHARDS[rank])
    for method in METHODS:
        curvature = hookinf.fit(model, batches, _loss, method=method, progress=False)
        curvature.save(out / f"{method}-{rank}")
    compressed = hookinf.fit(model, batches, _loss, method="ekfac", compress=COMPRESS, progress=False)
    compressed.save(out / f"ekfac-logra-{rank}")
    sampled = hookinf.fit(model, batches, _sampled_loss(), method="kfac", fisher="sampled", progress=False)
    sampled.save(out / f"sampled-{rank}")
    ddp = nn.parallel.DistributedDataParallel(model)
    wrapped = hookinf.fit(ddp, batches, _loss, method="kfac", progress=False)
    torch.save(list(wrapped.layers), out / f"ddp-layers-{rank}.pt")
    hookinf.log(model, batches, _loss, compress=COMPRESS, path=out / "store", ids=_ids, flush_every=4, progress=False)


def _die_while_logging(rank: int, out: Path) -> None:
    calls = 0

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        nonlocal calls
        calls += 1
        if rank == 1 and calls == 2:
            time.sleep(0.5)  # the first batch's shard is written by then
            os._exit(7)  # killed: no clean-up, no goodbye to rank 0
        return _loss(model, batch)

    hookinf.log(_model(), _batches(SHARDS[rank]), loss, compress=COMPRESS, path=out / "died", ids=_ids,
                flush_every=1, progress=False)  # fmt: skip


def _resume_then_raise(rank: int, out: Path) -> None:
    model = _model()
    hookinf.log(model, _batches(SHARDS[rank]), _loss, compress=COMPRESS, path=out / "died", ids=_ids, progress=False)

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        if rank == 1:
            raise ValueError("rank 1's loss fails")
        return _loss(model, batch)

    start = time.monotonic()
    try:
        hookinf.fit(model, _batches(SHARDS[rank]), loss, method="ekfac", progress=False)
    finally:
        (out / f"seconds-{rank}.txt").write_text(f"{time.monotonic() - start}")


def _everything(rank: int, out: Path) -> None:
    _fit_and_log(rank, out)
    _resume_then_raise(rank, out)


def _loop(w: hookinf.LoopWatch, model: nn.Module, shard: list[list[int]], fail_at: int | None = None) -> None:
    """The user's loop: tags each batch, then a mean loss's backward (``fail_at``: raise before that batch)."""
    for index, (x, y, idx) in enumerate(_batches(shard)):
        if index == fail_at:
            raise ValueError("rank 1's loop fails")
        w.tag(idx)
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()


def _watch_job(rank: int, out: Path) -> None:
    """Every ``watch(log_to=..., group="auto")`` check, in one spawned run; what each rank saw goes to a JSON file."""
    seen: dict[str, object] = {}
    shard = SHARDS[rank]
    model = _model()
    w = hookinf.watch(model, log_to=out / "watched", compress=WATCH_COMPRESS, flush_every=2, group="auto")
    with w:  # epoch 1: the first batch of each shard
        seen["inside"] = str(w.store.path)
        _loop(w, model, shard[:1])
    seen["after_first"] = sorted(w.store.ids.tolist())  # merged at the exit: both ranks' first batches
    with w:  # epoch 2: the whole shard; the ids stored anywhere (rank 1's repeat of id 0 too) are skipped
        _loop(w, model, shard)
    seen["after"] = str(w.store.path)

    trained = _model()  # its weights move between the two entries (a training loop), the same on both ranks
    w = hookinf.watch(trained, log_to=out / "trained", compress=WATCH_COMPRESS, group="auto")
    with w:
        _loop(w, trained, shard[:1])
    for _ in range(2):  # entry 2 logs the rest at new weights; entry 3 nothing new, at newer ones
        with torch.no_grad():
            for param in trained.parameters():
                param.mul_(1.5)
        with w:
            _loop(w, trained, shard)
    seen["trained_hash"] = weights_hash(list(trained.parameters()))

    w = hookinf.watch(model, log_to=out / "failed", compress=WATCH_COMPRESS, flush_every=1, group="auto")
    start = time.monotonic()
    try:
        with w:
            _loop(w, model, shard, fail_at=1 if rank == 1 else None)
    except (ValueError, hookinf.DistributedError) as err:
        seen["error"] = f"{type(err).__name__}: {err}"
    seen["seconds"] = time.monotonic() - start
    left = hookinf.GradientStore(out / "failed")  # both parts are closed once the ranks met
    seen["left_ids"] = sorted(left.ids.tolist())
    seen["left_merged"] = (out / "failed" / "manifest.json").exists()
    w = hookinf.watch(model, log_to=out / "failed", compress=WATCH_COMPRESS, group="auto")  # a second run resumes
    with w:
        _loop(w, model, shard)
    (out / f"watch-{rank}.json").write_text(json.dumps(seen))


# ---------------------------------------------------------------------------------------------- tests
def _single(method: str, **options: object) -> hookinf.Curvature:
    batches = _batches(SHARDS[0] + SHARDS[1])
    return hookinf.fit(_model(), batches, _loss, method=method, progress=False, group=None, **options)  # type: ignore[arg-type]


def _check_curvature(got: hookinf.Curvature, want: hookinf.Curvature, what: str) -> None:
    assert got.num_examples == want.num_examples == 21, what
    for name, shape in want.layers.items():
        grads = torch.randn(3, shape.out_features, shape.in_features, dtype=torch.float64)
        assert_close(got.apply(name, grads), want.apply(name, grads), rtol=1e-6, atol=1e-9, what=f"{what} {name}")
        for key, value in want.state[name].tensors().items():
            if key not in ("QA", "QS"):  # eigenvectors: equal up to sign, compared through apply
                assert_close(got.stat(name, key), value, rtol=1e-6, atol=1e-9, what=f"{what} {name}/{key}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two spawned runs: rank 1 killed while logging (the store is copied as it was left); then, on the same ranks,
    every fit and log of the tests, the logging of the killed run resumed, and a fit in which rank 1 raises."""
    out = tmp_path_factory.mktemp("dist")
    codes = _spawn(_die_while_logging, out)
    assert codes[1] == 7, codes
    assert codes[0] != 0, (codes, _error(out, 0))
    (out / "died-error-0.txt").write_text(_error(out, 0))
    shutil.copytree(out / "died", out / "unmerged")
    (out / "error-0.txt").unlink()
    codes = _spawn(_everything, out)
    assert codes == {0: 1, 1: 1}, (codes, _error(out, 0), _error(out, 1))
    return out


def test_fit_on_two_ranks_equals_one_process_over_the_shards(runs: Path) -> None:
    for method in METHODS:
        mine, theirs = hookinf.load(runs / f"{method}-0"), hookinf.load(runs / f"{method}-1")
        for key, value in mine.tensors.items():  # every rank returns the same curvature, bit for bit
            assert torch.equal(value, theirs.tensors[key]), (method, key)
        if method == "identity":
            assert mine.method == "identity"
            assert theirs.num_examples == mine.num_examples
            continue
        _check_curvature(mine, _single(method), method)
    compressed = hookinf.load(runs / "ekfac-logra-0")
    _check_curvature(compressed, _single("ekfac", compress=COMPRESS), "ekfac with LoGra")


def test_sampled_fisher_draws_differ_per_rank(runs: Path) -> None:
    mine, theirs = hookinf.load(runs / "sampled-0"), hookinf.load(runs / "sampled-1")
    for key, value in mine.tensors.items():
        assert torch.equal(value, theirs.tensors[key]), key
    assert pass_seed(0, 0, rank=0) == pass_seed(0, 0) != pass_seed(0, 0, rank=1) != pass_seed(0, 1, rank=1)
    # rank 0 draws what one process draws over its shard; rank 1 its own labels: the sum is not one process's
    single = hookinf.fit(_model(), _batches(SHARDS[0] + SHARDS[1]), _sampled_loss(), method="kfac",
                         fisher="sampled", progress=False)  # fmt: skip
    assert not torch.allclose(mine.stat("2", "S"), single.stat("2", "S"))


def test_ddp_wrapped_model_is_tracked_inside(runs: Path) -> None:
    assert torch.load(runs / "ddp-layers-0.pt") == ["0", "2"]


def test_log_from_two_ranks_gives_one_store_with_every_id_once(runs: Path, tmp_path: Path) -> None:
    store = hookinf.GradientStore(runs / "store")
    check = store.verify()
    assert check.examples == len(store) == 20
    assert sorted(store.ids.tolist()) == list(range(20))
    assert any(s.file.startswith("rank-00001/") for s in store.shards)
    assert store.manifest.merged
    single = hookinf.log(_model(), _batches(SHARDS[0] + SHARDS[1][:1] + [[17, 18, 19]]), _loss, compress=COMPRESS,
                         path=tmp_path / "single", ids=_ids, progress=False)  # fmt: skip
    got, want = _by_id(store), _by_id(single)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-6, atol=1e-12, what=f"stored gradients of {name}")
    query = _batches([[3, 7]])
    curvature = hookinf.load(runs / "ekfac-logra-0")
    scores = hookinf.influence(_model(), store, query, _loss, method=curvature, progress=False)
    oracle = hookinf.influence(_model(), single, query, _loss, method=curvature, progress=False)
    assert_close(scores.total, oracle.total, rtol=1e-6, atol=1e-12, what="scores from the merged store")


def _by_id(store: hookinf.GradientStore) -> dict[str, Tensor]:
    parts: dict[str, list[Tensor]] = {}
    ids = []
    for chunk_ids, grads in store.chunks():
        ids.append(chunk_ids)
        for name, value in grads.items():
            parts.setdefault(name, []).append(value)
    order = torch.cat(ids).argsort()
    return {name: torch.cat(values)[order] for name, values in parts.items()}


def test_a_rank_that_dies_while_logging_stops_the_other_and_leaves_a_store_that_opens_and_scores(runs: Path) -> None:
    error = (runs / "died-error-0.txt").read_text()
    assert error.startswith("DistributedError"), error
    assert "another rank died" in error, error
    unmerged = hookinf.GradientStore(runs / "unmerged")  # no merge ran: the parts are read as they are
    assert not (runs / "unmerged" / "manifest.json").exists()
    assert part_path(runs / "unmerged", 1).is_dir()
    held = set(unmerged.ids.tolist())
    assert {13, 14, 15, 16} <= held
    assert not held & {17, 18, 19}
    scores = hookinf.self_influence(_model(), unmerged, _loss, method="identity", progress=False)
    assert scores.total.shape == (len(held),)


def test_the_store_of_a_dead_rank_resumes_to_every_id_once(runs: Path) -> None:
    store = hookinf.GradientStore(runs / "died")
    assert store.verify().examples == 20
    assert sorted(store.ids.tolist()) == list(range(20))
    assert (runs / "died" / "manifest.json").exists()


def test_a_rank_that_raises_makes_the_other_fail_at_once(runs: Path) -> None:
    assert "ValueError: rank 1's loss fails" in _error(runs, 1)
    error = _error(runs, 0)
    assert error.startswith("DistributedError"), error
    assert "rank 1 of 2 failed" in error, error
    assert float((runs / "seconds-0.txt").read_text()) < 10


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One spawned run of :func:`_watch_job` (both ranks finish: the failure is caught inside)."""
    out = tmp_path_factory.mktemp("watch")
    codes = _spawn(_watch_job, out)
    assert codes == {0: 0, 1: 0}, (codes, _error(out, 0), _error(out, 1))
    return out


def _seen(out: Path, rank: int) -> dict[str, object]:
    return dict(json.loads((out / f"watch-{rank}.json").read_text()))


def _single_store(path: Path) -> hookinf.GradientStore:
    """One process's hookinf.log over every id once (rank 1's repeat of id 0 left out)."""
    data = _batches(SHARDS[0] + SHARDS[1][:1] + [[17, 18, 19]])
    return hookinf.log(_model(), data, _loss, compress=WATCH_COMPRESS, path=path, ids=_ids, progress=False)


def _assert_whole(store: hookinf.GradientStore, single: hookinf.GradientStore, what: str) -> None:
    assert store.verify().examples == len(store) == 20, what
    assert sorted(store.ids.tolist()) == list(range(20)), what
    got, want = _by_id(store), _by_id(single)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-6, atol=1e-12, what=f"{what}: stored gradients of {name}")


def test_watch_on_two_ranks_logs_one_store_equal_to_one_process(watched: Path, tmp_path: Path) -> None:
    for rank in (0, 1):
        seen = _seen(watched, rank)
        assert seen["inside"] == str(part_path(watched / "watched", rank))  # inside the block: this rank's part
        assert seen["after"] == str(watched / "watched")  # after it: the merged store
        assert seen["after_first"] == [0, 1, 2, 3, 4, 13, 14, 15, 16]
    store = hookinf.GradientStore(watched / "watched")
    assert store.manifest.merged
    assert all(s.file.startswith("rank-") for s in store.shards)
    _assert_whole(store, _single_store(tmp_path / "single"), "two entries on two ranks")


def test_watch_on_two_ranks_records_the_weights_its_loop_ended_at(watched: Path) -> None:
    store = hookinf.GradientStore(watched / "trained")
    assert sorted(store.ids.tolist()) == list(range(20))
    assert store.manifest.weights is not None
    final = _seen(watched, 0)["trained_hash"]
    assert final == _seen(watched, 1)["trained_hash"] == store.manifest.weights.hash
    store.check_weights(str(final))  # scoring with the model the loop ended at is accepted
    with pytest.raises(hookinf.StoreError, match="other weights"):
        store.check_weights(weights_hash(list(_model().parameters())))


def test_a_rank_raising_inside_watch_stops_the_other_and_the_store_resumes(watched: Path, tmp_path: Path) -> None:
    mine, theirs = _seen(watched, 0), _seen(watched, 1)
    assert str(theirs["error"]).startswith("ValueError: rank 1's loop fails"), theirs
    assert str(mine["error"]).startswith("DistributedError"), mine
    assert "rank 1 of 2 failed before the end of logging" in str(mine["error"]), mine
    assert float(str(mine["seconds"])) < 10
    for seen in (mine, theirs):  # nothing merged; every flushed shard kept: rank 0's shard and rank 1's first batch
        assert seen["left_merged"] is False
        assert seen["left_ids"] == list(range(17))
    _assert_whole(hookinf.GradientStore(watched / "failed"), _single_store(tmp_path / "single"), "resumed")


def test_an_uninitialised_group_and_group_none_stay_local() -> None:
    from hookinf.distributed import resolve_ranks

    assert resolve_ranks("auto") is None
    assert resolve_ranks(None) is None
    with pytest.raises(hookinf.ConfigurationError, match="group="):
        resolve_ranks("all")  # type: ignore[arg-type]
