"""Tests of retrieval at scale: streaming top-k (``hookinf.top_k``), preconditioned stores, TF-IDF candidates, FAISS.

Oracles: the dense scores of ``hookinf.influence`` and their ``Scores.top_k`` (the streaming top-k must choose the
same entries with the same scores and ids, ties included); a brute-force lexicographic sort for the tie rule; an
explicit cosine similarity of scikit-learn's TF-IDF rows for the candidates. Memory is checked structurally: a
``TorchDispatchMode`` records every tensor allocated during the call, and none may be the size of the score matrix.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from conftest import MODEL_CASES, ModelCase, close
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import hookinf
from hookinf import ConfigurationError, DataError, StoreError
from hookinf.prefilter import tfidf
from hookinf.ranking import top_entries

Batch = tuple[Tensor, ...]
LOGRA = hookinf.LoGra(3, 2)
# Streaming and dense scores run the same float64 contractions per chunk and sum the layers in the same order: they
# agree to the last bit in practice; 1e-12 of the largest score allows for a reordered reduction.
SAME_TOL = 1e-12
# A preconditioned store applies (G + λI)⁻¹ to the training side instead of the query side: the same value up to
# float64 rounding of the solve (~1e-14 of the largest score here).
SIDE_TOL = 1e-9
# FAISS works in float32.
F32_TOL = 1e-5


def mlp() -> ModelCase:
    """conftest's ``mlp-bias``: fc1 Linear(5, 7) → tanh → fc2 Linear(7, 3), batches of 4, cross-entropy."""
    return MODEL_CASES["mlp-bias"]()


def batches(case: ModelCase, n: int, first: int = 1) -> list[Batch]:
    return [case.make_batch(seed) for seed in range(first, first + n)]


def queries(case: ModelCase) -> list[Batch]:
    return [case.make_batch(50), case.make_batch(51)]


def log(case: ModelCase, train: list[Any], path: Path, **kwargs: Any) -> hookinf.GradientStore:
    kwargs.setdefault("compress", LOGRA)
    return hookinf.log(case.model, train, kwargs.pop("loss_fn", case.loss_fn), path=path, progress=False, **kwargs)


def assert_same_top(got: hookinf.TopK, expected: hookinf.TopK, what: str) -> None:
    """The same columns and ids in the same order, and the same scores."""
    __tracebackhide__ = True
    for side in ("harmful", "helpful"):
        assert torch.equal(getattr(got, side), getattr(expected, side)), f"{what}: {side} columns"
        close(getattr(got, f"{side}_scores"), getattr(expected, f"{side}_scores"), SAME_TOL, f"{what}: {side} scores")
        got_ids, expected_ids = getattr(got, f"{side}_ids"), getattr(expected, f"{side}_ids")
        if isinstance(expected_ids, Tensor):
            assert torch.equal(got_ids, expected_ids), f"{what}: {side} ids"
        else:
            assert got_ids == expected_ids, f"{what}: {side} ids"


def assert_parts(got: hookinf.Retrieved, dense: hookinf.Scores, what: str) -> None:
    """Each chosen entry's per-layer parts are the dense per-layer scores there, and sum to its score."""
    __tracebackhide__ = True
    for side in ("harmful", "helpful"):
        columns, parts = getattr(got, side), getattr(got, f"{side}_parts")
        assert list(parts) == list(dense.layers), what
        for layer, part in parts.items():
            close(part, dense.per_layer[layer].gather(1, columns), SAME_TOL, f"{what}: {side} part {layer}")
        close(sum(parts.values()), getattr(got, f"{side}_scores"), SAME_TOL, f"{what}: {side} parts sum")


# ---------------------------------------------------------------------------------------------------- ranking
def test_top_entries_breaks_ties_by_column() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (6, 30), generator=gen).double()  # many ties
    columns = torch.stack([torch.randperm(30, generator=gen) for _ in range(6)])
    for k in (1, 5, 30):
        for largest in (True, False):
            at = top_entries(values, columns, k, largest=largest)
            for row in range(6):
                sign = -1.0 if largest else 1.0
                order = sorted(range(30), key=lambda j: (sign * float(values[row, j]), int(columns[row, j])))[:k]
                assert at[row].tolist() == order, (k, largest, row)


