"""Tests of the gradient store (``hookinf/store.py``) and of logging into it (``hookinf.log``, ``watch(log_to=...)``).

Oracles share nothing with the store or the logger: per-example gradients from ``torch.func`` (conftest's
``func_per_example_grads``) laid out as ``[O, I]`` matrices (bias last, ``vec`` = row-major flatten) times the bound
compressor's explicit ``[r', d]`` projection; in-memory scoring with the same compressor; an uninterrupted run as
the reference for resumed and crashed runs.

Layout under test: ``manifest.json`` lists whole shards only; each ``shard-NNNNNN.safetensors`` holds ``__ids__``
``[n]`` and one ``[n, r'_l]`` tensor per layer. A shard is flushed as soon as at least ``flush_every`` examples are
buffered (so with batches of ``B`` a shard holds ``ceil(flush_every / B)`` batches), and once more at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_CASES, ModelCase, close, oracle_matrices
from safetensors.torch import save_file
from torch import Tensor, nn

import hookinf
import hookinf.store
from hookinf import CaptureError, ConfigurationError, CurvatureError, DataError, HookinfError, StoreError
from hookinf.metrics import detection_aucs

Batch = tuple[Tensor, ...]
F64 = torch.float64
TESTS_DIR = Path(__file__).resolve().parent

# Stored (compressed) gradients vs P @ vec(torch.func gradient), both float64: they differ only in the summation
# order of the contractions (d ≤ 70 here, O(1) entries ⇒ rounding ~1e-15 of the largest entry); 1e-10 of the
# largest entry of the layer leaves a wide margin and still catches a wrong index, transpose, scale or example.
GRAD_TOL = 1e-10
# Scores from a store vs in memory with the same compressor, float64: the same formulas on the same compressed
# gradients, summed in a different grouping (per shard vs per batch); rounding ≲ 1e-14 of the largest score.
SCORE_TOL = 1e-10
# The same float64 computation twice (another process, another batching of the same examples, a resumed run).
SAME_TOL = 1e-12
# A float32 model's store vs the float64 model's: float32 rounding of O(1) values.
F32_TOL = 1e-5

LOGRA = hookinf.LoGra(3, 2)
#: one compressor of each kind (the LoGra one is the brief's; the others with non-default seeds).
COMPRESSORS: tuple[hookinf.Compressor, ...] = (LOGRA, hookinf.Dropout(r=5, seed=1), hookinf.Gaussian(7, seed=2))
COMPRESSOR_IDS = ("logra", "dropout", "gaussian")


# ---------------------------------------------------------------------------------------------------- helpers


def mlp() -> ModelCase:
    """conftest's ``mlp-bias``: fc1 Linear(5, 7) → tanh → fc2 Linear(7, 3), batches of 4, cross-entropy."""
    return MODEL_CASES["mlp-bias"]()


def batches(case: ModelCase, n: int, first: int = 1) -> list[Batch]:
    return [case.make_batch(seed) for seed in range(first, first + n)]


def log(case: ModelCase, train: Sequence[Any], path: Path, **kwargs: Any) -> hookinf.GradientStore:
    kwargs.setdefault("compress", LOGRA)
    loss_fn = kwargs.pop("loss_fn", case.loss_fn)
    return hookinf.log(case.model, train, loss_fn, path=path, modules=case.modules, progress=False, **kwargs)


def contents(store: hookinf.GradientStore) -> tuple[Tensor, dict[str, Tensor]]:
    """All stored ``ids [n]`` and ``{layer: [n, r']}`` in storage order (reading every shard)."""
    ids: list[Tensor] = []
    grads: dict[str, list[Tensor]] = {name: [] for name in store.layers}
    for chunk_ids, chunk in store.chunks():
        ids.append(chunk_ids)
        for name, tensor in chunk.items():
            grads[name].append(tensor)
    return torch.cat(ids), {name: torch.cat(parts) for name, parts in grads.items()}


