"""Scoring across ranks (influence, self_influence, top_k) and watch(fit=...) in a user's DDP loop, on two gloo ranks.

One spawned run (two CPU ranks, :mod:`distributed_harness`) does every check's distributed side and saves what each rank
returned; the tests compare rank 0 with rank 1 (bit for bit: every rank must return the same result) and both with
one process over all the rows (``group=None``), within a relative 1e-6 in float64. Training data: each rank's
:data:`~distributed_harness.SHARDS` (one process: the shards concatenated in rank order). Stores: one logged from both
ranks and merged; one made of the two ranks' parts, never merged; one holding a single example (rank 0 has no row).
The run ends with a rank raising in the middle of scoring, twice.

The last test launches ``examples/distributed_fit.py`` under ``torchrun`` (``python -m torch.distributed.run``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import assert_close
from distributed_harness import SHARDS, Batch, batches, error, free_port, ids, loss, model, spawn
from torch import Tensor, nn

import hookinf
from hookinf.distributed import resolve_ranks
from hookinf.store_parts import part_path

QUERY = [[3, 7], [11, 2, 5]]  # the same query batches on every rank (example 17, which fails below, is not one)
K = 4
COMPRESS = hookinf.LoGra(2, 2)
PARTS = {0: SHARDS[0], 1: [[13, 14, 15, 16], [17, 18, 19]]}  # the unmerged store: every id once
LOOP = {0: [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]], 1: [[10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]}  # DDP: 2 steps each
CANDIDATES = torch.tensor(
    [[0, 4, 9, 10, 13, 19], [1, 2, 3, 12, 15, 18], [5, 6, 7, 8, 11, 14], [0, 1, 16, 17, 18, 19], [2, 4, 6, 8, 10, 12]]
)  # [n_query, 6] columns of the store (its ids: 0 ... 19)
ROOT = Path(__file__).resolve().parents[1]


def _top(result: hookinf.Retrieved) -> dict[str, Any]:
    return {
        "harmful": result.harmful, "harmful_scores": result.harmful_scores, "harmful_ids": result.harmful_ids,
        "helpful": result.helpful, "helpful_scores": result.helpful_scores, "helpful_ids": result.helpful_ids,
        "parts": {**{f"harmful/{n}": p for n, p in result.harmful_parts.items()},
                  **{f"helpful/{n}": p for n, p in result.helpful_parts.items()}},
        "n_train": result.n_train,
    }  # fmt: skip


def _scores(result: hookinf.Scores) -> dict[str, Any]:
    return {"per_layer": result.per_layer, "per_token": result.per_token, "ids": result.ids}


# ---------------------------------------------------------------------------------------------- the spawned run
def _score_everything(rank: int, out: Path) -> None:
    net, train, query = model(), batches(SHARDS[rank]), batches(QUERY)

    def save(name: str, value: object) -> None:
        torch.save(value, out / f"{name}-{rank}.pt")

    options: dict[str, Any] = {"progress": False}
    for method in ("exact", "ekfac"):  # fitted across the ranks inside the call, then scored
        save(f"influence-{method}", _scores(hookinf.influence(net, train, query, loss, method=method, **options)))
    curvature = hookinf.fit(net, train, loss, method="ekfac", **options)
    if rank == 0:
        curvature.save(out / "ekfac")
    save("tokens", _scores(hookinf.influence(net, train, query, loss, method=curvature, per_token=True, **options)))
    save("self-ekfac", hookinf.self_influence(net, train, loss, method=curvature, **options).per_layer)
    save("self-exact", hookinf.self_influence(net, train, loss, method="exact", **options).per_layer)
    save("top-data", _top(hookinf.top_k(net, train, query, loss, k=K, method="ekfac", **options)))

    merged = hookinf.log(net, train, loss, compress=COMPRESS, path=out / "merged", ids=ids, flush_every=3, **options)
    hookinf.log(net, batches(PARTS[rank]), loss, compress=COMPRESS, path=part_path(out / "parts", rank), ids=ids,
                flush_every=3, group=None, **options)  # fmt: skip
    if rank == 0:
        hookinf.log(net, batches([[6]]), loss, compress=COMPRESS, path=out / "one", ids=ids, group=None, **options)
    dist.barrier()  # every part and store is written
    compressed = hookinf.fit(net, train, loss, method="ekfac", compress=COMPRESS, **options)
    if rank == 0:
        compressed.save(out / "ekfac-logra")
    for name in ("merged", "parts", "one"):
        store = hookinf.GradientStore(out / name)
        save(f"top-{name}", _top(hookinf.top_k(net, store, query, loss, k=K, method=compressed, **options)))
        save(f"influence-{name}", _scores(hookinf.influence(net, store, query, loss, method="exact", **options)))
    save("self-merged", hookinf.self_influence(net, merged, loss, method="exact", **options).per_layer)
    top = hookinf.top_k(net, merged, query, loss, k=K, method=compressed, candidates=CANDIDATES, **options)
    save("top-candidates", _top(top))
    pre = hookinf.precondition_store(merged, compressed, out / "preconditioned", progress=False)  # rank 0 writes it
    save("preconditioned-ids", pre.ids)
    save("top-preconditioned", _top(hookinf.top_k(net, pre, query, loss, k=K, **options)))
    try:  # an uncompressed curvature for a compressed store: rank 0 refuses it, rank 1 hears of it
        hookinf.precondition_store(merged, curvature, out / "refused", progress=False)
    except (hookinf.CompressorMismatchError, hookinf.DistributedError) as err:
        save("precondition-failure", f"{type(err).__name__}: {err}")

    refusals = []
    for call in (
        lambda: hookinf.influence(net, train, query, loss, method="datainf", **options),
        lambda: hookinf.top_k(net, train, query, loss, k=K, candidates=CANDIDATES, **options),
    ):
        try:
            call()
        except hookinf.ConfigurationError as err:
            refusals.append(str(err))
    save("refusals", refusals)

    _watch_a_ddp_loop(rank, out)
    _gather_uneven(rank, out)
    _over_checkpoints(rank, out)

    def failing(net: nn.Module, batch: Batch) -> Tensor:
        if rank == 1 and 17 in batch[2].tolist():
            raise ValueError("rank 1's loss fails while scoring")
        return loss(net, batch)

    for name, call in (
        ("influence", lambda: hookinf.influence(net, train, query, failing, method=curvature, **options)),
        ("top_k", lambda: hookinf.top_k(net, train, query, failing, k=K, method=curvature, **options)),
    ):
        start = time.monotonic()
        try:
            call()
        except Exception as err:
            save(f"failed-{name}", (f"{type(err).__name__}: {err}", time.monotonic() - start))


def _watch_a_ddp_loop(rank: int, out: Path) -> None:
    net = model()
    ddp = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.0)  # fixed weights: the statistics of one model
    with hookinf.watch(ddp, fit="kfac") as watch:
        for x, y, _ in batches(LOOP[rank]):
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()  # the batch mean, as loss_reduction="mean" says
            optimizer.step()
        first = watch.curvature()
    again = watch.curvature()  # a second call sums the same steps once more, not the first sum
    torch.save([list(watch.layers), first.tensors, again.tensors], out / f"watch-{rank}.pt")
    if rank == 0:
        first.save(out / "watch")


def checkpoint_states() -> list[dict[str, Tensor]]:
    """Two checkpoints of the harness's model: its weights halved, and as they are."""
    return [{name: scale * value for name, value in model().state_dict().items()} for scale in (0.5, 1.0)]