# ---------------------------------------------------------------------------------------------------- streaming
def shuffled_ids(n_batches: int, size: int) -> Iterator[list[int]]:
    """Ids in a shuffled order (sparse, so the columns are ranks, not ids), one batch at a time."""
    ids = [3 * i + 100 for i in range(n_batches * size)]
    random.Random(0).shuffle(ids)
    for b in range(n_batches):
        yield ids[b * size : (b + 1) * size]


@pytest.mark.parametrize("k", [1, 3, 24, 30])
def test_top_k_on_data_equals_dense_top_k(k: int) -> None:
    case = mlp()
    train, query = batches(case, 6), queries(case)
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="ekfac", progress=False)
    for method in ("exact", "identity", "datainf", curvature):
        kwargs: dict[str, Any] = {"method": method, "progress": False}
        dense = hookinf.influence(case.model, train, query, case.loss_fn, **kwargs)
        got = hookinf.top_k(case.model, train, query, case.loss_fn, k=k, **kwargs)
        label = f"{getattr(method, 'method', method)} k={k}"
        assert_same_top(got, dense.top_k(k), label)
        assert_parts(got, dense, label)
        assert got.method == dense.method, label
        assert got.damping == dense.damping, label
        assert got.n_train == 24, label


@pytest.mark.parametrize("flush_every", [1, 6, 10**6])
def test_top_k_on_a_store_equals_dense_top_k(tmp_path: Path, flush_every: int) -> None:
    case = mlp()
    train, query = batches(case, 6), queries(case)
    ids = shuffled_ids(6, 4)
    store = log(case, train, tmp_path / "int", ids=lambda batch: next(ids), flush_every=flush_every)
    strings = iter([[f"doc-{i:03d}" for i in b] for b in shuffled_ids(6, 4)])
    named = log(case, train, tmp_path / "str", ids=lambda batch: next(strings), flush_every=flush_every)
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="kfac", compress=LOGRA, progress=False)
    for source in (store, named):
        for method in ("exact", curvature):
            dense = hookinf.influence(case.model, source, query, case.loss_fn, method=method, progress=False)
            for k in (1, 5, 40):
                got = hookinf.top_k(case.model, source, query, case.loss_fn, k=k, method=method, progress=False)
                label = f"{source.id_kind} ids, {getattr(method, 'method', method)}, k={k}"
                assert_same_top(got, dense.top_k(k), label)
                assert_parts(got, dense, label)


def test_ties_go_to_the_smaller_column_in_both_paths(tmp_path: Path) -> None:
    case = mlp()
    one, two = case.make_batch(1), case.make_batch(2)
    train = [one, two, one, one]  # examples 0-3, 8-11 and 12-15 tie exactly
    query = queries(case)
    store = log(case, train, tmp_path, flush_every=4)
    dense = hookinf.influence(case.model, store, query, case.loss_fn, method="identity", progress=False)
    assert torch.equal(dense.total[:, 0:4], dense.total[:, 8:12]), "vacuous: the duplicates do not tie"
    for k in (2, 3, 7):
        top = dense.top_k(k)
        got = hookinf.top_k(case.model, store, query, case.loss_fn, k=k, method="identity", progress=False)
        assert_same_top(got, top, f"ties k={k}")
        for side, sign in (("harmful", -1.0), ("helpful", 1.0)):
            for q in range(dense.shape[0]):
                row = dense.total[q]
                expected = sorted(range(16), key=lambda j, r=row, s=sign: (s * float(r[j]), j))[:k]
                assert getattr(top, side)[q].tolist() == expected, (side, q, k)