def by_id(store: hookinf.GradientStore) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`contents` sorted by id."""
    ids, grads = contents(store)
    order = torch.argsort(ids)
    return ids[order], {name: g[order] for name, g in grads.items()}


def shard_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("shard-*.safetensors"))


def assert_same_store(actual: hookinf.GradientStore, expected: hookinf.GradientStore, tol: float, what: str) -> None:
    """Every id exactly once in both, with the same gradients (compared by id)."""
    __tracebackhide__ = True
    ids, grads = by_id(actual)
    ref_ids, ref_grads = by_id(expected)
    assert torch.unique(ids).numel() == ids.numel(), f"{what}: duplicate ids {ids.tolist()}"
    assert ids.tolist() == ref_ids.tolist(), f"{what}: ids differ"
    assert list(grads) == list(ref_grads), f"{what}: layers differ"
    for name in ref_grads:
        close(grads[name], ref_grads[name], tol, f"{what} layer {name!r}")


def expected_compressed(
    case: ModelCase, data: Sequence[Batch], store: hookinf.GradientStore, compressor: hookinf.Compressor
) -> dict[str, Tensor]:
    """``{layer: [n, r']}`` = ``P vec(g)`` of every example, ``P`` drawn by binding the compressor to the layers."""
    bound = compressor.bind(store.original)
    oracle = oracle_matrices(case.model, case.loss_fn, data, list(store.original))
    for name, grads in oracle.items():
        assert bool(grads.abs().max() > 0), f"vacuous comparison: layer {name!r} has a zero gradient"
    return {name: grads.flatten(1) @ bound.projection(name).T for name, grads in oracle.items()}


class CountingLoss:
    """Wraps a loss function and counts its calls (to see which batches ran the model)."""

    def __init__(self, loss_fn: Callable[..., Tensor]) -> None:
        self.loss_fn = loss_fn
        self.calls = 0

    def __call__(self, model: Any, batch: Batch) -> Tensor:
        self.calls += 1
        return self.loss_fn(model, batch)


def assert_scores_equal(actual: hookinf.Scores, expected: hookinf.Scores, tol: float, what: str) -> None:
    __tracebackhide__ = True
    assert actual.layers == expected.layers, what
    assert actual.method == expected.method, what
    for layer in expected.layers:
        close(actual.per_layer[layer], expected.per_layer[layer], tol, f"{what} layer {layer!r}")
    close(actual.total, expected.total, tol, f"{what} total")


# ---------------------------------------------------------------------------------------------------- 1. round trip
#: flush_every → examples per shard for 5 batches of 4: a shard holds ceil(flush_every / 4) batches, the rest last.
SHARDS = {1: [4] * 5, 4: [4] * 5, 6: [8, 8, 4], 8: [8, 8, 4], 12: [12, 8], 10**6: [20]}


@pytest.mark.parametrize("flush_every", list(SHARDS))
def test_round_trip_shards_and_default_ids(tmp_path: Path, flush_every: int) -> None:
    case = mlp()
    train = batches(case, 5)
    returned = log(case, train, tmp_path, flush_every=flush_every)
    store = hookinf.GradientStore(tmp_path)

    counts = SHARDS[flush_every]
    assert len(store) == 20
    assert [s.count for s in store.shards] == counts
    assert shard_files(tmp_path) == [s.file for s in store.shards]
    assert store.ids.tolist() == list(range(20))  # default ids: positions in train
    assert store.compressor == LOGRA.config()
    assert list(store.layers) == ["fc1", "fc2"]
    assert {n: (s.out_features, s.in_features) for n, s in store.layers.items()} == {"fc1": (2, 3), "fc2": (2, 3)}
    assert {n: (s.out_features, s.in_features) for n, s in store.original.items()} == {"fc1": (7, 6), "fc2": (3, 8)}
    assert store.dtype == F64
    assert len(returned) == 20
    assert returned.ids.tolist() == store.ids.tolist()

    for (chunk_ids, chunk), shard in zip(store.chunks(), store.shards, strict=True):
        assert chunk_ids.dtype == torch.int64
        assert chunk_ids.numel() == shard.count
        for name, tensor in chunk.items():
            assert tuple(tensor.shape) == (shard.count, store.layers[name].dim), name
            assert tensor.dtype == F64, name

    _, grads = contents(store)
    expected = expected_compressed(case, train, store, LOGRA)
    for name in expected:
        close(grads[name], expected[name], GRAD_TOL, f"flush_every={flush_every} layer {name!r}")


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=COMPRESSOR_IDS)
@pytest.mark.parametrize("case_id", ["mlp-bias", "conv1d"])
def test_stored_gradients_equal_projection_of_func_gradients(
    tmp_path: Path, case_id: str, compressor: hookinf.Compressor
) -> None:
    case = MODEL_CASES[case_id]()
    train = batches(case, 3)
    log(case, train, tmp_path, compress=compressor, flush_every=5)
    store = hookinf.GradientStore(tmp_path)
    n = 3 * case.batch_size
    assert len(store) == n
    assert store.ids.tolist() == list(range(n))
    assert store.compressor == compressor.config()
    bound = compressor.bind(store.original)
    assert store.layers == bound.shapes
    _, grads = contents(store)
    expected = expected_compressed(case, train, store, compressor)
    assert list(grads) == list(expected)
    for name in expected:
        close(grads[name], expected[name], GRAD_TOL, f"{case_id}/{compressor} layer {name!r}")


def test_custom_ids_are_stored_and_become_score_ids(tmp_path: Path) -> None:
    case = mlp()
    custom = [torch.tensor([10_000 - 7 * (4 * k + i) for i in range(4)]) for k in range(4)]  # sparse, descending
    train = [(*batch, ids) for batch, ids in zip(batches(case, 4), custom, strict=True)]

    def loss_fn(model: Any, batch: Batch) -> Tensor:
        return case.loss_fn(model, batch[:2])

    store = log(case, train, tmp_path, loss_fn=loss_fn, ids=lambda batch: batch[2].tolist(), flush_every=6)
    expected_ids = torch.cat(custom)
    assert torch.equal(store.ids, expected_ids)
    assert torch.equal(hookinf.GradientStore(tmp_path).ids, expected_ids)
    assert len(hookinf.GradientStore(tmp_path).shards) == 2
    _, grads = contents(hookinf.GradientStore(tmp_path))
    expected = expected_compressed(case, [b[:2] for b in train], store, LOGRA)
    for name in expected:
        close(grads[name], expected[name], GRAD_TOL, f"custom ids layer {name!r}")

    query = [case.make_batch(50)]
    scores = hookinf.influence(case.model, store, query, case.loss_fn, method="identity", progress=False)
    # columns come sorted by id whatever order the examples were logged in (here descending)
    order = torch.argsort(expected_ids)
    assert scores.ids is not None
    assert torch.equal(scores.ids, expected_ids[order])
    plain = [b[:2] for b in train]
    kwargs: dict[str, Any] = {"method": "identity", "progress": False}
    memory = hookinf.influence(case.model, plain, query, case.loss_fn, compress=LOGRA, **kwargs)
    close(scores.total, memory.total[:, order], SCORE_TOL, "store columns = logged-order columns sorted by id")
    self_store = hookinf.self_influence(case.model, store, case.loss_fn, **kwargs).total
    self_memory = hookinf.self_influence(case.model, plain, case.loss_fn, compress=LOGRA, **kwargs).total
    close(self_store, self_memory[order], SCORE_TOL, "store self-influence sorted by id")
    with pytest.raises(hookinf.ConfigurationError, match=r"ids \[9895, 9902.*flipped\[scores.ids\]"):
        detection_aucs(None, scores, torch.zeros(16, dtype=torch.bool))


def test_shuffled_logging_gives_scores_in_dataset_order(tmp_path: Path) -> None:
    """A store logged from a shuffled loop with dataset indices as ids scores like the unshuffled data."""
    case = mlp()
    train = batches(case, 4)  # 4 batches of 4: dataset index = position
    x = torch.cat([b[0] for b in train])
    y = torch.cat([b[1] for b in train])
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    with hookinf.watch(case.model, log_to=tmp_path, compress=LOGRA, loss_reduction="sum") as w:
        for idx in perm.split(5):  # batches of another size, in shuffled order
            w.tag(idx)
            case.loss_fn(case.model, (x[idx], y[idx])).sum().backward()
    case.model.zero_grad(set_to_none=True)
    store = hookinf.GradientStore(tmp_path)
    assert torch.equal(store.ids, perm)
    query = [case.make_batch(50)]
    got = hookinf.influence(case.model, store, query, case.loss_fn, method="exact", progress=False)
    want = hookinf.influence(case.model, train, query, case.loss_fn, method="exact", compress=LOGRA, progress=False)
    assert got.ids is not None
    assert torch.equal(got.ids, torch.arange(16))
    close(got.total, want.total, SCORE_TOL, "shuffled store vs dataset order")
    self_got = hookinf.self_influence(case.model, store, case.loss_fn, method="exact", progress=False)
    self_want = hookinf.self_influence(case.model, train, case.loss_fn, method="exact", compress=LOGRA, progress=False)
    close(self_got.total, self_want.total, SCORE_TOL, "shuffled store self-influence vs dataset order")
    flipped = torch.arange(16) % 5 == 0
    assert detection_aucs(self_got, got, flipped) == detection_aucs(self_want, want, flipped)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_store_dtype_is_the_model_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    case = mlp()
    train64 = batches(case, 3)
    reference = log(case, train64, tmp_path / "f64")
    case.model.to(dtype)
    train = [(x.to(dtype), y) for x, y in train64]
    store = log(case, train, tmp_path / "store")
    reopened = hookinf.GradientStore(tmp_path / "store")
    assert store.dtype == dtype
    assert reopened.dtype == dtype
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["dtype"] == str(dtype).removeprefix("torch.")
    _, grads = contents(reopened)
    _, ref_grads = contents(reference)
    for name, tensor in grads.items():
        assert tensor.dtype == dtype, name
        close(tensor, ref_grads[name], F32_TOL if dtype == torch.float32 else SAME_TOL, f"{dtype} layer {name!r}")


# ---------------------------------------------------------------------------------------------------- 2. scoring
@pytest.mark.parametrize("compressor", COMPRESSORS, ids=COMPRESSOR_IDS)
def test_scores_from_a_store_equal_in_memory_scores(tmp_path: Path, compressor: hookinf.Compressor) -> None:
    case = mlp()
    model, loss_fn = case.model, case.loss_fn
    train = batches(case, 6)
    query = [case.make_batch(50), case.make_batch(51)]
    many = log(case, train, tmp_path / "many", compress=compressor, flush_every=1)  # 6 shards
    one = log(case, train, tmp_path / "one", compress=compressor, flush_every=10**6)  # 1 shard
    assert len(many.shards) == 6
    assert len(one.shards) == 1
    stores = {
        "many shards": hookinf.GradientStore(tmp_path / "many"),
        "one shard": hookinf.GradientStore(tmp_path / "one"),
    }

    for method in ("exact", "identity", "datainf"):
        memory = hookinf.influence(model, train, query, loss_fn, method=method, compress=compressor, progress=False)
        assert memory.ids is None
        assert bool(memory.total.abs().max() > 0), "vacuous comparison"
        from_store = {}
        for label, store in stores.items():
            got = hookinf.influence(model, store, query, loss_fn, method=method, progress=False)
            assert got.ids is not None
            assert torch.equal(got.ids, store.ids), label
            assert got.damping.keys() == memory.damping.keys(), label
            for layer, lam in memory.damping.items():
                assert got.damping[layer] == pytest.approx(lam, rel=SCORE_TOL), f"{method}/{label} λ {layer}"
            assert_scores_equal(got, memory, SCORE_TOL, f"{method}/{label}")
            from_store[label] = got
        assert_scores_equal(from_store["many shards"], from_store["one shard"], SAME_TOL, f"{method}: many vs one")
        # The store's own compressor may also be named explicitly.
        named = hookinf.influence(model, stores["many shards"], query, loss_fn, method=method, compress=compressor)
        assert_scores_equal(named, memory, SCORE_TOL, f"{method} compress= named")

    for method in ("exact", "datainf"):
        memory_self = hookinf.self_influence(model, train, loss_fn, method=method, compress=compressor, progress=False)
        for label, store in stores.items():
            got_self = hookinf.self_influence(model, store, loss_fn, method=method, progress=False)
            close(got_self.total, memory_self.total, SCORE_TOL, f"self-influence {method}/{label}")

    curvature = hookinf.fit(model, train, loss_fn, method="ekfac", compress=compressor, progress=False)
    memory = hookinf.influence(model, train, query, loss_fn, method=curvature, compress=compressor, progress=False)
    memory_self = hookinf.self_influence(model, train, loss_fn, method=curvature, compress=compressor, progress=False)
    for label, store in stores.items():
        got = hookinf.influence(model, store, query, loss_fn, method=curvature, progress=False)
        assert torch.equal(got.ids, store.ids), label
        assert_scores_equal(got, memory, SCORE_TOL, f"fitted ekfac/{label}")
        got_self = hookinf.self_influence(model, store, loss_fn, method=curvature, progress=False)
        close(got_self.total, memory_self.total, SCORE_TOL, f"self-influence fitted ekfac/{label}")


def test_kfac_by_name_with_a_store_points_to_fit(tmp_path: Path) -> None:
    case = mlp()
    store = log(case, batches(case, 2), tmp_path)
    query = [case.make_batch(50)]
    for method in ("kfac", "ekfac"):
        with pytest.raises(ConfigurationError, match=r"hookinf\.fit"):
            hookinf.influence(case.model, store, query, case.loss_fn, method=method, progress=False)
        with pytest.raises(ConfigurationError, match=r"hookinf\.fit"):
            hookinf.self_influence(case.model, store, case.loss_fn, method=method, progress=False)


def test_scoring_a_store_with_another_compressor_or_curvature_is_refused(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 2)
    store = log(case, train, tmp_path)
    query = [case.make_batch(50)]
    other = hookinf.LoGra(3, 2, seed=1)
    with pytest.raises(ConfigurationError, match="differs from the store's compressor"):
        hookinf.influence(case.model, store, query, case.loss_fn, compress=other, progress=False)
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="kfac", compress=other, progress=False)
    with pytest.raises(CurvatureError, match="same compressor"):
        hookinf.influence(case.model, store, query, case.loss_fn, method=curvature, progress=False)