def _over_checkpoints(rank: int, out: Path) -> None:
    net, train, query = model(), batches(SHARDS[rank]), batches(QUERY)
    fits = hookinf.fit(net, train, loss, method="ekfac", checkpoints=checkpoint_states(), progress=False)
    scores = hookinf.influence(net, train, query, loss, method="ekfac", checkpoints=checkpoint_states(), progress=False)
    torch.save([[fit.tensors for fit in fits], scores.per_layer], out / f"checkpoints-{rank}.pt")


def _gather_uneven(rank: int, out: Path) -> None:
    ranks = resolve_ranks("auto")
    assert ranks is not None
    rows = torch.arange(6, dtype=torch.float32).reshape(2, 3) if rank == 0 else torch.ones(1, 5)
    none = torch.zeros(0, 0) if rank == 0 else torch.tensor([[7, 8]])  # rank 0 holds none: it takes rank 1's int64
    torch.save(ranks.gather([rows, none], "a test's tensors"), out / f"gather-{rank}.pt")


# ---------------------------------------------------------------------------------------------- the checks
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist-scores")
    codes = spawn(_score_everything, out)
    assert codes == {0: 0, 1: 0}, (codes, error(out, 0), error(out, 1))
    return out


def _both(run: Path, name: str) -> Any:
    """Rank 0's result, after checking that rank 1 returned the very same."""
    mine, theirs = torch.load(run / f"{name}-0.pt"), torch.load(run / f"{name}-1.pt")
    _same(mine, theirs, name)
    return mine