class Allocations(TorchDispatchMode):
    """The largest storage allocated and the peak bytes alive at once, of the storages made inside (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        results = out if isinstance(out, tuple | list) else (out,)
        for ret, result in zip(func._schema.returns, results, strict=False):
            if ret.alias_info is not None:
                continue  # a view or an in-place result: no new storage
            for tensor in pytree.tree_leaves(result):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    self.largest = max(self.largest, storage.nbytes())
                    self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def test_streaming_memory_is_bounded_by_queries_times_k_plus_chunk(tmp_path: Path) -> None:
    case = mlp()
    query = [case.make_batch(50 + i) for i in range(3)]  # 12 queries
    n_query, k, chunk = 12, 3, 8
    measured = {}
    for n_batches in (10, 40):  # 40 and 160 training examples, shards of 8
        store = log(case, batches(case, n_batches), tmp_path / str(n_batches), flush_every=chunk)
        n_train = 4 * n_batches
        with Allocations() as streaming:
            hookinf.top_k(case.model, store, query, case.loss_fn, k=k, method="identity", progress=False)
        with Allocations() as dense:
            hookinf.influence(case.model, store, query, case.loss_fn, method="identity", progress=False).top_k(k)
        # the float64 score matrix [n_query, n_train] is allocated by the dense path, never by streaming, whose
        # largest tensors are the two layers' [n_query, k + chunk] merges and the int64 ids [n_train]
        assert dense.largest >= 8 * n_query * n_train
        assert streaming.largest <= max(8 * 2 * n_query * (k + chunk), 8 * n_train), (n_train, streaming.largest)
        measured[n_train] = (streaming.peak, dense.peak)
    (small_stream, small_dense), (big_stream, big_dense) = measured[40], measured[160]
    assert big_dense - small_dense >= 8 * n_query * 120  # the float64 score matrix grows with n_train ...
    assert big_stream - small_stream <= 3 * 8 * 120  # ... streaming holds only the ids and their ranks (int64)


def test_top_k_refuses_bad_arguments(tmp_path: Path) -> None:
    case = mlp()
    train, query = batches(case, 2), queries(case)
    store = log(case, train, tmp_path)
    run = {"progress": False, "method": "identity"}
    with pytest.raises(ConfigurationError, match="positive integer"):
        hookinf.top_k(case.model, store, query, case.loss_fn, k=0, **run)
    with pytest.raises(ConfigurationError, match="differs from the store's compressor"):
        hookinf.top_k(case.model, store, query, case.loss_fn, compress=hookinf.LoGra(2, 2), **run)
    with pytest.raises(ConfigurationError, match=r"\[0, 8\)"):
        hookinf.top_k(case.model, store, query, case.loss_fn, k=1, candidates=torch.tensor([[0, 8]] * 8), **run)
    with pytest.raises(ConfigurationError, match="repeat"):
        hookinf.top_k(case.model, store, query, case.loss_fn, k=1, candidates=torch.tensor([[1, 1]] * 8), **run)
    with pytest.raises(ConfigurationError, match="exceeds the 2 candidates"):
        hookinf.top_k(case.model, store, query, case.loss_fn, k=3, candidates=torch.tensor([[0, 1]] * 8), **run)
    with pytest.raises(DataError, match="query is empty"):
        hookinf.top_k(case.model, store, [], case.loss_fn, **run)
    with pytest.raises(DataError, match="train is empty"):
        hookinf.top_k(case.model, [], query, case.loss_fn, **run)


# ---------------------------------------------------------------------------------------------------- preconditioned
@pytest.mark.parametrize("method", ["exact", "kfac", "ekfac"])
def test_a_preconditioned_store_scores_like_influence_with_the_curvature(tmp_path: Path, method: str) -> None:
    case = mlp()
    train, query = batches(case, 6), queries(case)
    ids = shuffled_ids(6, 4)
    store = log(case, train, tmp_path / "store", ids=lambda batch: next(ids), flush_every=5)
    curvature = hookinf.fit(case.model, train, case.loss_fn, method=method, compress=LOGRA, progress=False)
    pre = hookinf.precondition_store(store, curvature, tmp_path / "pre", progress=False)
    assert isinstance(pre, hookinf.PreconditionedStore)
    reopened = hookinf.PreconditionedStore(tmp_path / "pre")
    assert torch.equal(reopened.ids, store.ids)
    assert reopened.record.method == method
    assert reopened.record.lambdas == pytest.approx(curvature.lambdas, rel=1e-15)
    assert reopened.gradients.dtype == curvature.compute_dtype("fc1")
    dense = hookinf.influence(case.model, store, query, case.loss_fn, method=curvature, progress=False)
    assert bool(dense.total.abs().max() > 0), "vacuous comparison"
    # every stored entry: −⟨g_q, (G + λI)⁻¹ g_j⟩ is the dense score −⟨(G + λI)⁻¹ g_q, g_j⟩
    everything = hookinf.top_k(case.model, reopened, query, case.loss_fn, k=24, progress=False)
    for side in ("harmful", "helpful"):
        close(getattr(everything, f"{side}_scores"), dense.total.gather(1, getattr(everything, side)), SIDE_TOL, side)
        assert torch.equal(getattr(everything, f"{side}_ids"), dense.ids[getattr(everything, side)]), side
    for k in (1, 5):
        got = hookinf.top_k(case.model, reopened, query, case.loss_fn, k=k, progress=False)
        top = dense.top_k(k)
        for side in ("harmful", "helpful"):
            assert torch.equal(getattr(got, side), getattr(top, side)), (side, k)
            close(getattr(got, f"{side}_scores"), getattr(top, f"{side}_scores"), SIDE_TOL, f"{side} k={k}")
        assert got.method == method
        assert got.damping == reopened.record.lambdas
    named = hookinf.top_k(case.model, reopened, query, case.loss_fn, k=5, method=curvature, progress=False)
    assert torch.equal(named.harmful, dense.top_k(5).harmful), "the same curvature may be named"


def test_a_preconditioned_store_refuses_what_would_mix_curvatures_or_models(tmp_path: Path) -> None:
    case = mlp()
    train, query = batches(case, 3), queries(case)
    store = log(case, train, tmp_path / "store")
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="exact", compress=LOGRA, progress=False)
    pre = hookinf.precondition_store(store, curvature, tmp_path / "pre", progress=False)
    run: dict[str, Any] = {"progress": False}
    other = curvature.with_damping(hookinf.Damping(absolute=1.0))
    with pytest.raises(StoreError, match="another curvature"):
        hookinf.top_k(case.model, pre, query, case.loss_fn, method=other, **run)
    with pytest.raises(ConfigurationError, match="cannot be applied"):
        hookinf.top_k(case.model, pre, query, case.loss_fn, method="exact", **run)
    with pytest.raises(ConfigurationError, match="damping= cannot change it"):
        hookinf.top_k(case.model, pre, query, case.loss_fn, damping=0.5, **run)
    with pytest.raises(StoreError, match=r"hookinf\.preconditioned-store"):
        hookinf.GradientStore(tmp_path / "pre")  # never preconditioned twice by influence(...)
    source = f"hookinf.GradientStore('{tmp_path / 'store'}')"
    for call in (  # a preconditioned store passed where training data or a store goes: named, with what to pass
        lambda: hookinf.influence(case.model, pre, query, case.loss_fn, **run),  # type: ignore[arg-type]
        lambda: hookinf.self_influence(case.model, pre, case.loss_fn, **run),  # type: ignore[arg-type]
        lambda: hookinf.fit(case.model, pre, case.loss_fn, **run),  # type: ignore[call-overload]
    ):
        with pytest.raises(DataError, match="train is a PreconditionedStore") as info:
            call()
        assert source in str(info.value), info.value
    with pytest.raises(DataError, match=r"train cannot be iterated \(it is of type int\)"):
        hookinf.influence(case.model, 3, query, case.loss_fn, **run)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="another run is there already"):
        hookinf.precondition_store(store, other, tmp_path / "pre", progress=False)
    again = hookinf.precondition_store(store, curvature, tmp_path / "pre", progress=False)  # this run's: as it is
    assert again.record == pre.record
    with pytest.raises(StoreError, match="another directory"):
        hookinf.precondition_store(store, curvature, tmp_path / "store", progress=False)
    plain = hookinf.fit(case.model, train, case.loss_fn, method="exact", progress=False)
    with pytest.raises(hookinf.CompressorMismatchError):
        hookinf.precondition_store(store, plain, tmp_path / "p2", progress=False)
    moved = mlp()
    with torch.no_grad():
        moved.model.fc1.weight.add_(0.01)
    with pytest.raises(StoreError, match="other weights"):
        hookinf.top_k(moved.model, pre, query, case.loss_fn, **run)
    manifest = tmp_path / "pre" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["lambdas"]["fc1"] *= 2
    manifest.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="checksum"):
        hookinf.PreconditionedStore(tmp_path / "pre")
    manifest.unlink()  # as a killed precondition_store leaves it
    with pytest.raises(StoreError, match="did not finish"):
        hookinf.PreconditionedStore(tmp_path / "pre")


# ---------------------------------------------------------------------------------------------------- TF-IDF
TOPICS = {
    0: "cat kitten purr whiskers meow feline paw",
    1: "rocket orbit launch booster fuel thrust stage",
    2: "bread flour yeast dough oven bake crust",
}
FILLER = ["the", "a", "of", "and", "to", "in", "is", "it", "on", "with"]


def texts(n: int, seed: int) -> tuple[list[str], Tensor]:
    rng = random.Random(seed)
    out, labels = [], []
    for _ in range(n):
        topic = rng.randrange(3)
        words = rng.sample(TOPICS[topic].split(), 3) + rng.sample(FILLER, 3)
        if rng.random() < 0.3:  # some noise from another topic
            words += rng.sample(TOPICS[(topic + 1) % 3].split(), 1)
        rng.shuffle(words)
        out.append(" ".join(words))
        labels.append(topic)
    return out, torch.tensor(labels)


VOCAB = sorted({w for t in TOPICS.values() for w in t.split()} | set(FILLER))


def bag(batch_texts: list[str]) -> Tensor:
    x = torch.zeros(len(batch_texts), len(VOCAB), dtype=torch.float64)
    for i, text in enumerate(batch_texts):
        for word in text.split():
            x[i, VOCAB.index(word)] += 1.0
    return x


def text_batches(all_texts: list[str], labels: Tensor, size: int = 8) -> list[Batch]:
    return [(bag(all_texts[i : i + size]), labels[i : i + size]) for i in range(0, len(all_texts), size)]


def bag_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(len(VOCAB), 6), act=nn.Tanh(), fc2=nn.Linear(6, 3))).double()


def ce(model: Any, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_tfidf_candidates_are_the_most_similar_texts() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    train_texts, _ = texts(40, 0)
    query_texts = [*texts(5, 1)[0], train_texts[17]]
    got = tfidf(query_texts, train_texts, 6)
    assert got.shape == (6, 6)
    assert got.dtype == torch.int64
    assert int(got[5, 0]) == 17  # a query that is a training text finds it first
    vectorizer = TfidfVectorizer(sublinear_tf=True)
    train = torch.from_numpy(vectorizer.fit_transform(train_texts).toarray())
    query = torch.from_numpy(vectorizer.transform(query_texts).toarray())
    similarity = (query / query.norm(dim=1, keepdim=True)) @ (train / train.norm(dim=1, keepdim=True)).T
    for q in range(6):
        expected = sorted(range(40), key=lambda j, r=similarity[q]: (-round(float(r[j]), 12), j))[:6]
        assert got[q].tolist() == expected, q
    assert tfidf(query_texts, train_texts[:3], 10).shape == (6, 3)  # clipped to the training texts
    with pytest.raises(ConfigurationError):
        tfidf(query_texts, train_texts, 0)


def test_scoring_only_tfidf_candidates_gives_the_full_top_k_when_it_lies_inside(tmp_path: Path) -> None:
    train_texts, train_labels = texts(96, 0)
    query_texts, query_labels = texts(6, 1)
    model, k = bag_model(), 3
    train, query = text_batches(train_texts, train_labels), text_batches(query_texts, query_labels)
    store = hookinf.log(model, train, ce, compress=hookinf.LoGra(4, 3), path=tmp_path, flush_every=16, progress=False)
    full = hookinf.influence(model, store, query, ce, method="exact", progress=False).top_k(k)
    candidates = tfidf(query_texts, train_texts, 24)
    restricted = hookinf.top_k(model, store, query, ce, k=k, method="exact", candidates=candidates, progress=False)
    assert restricted.n_train == int(torch.unique(candidates).numel())  # the other examples are not scored
    inside = 0
    for side in ("harmful", "helpful"):
        for q in range(len(query_texts)):
            chosen = getattr(restricted, side)[q]
            assert set(chosen.tolist()) <= set(candidates[q].tolist()), (side, q)
            if set(getattr(full, side)[q].tolist()) <= set(candidates[q].tolist()):
                inside += 1
                assert torch.equal(chosen, getattr(full, side)[q]), (side, q)
                close(getattr(restricted, f"{side}_scores")[q], getattr(full, f"{side}_scores")[q], SAME_TOL, side)
    assert inside > 0, "vacuous: no query's true top-k lies inside its TF-IDF candidates"
    # candidates that hold the true top-k of every query, both sides, give the full top-k for every query
    gen = torch.Generator().manual_seed(0)
    padded = []
    for q in range(len(query_texts)):
        keep = set(full.harmful[q].tolist()) | set(full.helpful[q].tolist())
        others = [j for j in torch.randperm(96, generator=gen).tolist() if j not in keep]
        padded.append(sorted(keep) + others[: 12 - len(keep)])
    both = hookinf.top_k(model, store, query, ce, k=k, method="exact", candidates=torch.tensor(padded), progress=False)
    assert_same_top(both, full, "candidates holding the true top-k")
    on_data = hookinf.top_k(model, train, query, ce, k=k, method="exact", compress=hookinf.LoGra(4, 3),
                            candidates=torch.tensor(padded), progress=False)  # fmt: skip
    assert_same_top(on_data, full, "candidates on data")


# ---------------------------------------------------------------------------------------------------- FAISS
def test_faiss_index_recall_against_streaming_top_k(tmp_path: Path) -> None:
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'hookinf[faiss]')")
    from hookinf.faiss_index import FaissIndex

    case = mlp()
    train, query = batches(case, 100), queries(case)  # 400 examples
    store = log(case, train, tmp_path / "store", flush_every=64)
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="ekfac", compress=LOGRA, progress=False)
    pre = hookinf.precondition_store(store, curvature, tmp_path / "pre", progress=False)
    k = 10
    exact = hookinf.top_k(case.model, pre, query, case.loss_fn, k=k, progress=False)
    flat = FaissIndex.build(pre, kind="flat").top_k(case.model, query, case.loss_fn, k=k, progress=False)
    for side in ("harmful", "helpful"):
        assert torch.equal(getattr(flat, side), getattr(exact, side)), side  # exact search: the same entries
        assert torch.equal(getattr(flat, f"{side}_ids"), getattr(exact, f"{side}_ids")), side
        close(getattr(flat, f"{side}_scores").double(), getattr(exact, f"{side}_scores"), F32_TOL, side)
    exhaustive = FaissIndex.build(pre, kind="ivf", nlist=8, nprobe=8)  # every cell searched: exact again
    assert torch.equal(exhaustive.top_k(case.model, query, case.loss_fn, k=k, progress=False).harmful, exact.harmful)
    approximate = FaissIndex.build(pre, kind="ivf", nlist=16, nprobe=4)
    found = approximate.top_k(case.model, query, case.loss_fn, k=k, progress=False)
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found.harmful, exact.harmful, strict=True))
    assert hits / exact.harmful.numel() > 0.5  # a quarter of the cells still finds most of the top 10