# ---------------------------------------------------------------------------------------------------- 3. resume
def test_resume_logs_every_id_once_and_skips_stored_batches(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 6)
    full = log(case, train, tmp_path / "full", flush_every=4)

    first = CountingLoss(case.loss_fn)
    log(case, train[:3], tmp_path / "resumed", loss_fn=first, flush_every=4)
    assert first.calls == 3
    assert len(hookinf.GradientStore(tmp_path / "resumed")) == 12

    second = CountingLoss(case.loss_fn)
    resumed = log(case, train, tmp_path / "resumed", loss_fn=second, flush_every=4)
    assert second.calls == 3, "batches whose ids are all stored must be skipped without running the model"
    assert len(resumed) == 24
    assert resumed.ids.tolist() == list(range(24))
    assert_same_store(hookinf.GradientStore(tmp_path / "resumed"), full, SAME_TOL, "resumed")

    # A complete store: nothing runs, nothing is written.
    third = CountingLoss(case.loss_fn)
    again = log(case, train, tmp_path / "resumed", loss_fn=third, flush_every=4)
    assert third.calls == 0
    assert len(again.shards) == 6
    assert shard_files(tmp_path / "resumed") == [s.file for s in again.shards]


def test_resume_inside_a_partly_stored_batch(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 3)
    full = log(case, train, tmp_path / "full")
    # The first run saw batch 0 and the first half of batch 1: ids 0..5.
    log(case, [train[0], tuple(t[:2] for t in train[1])], tmp_path / "resumed")
    assert hookinf.GradientStore(tmp_path / "resumed").ids.tolist() == list(range(6))
    counting = CountingLoss(case.loss_fn)
    resumed = log(case, train, tmp_path / "resumed", loss_fn=counting)
    assert counting.calls == 2  # batch 0 skipped; batch 1 runs for ids 6, 7 only; batch 2 runs
    assert len(resumed) == 12
    assert_same_store(hookinf.GradientStore(tmp_path / "resumed"), full, SAME_TOL, "partly stored batch")