def _same(mine: Any, theirs: Any, what: str) -> None:
    if isinstance(mine, dict):
        assert mine.keys() == theirs.keys(), what
        for key in mine:
            _same(mine[key], theirs[key], f"{what}/{key}")
    elif isinstance(mine, list | tuple):
        assert len(mine) == len(theirs), what
        for index, (left, right) in enumerate(zip(mine, theirs, strict=True)):
            _same(left, right, f"{what}[{index}]")
    elif isinstance(mine, Tensor):
        assert torch.equal(mine, theirs), what
    else:
        assert mine == theirs, what


def _close(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        assert_close(got[name], want[name], rtol=1e-6, atol=1e-12, what=f"{what} {name}")


def _all() -> list[Batch]:
    return batches(SHARDS[0] + SHARDS[1])


def _single_top(result: hookinf.Retrieved, got: dict[str, Any], what: str) -> None:
    want = _top(result)
    for key in ("harmful", "helpful", "harmful_ids", "helpful_ids", "n_train"):
        _same(got[key], want[key], f"{what}: {key}")
    for key in ("harmful_scores", "helpful_scores"):
        assert_close(got[key], want[key], rtol=1e-6, atol=1e-12, what=f"{what}: {key}")
    _close(got["parts"], want["parts"], f"{what}: parts")


def test_influence_on_two_ranks_equals_one_process_over_the_shards(run: Path) -> None:
    query = batches(QUERY)
    for method in ("exact", "ekfac"):
        got = _both(run, f"influence-{method}")
        want = hookinf.influence(model(), _all(), query, loss, method=method, progress=False, group=None)
        assert got["ids"] is None
        _close(got["per_layer"], want.per_layer, method)
    tokens = _both(run, "tokens")
    curvature = hookinf.load(run / "ekfac")
    want = hookinf.influence(model(), _all(), query, loss, method=curvature, per_token=True, progress=False, group=None)
    assert want.per_token is not None
    _close(tokens["per_token"], want.per_token, "per-token")


def test_self_influence_on_two_ranks_equals_one_process(run: Path) -> None:
    curvature = hookinf.load(run / "ekfac")
    want = hookinf.self_influence(model(), _all(), loss, method=curvature, progress=False, group=None)
    _close(_both(run, "self-ekfac"), want.per_layer, "self-influence, fitted EK-FAC")
    want = hookinf.self_influence(model(), _all(), loss, method="exact", progress=False, group=None)
    _close(_both(run, "self-exact"), want.per_layer, "self-influence, exact fitted across the ranks")


def test_top_k_on_two_ranks_from_data_equals_one_process_and_the_dense_top_k(run: Path) -> None:
    got = _both(run, "top-data")
    query = batches(QUERY)
    single = hookinf.top_k(model(), _all(), query, loss, k=K, method="ekfac", progress=False, group=None)
    _single_top(single, got, "top-k from data")
    dense = hookinf.influence(model(), _all(), query, loss, method="ekfac", progress=False, group=None).top_k(K)
    assert torch.equal(got["harmful"], dense.harmful)
    assert torch.equal(got["helpful"], dense.helpful)
    assert got["n_train"] == 21


@pytest.mark.parametrize("name", ["merged", "parts", "one"])
def test_top_k_and_influence_on_two_ranks_from_a_store_equal_one_process(run: Path, name: str) -> None:
    store, query = hookinf.GradientStore(run / name), batches(QUERY)
    curvature = hookinf.load(run / "ekfac-logra")
    got = _both(run, f"top-{name}")
    single = hookinf.top_k(model(), store, query, loss, k=K, method=curvature, progress=False, group=None)
    _single_top(single, got, f"top-k from the {name} store")
    assert got["n_train"] == len(store) == (1 if name == "one" else 20)
    scores = _both(run, f"influence-{name}")
    want = hookinf.influence(model(), store, query, loss, method="exact", progress=False, group=None)
    _same(scores["ids"], want.ids, f"{name}: ids")
    _close(scores["per_layer"], want.per_layer, f"influence from the {name} store, exact fitted across the ranks")
    if name == "merged":
        assert not hookinf.GradientStore(run / "parts").manifest.merged
        self_scores = hookinf.self_influence(model(), store, loss, method="exact", progress=False, group=None)
        _close(_both(run, "self-merged"), self_scores.per_layer, "self-influence from the store")
        candidates = hookinf.top_k(model(), store, query, loss, k=K, method=curvature, candidates=CANDIDATES,
                                   progress=False, group=None)  # fmt: skip
        _single_top(candidates, _both(run, "top-candidates"), "top-k among candidates")


def test_a_preconditioned_store_is_written_once_and_scored_across_ranks_as_in_one_process(run: Path) -> None:
    """Every rank calls ``precondition_store`` on the same path: rank 0 writes it (no second writer collides), every
    rank opens the finished store; ``top_k`` splits its rows across the ranks and merges each rank's best."""
    pre, query = hookinf.PreconditionedStore(run / "preconditioned"), batches(QUERY)
    curvature = hookinf.load(run / "ekfac-logra")
    pre.check_curvature(curvature)
    assert not (run / "preconditioned" / "run.json").exists()  # finished: the run's record removed
    _same(_both(run, "preconditioned-ids"), pre.ids, "the ids every rank opened")
    got = _both(run, "top-preconditioned")
    _single_top(hookinf.top_k(model(), pre, query, loss, k=K, progress=False, group=None), got, "preconditioned")
    merged = hookinf.GradientStore(run / "merged")
    direct = hookinf.top_k(model(), merged, query, loss, k=K, method=curvature, progress=False, group=None)
    _single_top(direct, got, "preconditioned against the store preconditioned on the fly")
    failures = {rank: torch.load(run / f"precondition-failure-{rank}.pt") for rank in (0, 1)}
    assert failures[0].startswith("CompressorMismatchError"), failures[0]
    assert failures[1].startswith("DistributedError"), failures[1]
    assert "rank 0" in failures[1], failures[1]


def test_query_methods_and_candidates_over_data_are_refused_across_ranks(run: Path) -> None:
    datainf, candidates = _both(run, "refusals")
    assert "method='datainf'" in datainf, datainf
    assert "group=None" in datainf, datainf
    assert "candidates=" in candidates, candidates
    assert "gradient store" in candidates, candidates


def test_watch_fit_in_a_ddp_loop_on_two_ranks_equals_one_fit_over_all_the_data(run: Path) -> None:
    layers, first, again = torch.load(run / "watch-0.pt")
    assert layers == ["0", "2"]  # the DDP wrapper's inner module, without the module. prefix
    _same([layers, first, again], torch.load(run / "watch-1.pt"), "watch curvature")
    _same(first, again, "a second curvature() call")
    got = hookinf.load(run / "watch")
    want = hookinf.fit(model(), batches(LOOP[0] + LOOP[1]), loss, method="kfac", progress=False, group=None)
    assert got.num_examples == want.num_examples == 20
    for name in want.layers:
        for key in ("A", "S"):
            assert_close(got.stat(name, key), want.stat(name, key), rtol=1e-6, atol=1e-12, what=f"{name}/{key}")


def test_checkpoints_are_fitted_and_scored_across_ranks(run: Path) -> None:
    """fit/influence(checkpoints=) on two ranks: each checkpoint's EK-FAC fitted over both shards, as one process."""
    fits, per_layer = _both(run, "checkpoints")
    options: dict[str, Any] = {"progress": False, "group": None}
    want_fits = hookinf.fit(model(), _all(), loss, method="ekfac", checkpoints=checkpoint_states(), **options)
    for k, (got, want) in enumerate(zip(fits, want_fits, strict=True)):
        _close(got, want.tensors, f"checkpoint {k}'s curvature")
    want = hookinf.influence(
        model(), _all(), batches(QUERY), loss, method="ekfac", checkpoints=checkpoint_states(), **options
    )
    _close(per_layer, want.per_layer, "scores over checkpoints")


def test_gather_concatenates_in_rank_order_and_pads_the_later_dimensions(run: Path) -> None:
    rows, none = _both(run, "gather")
    want = torch.tensor([[0, 1, 2, 0, 0], [3, 4, 5, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    assert rows.dtype == torch.float32
    assert torch.equal(rows, want), rows
    assert none.dtype == torch.int64
    assert torch.equal(none, torch.tensor([[7, 8]])), none


@pytest.mark.parametrize("call", ["influence", "top_k"])
def test_a_rank_that_raises_while_scoring_makes_the_other_fail_at_once(run: Path, call: str) -> None:
    mine, seconds = torch.load(run / f"failed-{call}-0.pt")
    theirs, _ = torch.load(run / f"failed-{call}-1.pt")
    assert theirs == "ValueError: rank 1's loss fails while scoring", theirs
    assert mine.startswith("DistributedError"), mine
    assert "rank 1 of 2 failed" in mine, mine
    assert seconds < 10, seconds


def test_distributed_example_under_torchrun(tmp_path: Path) -> None:
    """The example's own checks pass on two ranks launched as the docs say (a free port, gloo, CPU)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(ROOT / "examples" / "distributed_fit.py"), "--store", str(tmp_path / "store"), "--epochs", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "2 ranks: 1798 examples" in out, out
    assert "every id once: True" in out, out
    assert "top-k across the ranks, from the store and from the shards: the same as one process: True" in out, out