@pytest.mark.parametrize(
    "other",
    [hookinf.LoGra(3, 2, seed=1), hookinf.LoGra(2, 2), hookinf.LoGra(3, 2, init="orthogonal"), hookinf.Dropout(r=5)],
    ids=["seed", "rank", "init", "kind"],
)
def test_resume_with_another_compressor_is_refused(tmp_path: Path, other: hookinf.Compressor) -> None:
    case = mlp()
    train = batches(case, 2)
    log(case, train[:1], tmp_path)
    counting = CountingLoss(case.loss_fn)
    with pytest.raises(StoreError) as info:
        log(case, train, tmp_path, compress=other, loss_fn=counting)
    assert isinstance(info.value, HookinfError)
    message = str(info.value)
    assert str(LOGRA.config()) in message  # the store's compressor ...
    assert str(other.config()) in message  # ... and the one given: the differing field is visible in both
    assert str(tmp_path) in message
    assert counting.calls == 0
    assert len(hookinf.GradientStore(tmp_path)) == 4  # untouched


def test_resume_with_another_model_or_dtype_is_refused(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 2)
    log(case, train[:1], tmp_path)
    torch.manual_seed(0)
    # The same layer names, hidden size 8 instead of 7.
    wider = nn.Sequential(OrderedDict(fc1=nn.Linear(5, 8), act=nn.Tanh(), fc2=nn.Linear(8, 3))).double()
    with pytest.raises(StoreError, match="layer 'fc1' differs") as info:
        hookinf.log(wider, train, case.loss_fn, compress=LOGRA, path=tmp_path, progress=False)
    assert isinstance(info.value, HookinfError)
    with pytest.raises(StoreError, match="tracked layers differ"):
        hookinf.log(case.model, train, case.loss_fn, compress=LOGRA, path=tmp_path, modules="fc1", progress=False)
    # Scoring the store with the other model is refused the same way.
    with pytest.raises(StoreError, match="layer 'fc1' differs"):
        hookinf.influence(wider, hookinf.GradientStore(tmp_path), [case.make_batch(50)], case.loss_fn, progress=False)
    case.model.float()
    with pytest.raises(StoreError, match=r"float64.*float32"):
        log(case, [(x.float(), y) for x, y in train], tmp_path)
    assert len(hookinf.GradientStore(tmp_path)) == 4


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 2)
    with pytest.raises(StoreError, match="duplicate ids"):
        log(case, train, tmp_path / "a", ids=lambda batch: [0, 1, 1, 2])
    assert len(hookinf.GradientStore(tmp_path / "a")) == 0

    store = log(case, train, tmp_path / "b")
    _, grads = contents(store)
    one = {name: g[:1] for name, g in grads.items()}
    two = {name: g[:2] for name, g in grads.items()}
    with pytest.raises(StoreError, match="id 3 is already stored"):
        store.append(torch.tensor([3]), one)
    with pytest.raises(StoreError, match="id 5 is already stored"):
        store.append(torch.tensor([100, 5]), two)
    with pytest.raises(StoreError, match="duplicate ids"):
        store.append(torch.tensor([100, 100]), two)
    reopened = hookinf.GradientStore(tmp_path / "b")
    assert reopened.ids.tolist() == list(range(8))
    assert len(reopened.shards) == 1


def test_ids_count_must_match_the_batch(tmp_path: Path) -> None:
    case = mlp()
    with pytest.raises(DataError, match="3 ids were given for a batch of 4"):
        log(case, batches(case, 1), tmp_path, ids=lambda batch: [0, 1, 2])


# ---------------------------------------------------------------------------------------------------- 4. crash safety
WRITER = """
import sys
import time

import torch

sys.path.insert(0, {tests!r})
from conftest import MODEL_CASES

import hookinf

torch.set_num_threads(1)
case = MODEL_CASES["mlp-bias"]()
train = [case.make_batch(seed) for seed in range(1, {n} + 1)]


def slow_loss(model, batch):
    time.sleep(0.03)
    return case.loss_fn(model, batch)


hookinf.log(case.model, train, slow_loss, compress=hookinf.LoGra(3, 2), path=sys.argv[1], flush_every=4,
            progress=False)
print("finished")
"""


def listed_shards(path: Path) -> int:
    try:
        return len(json.loads((path / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def assert_whole_shards(store: hookinf.GradientStore) -> None:
    """Every listed shard is readable, holds as many examples as listed, and no id is stored twice."""
    __tracebackhide__ = True
    for (ids, chunk), shard in zip(store.chunks(), store.shards, strict=True):
        assert ids.numel() == shard.count, shard
        for name, tensor in chunk.items():
            assert tuple(tensor.shape) == (shard.count, store.layers[name].dim), (shard, name)
    assert torch.unique(store.ids).numel() == len(store), f"duplicate ids: {store.ids.tolist()}"


def test_killed_writer_leaves_whole_shards_and_resumes(tmp_path: Path) -> None:
    n = 40  # batches of 4, one shard per batch, ≥ 30 ms per batch: the run lasts > 1.2 s after the imports
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(TESTS_DIR), n=n))
    path = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while listed_shards(path) < 2:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the writer exited (rc={proc.returncode}) before two shards were listed:\n{out}\n{err}")
            if time.monotonic() > deadline:
                pytest.fail("the writer listed no two shards within 60 s")
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"

    case = mlp()
    train = batches(case, n)
    reference = log(case, train, tmp_path / "reference", flush_every=10**6)

    crashed = hookinf.GradientStore(path)
    assert 2 <= len(crashed.shards) < n
    assert len(crashed) == 4 * len(crashed.shards)
    assert_whole_shards(crashed)
    ids, grads = by_id(crashed)
    _, ref_grads = contents(reference)
    for name in grads:  # what was stored before the kill is right
        close(grads[name], ref_grads[name][ids], SAME_TOL, f"before resume layer {name!r}")

    counting = CountingLoss(case.loss_fn)
    resumed = log(case, train, path, loss_fn=counting, flush_every=4)
    assert counting.calls == n - len(crashed.shards)
    assert len(resumed) == 4 * n
    assert_whole_shards(hookinf.GradientStore(path))
    assert_same_store(hookinf.GradientStore(path), reference, SAME_TOL, "resumed after SIGKILL")


def test_leftover_temporary_and_unlisted_shard_files_are_ignored(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 6)
    reference = log(case, train, tmp_path / "reference")
    path = tmp_path / "store"
    log(case, train[:3], path, flush_every=4)  # shard-000000 .. shard-000002
    # What a writer killed inside a shard write (or between the shard's rename and the manifest update) leaves.
    (path / ".shard-000003.safetensors.k2j3h4.tmp").write_bytes(b"\x00" * 37)
    (path / ".manifest.json.a8f7d6.tmp").write_text('{"format": "hookinf.gradient-store", "shards": [')
    (path / "shard-000003.safetensors").write_bytes(b"not a safetensors file")  # the next shard's name
    bogus = {name: torch.full((4, s.dim), 1e6, dtype=F64) for name, s in hookinf.GradientStore(path).layers.items()}
    save_file({**bogus, "__ids__": torch.arange(12, 16)}, str(path / "shard-000007.safetensors"))  # valid, unlisted

    opened = hookinf.GradientStore(path)
    assert [s.file for s in opened.shards] == [
        "shard-000000.safetensors",
        "shard-000001.safetensors",
        "shard-000002.safetensors",
    ]
    assert opened.ids.tolist() == list(range(12))
    assert_whole_shards(opened)

    counting = CountingLoss(case.loss_fn)
    log(case, train, path, loss_fn=counting, flush_every=4)
    assert counting.calls == 3
    resumed = hookinf.GradientStore(path)
    assert len(resumed.shards) == 6
    assert_whole_shards(resumed)
    assert_same_store(resumed, reference, SAME_TOL, "resumed over leftover files")


def test_crash_between_shard_rename_and_manifest_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = mlp()
    train = batches(case, 4)
    reference = log(case, train, tmp_path / "reference")
    path = tmp_path / "store"
    log(case, train[:2], path, flush_every=4)

    class Crash(BaseException):
        pass

    def crash(directory: Path, manifest: Any) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(hookinf.store, "_write_manifest", crash)
        with pytest.raises(Crash):
            log(case, train, path, flush_every=4)
    assert (path / "shard-000002.safetensors").is_file()  # written and renamed, never listed
    opened = hookinf.GradientStore(path)
    assert len(opened.shards) == 2
    assert opened.ids.tolist() == list(range(8))

    log(case, train, path, flush_every=4)
    resumed = hookinf.GradientStore(path)
    assert len(resumed.shards) == 4
    assert_whole_shards(resumed)
    assert_same_store(resumed, reference, SAME_TOL, "resumed after a crash before the manifest update")


# ---------------------------------------------------------------------------------------------------- 5. watch(log_to=)
class Interrupted(Exception):
    pass


def user_loop(
    w: hookinf.Watch,
    case: ModelCase,
    train: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    tag: bool = True,
    fail_before: int | None = None,
) -> None:
    """A plain training loop (mean loss, backward, optimizer step) that tags each batch with its positions.

    With ``fail_before=k`` it raises :class:`Interrupted` when batch ``k`` comes up, before tagging it (as a failing
    data loader would): batches ``0 .. k-1`` have run forward, backward and the optimizer step.
    """
    position = 0
    for k, batch in enumerate(train):
        if k == fail_before:
            raise Interrupted
        if tag:
            w.tag(torch.arange(position, position + batch[0].shape[0]))
        position += batch[0].shape[0]
        optimizer.zero_grad()
        case.loss_fn(case.model, batch).mean().backward()
        optimizer.step()


def watched_loop(case: ModelCase, train: Sequence[Batch], path: Path, *, flush_every: int = 100, **kw: Any) -> None:
    """:func:`user_loop` at a zero learning rate inside ``watch(log_to=path, compress=LOGRA)``."""
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.0)
    with hookinf.watch(case.model, log_to=path, compress=LOGRA, flush_every=flush_every) as w:
        assert isinstance(w.store, hookinf.GradientStore)
        assert w.store.path == path
        user_loop(w, case, train, optimizer, **kw)


def one_tagged_step(case: ModelCase, batch: Batch, path: Path, ids: Sequence[int]) -> None:
    with hookinf.watch(case.model, log_to=path, compress=LOGRA) as w:
        w.tag(ids)
        case.loss_fn(case.model, batch).mean().backward()


@pytest.mark.parametrize("flush_every", [4, 10, 10**6])
def test_watch_log_to_equals_log(tmp_path: Path, flush_every: int) -> None:
    case = mlp()
    train = batches(case, 5)
    reference = log(case, train, tmp_path / "log", flush_every=flush_every)
    before = [p.detach().clone() for p in case.model.parameters()]
    watched_loop(case, train, tmp_path / "watch", flush_every=flush_every)
    for p, b in zip(case.model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    store = hookinf.GradientStore(tmp_path / "watch")
    assert [s.count for s in store.shards] == [s.count for s in reference.shards]
    assert torch.equal(store.ids, reference.ids)
    assert store.compressor == reference.compressor
    assert store.layers == reference.layers
    assert store.original == reference.original
    assert store.dtype == reference.dtype
    _, grads = contents(store)
    _, ref_grads = contents(reference)
    for name in ref_grads:  # the watch rescales the mean loss's output gradients by B
        close(grads[name], ref_grads[name], SAME_TOL, f"watch vs log layer {name!r}")


def test_watch_logging_misuse_is_refused(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 2)
    with pytest.raises(CaptureError, match=r"w\.tag"):
        watched_loop(case, train, tmp_path / "a", tag=False)
    assert len(hookinf.GradientStore(tmp_path / "a")) == 0

    with hookinf.watch(case.model) as w:
        with pytest.raises(ConfigurationError, match="log_to"):
            w.tag([0, 1, 2, 3])
        with pytest.raises(ConfigurationError, match="log_to"):
            _ = w.store
    with pytest.raises(ConfigurationError, match="compress"):
        hookinf.watch(case.model, log_to=tmp_path / "b")
    with pytest.raises(ConfigurationError, match="log_to"):
        hookinf.watch(case.model, compress=LOGRA)
    assert not (tmp_path / "b").exists()

    with pytest.raises(DataError, match="3 ids were given for a batch of 4"):
        one_tagged_step(case, train[0], tmp_path / "c", [0, 1, 2])
    with pytest.raises(StoreError, match="duplicate ids"):
        one_tagged_step(case, train[0], tmp_path / "d", [0, 1, 1, 2])
    for path in ("c", "d"):
        assert len(hookinf.GradientStore(tmp_path / path)) == 0


def test_exception_in_the_next_forward_keeps_completed_steps(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 4)
    reference = log(case, train[:3], tmp_path / "reference")
    loss_fn = case.loss_fn

    def failing_loss(model: Any, batch: Batch) -> Tensor:
        if batch is train[3]:
            raise Interrupted  # after batch 3 was tagged, before its forward
        return loss_fn(model, batch)

    case.loss_fn = failing_loss
    with pytest.raises(Interrupted):
        watched_loop(case, train, tmp_path / "watch")
    store = hookinf.GradientStore(tmp_path / "watch")
    assert store.ids.tolist() == list(range(12))
    assert_same_store(store, reference, SAME_TOL, "after an exception")


def test_exception_between_batches_keeps_the_last_completed_step(tmp_path: Path) -> None:
    # Batches 0..2 ran forward, backward and the optimizer step; the loop then fails before batch 3 is tagged
    # (e.g. the data loader raises). Their steps are complete ("completed steps are kept", watch's docstring) and
    # must be flushed when the block exits.
    case = mlp()
    train = batches(case, 4)
    reference = log(case, train[:3], tmp_path / "reference")
    with pytest.raises(Interrupted):
        watched_loop(case, train, tmp_path / "watch", fail_before=3)
    store = hookinf.GradientStore(tmp_path / "watch")
    assert store.ids.tolist() == list(range(12)), "the completed step of batch 2 was dropped"
    assert_same_store(store, reference, SAME_TOL, "after an exception between batches")


def partial_backward(case: ModelCase, train: Sequence[Batch], path: Path) -> None:
    """Batch 0 completes; batch 1's backward raises after fc2 received its output gradient, before fc1 does."""

    def fail(grad: Tensor) -> Tensor:
        raise Interrupted

    with hookinf.watch(case.model, log_to=path, compress=LOGRA, flush_every=100) as w:
        w.tag(torch.arange(4))
        case.loss_fn(case.model, train[0]).mean().backward()
        w.tag(torch.arange(4, 8))
        hidden = case.model.act(case.model.fc1(train[1][0]))
        hidden.register_hook(fail)  # runs between fc2's output gradient and fc1's
        nn.functional.cross_entropy(case.model.fc2(hidden), train[1][1]).backward()


def test_exception_inside_backward_does_not_store_a_partial_step(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 2)
    reference = log(case, train[:1], tmp_path / "reference")
    with pytest.raises(Interrupted):
        partial_backward(case, train, tmp_path / "watch")
    store = hookinf.GradientStore(tmp_path / "watch")
    assert store.ids.tolist() == list(range(4))
    assert_same_store(store, reference, SAME_TOL, "after an exception inside backward")


# ---------------------------------------------------------------------------------------------------- 6. corrupt stores
def test_opening_a_directory_without_a_store(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(StoreError, match="no hookinf gradient store") as info:
            hookinf.GradientStore(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, HookinfError)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda m: "{not json",
        lambda m: "",
        lambda m: json.dumps({**m, "format": "kronfluence.store"}),
        lambda m: json.dumps({k: v for k, v in m.items() if k != "shards"}),
        lambda m: json.dumps({**m, "dtype": "float1024"}),
        lambda m: json.dumps([m]),
        lambda m: json.dumps({**m, "shards": [{"file": "shard-000000.safetensors"}]}),
    ],
    ids=["bad-json", "empty", "format", "no-shards", "dtype", "list", "shard-count"],
)
def test_corrupt_manifest_names_the_path(tmp_path: Path, corrupt: Callable[[dict], str]) -> None:
    case = mlp()
    log(case, batches(case, 1), tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(corrupt(json.loads(manifest.read_text())))
    with pytest.raises(StoreError, match="corrupt gradient store manifest") as info:
        hookinf.GradientStore(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(StoreError):  # resuming is refused the same way
        log(case, batches(case, 1), tmp_path)


def test_wrong_format_field_is_named(tmp_path: Path) -> None:
    case = mlp()
    log(case, batches(case, 1), tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": "kronfluence.store"}))
    with pytest.raises(StoreError, match=r"kronfluence\.store"):
        hookinf.GradientStore(tmp_path)


@pytest.mark.parametrize("damage", ["half", "header", "missing"])
def test_truncated_or_missing_shard_names_the_shard(tmp_path: Path, damage: str) -> None:
    case = mlp()
    train = batches(case, 3)
    log(case, train, tmp_path, flush_every=4)
    shard = tmp_path / "shard-000001.safetensors"
    data = shard.read_bytes()
    if damage == "missing":
        shard.unlink()
    else:
        os.truncate(shard, len(data) // 2 if damage == "half" else 5)
    with pytest.raises(StoreError, match="unreadable shard") as info:  # opening checks each shard's size and header
        hookinf.GradientStore(tmp_path)
    assert str(shard) in str(info.value)
    with pytest.raises(StoreError, match="shard-000001"):
        log(case, train, tmp_path, flush_every=4)
    # the recovery the message names: drop the shard's entry, and a resume stores its examples anew
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["file"] != shard.name]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    log(case, train, tmp_path, flush_every=4)
    assert sorted(hookinf.GradientStore(tmp_path).ids.tolist()) == list(range(12))


def test_an_id_repeated_within_one_run_is_refused(tmp_path: Path) -> None:
    """Ids seen again in the same run (e.g. positions within each batch) would silently shrink the store."""
    case = mlp()
    data = batches(case, 3)
    with pytest.raises(StoreError, match="already logged in this run") as info:
        log(case, data, tmp_path / "store", ids=lambda batch: range(int(batch[0].shape[0])))
    assert isinstance(info.value, HookinfError)


def test_a_logging_watch_entered_twice_resumes_its_store(tmp_path: Path) -> None:
    case = mlp()
    data = batches(case, 4)
    w = hookinf.watch(case.model, log_to=tmp_path / "store", compress=LOGRA, modules=case.modules)
    for part, first in ((data[:2], 0), (data[2:], 8)):
        with w:
            for i, batch in enumerate(part):
                w.tag(range(first + 4 * i, first + 4 * i + 4))
                case.losses(batch).mean().backward()
        case.model.zero_grad(set_to_none=True)
    assert sorted(hookinf.GradientStore(tmp_path / "store").ids.tolist()) == list(range(16))
