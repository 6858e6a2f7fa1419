"""Example ids: integers or strings, kept as given; refused where they would silently change.

String ids (document ids, a dataset's ``id`` column) go into stores and come back in ``Scores.ids`` as given; a
non-integer float id (which ``int()`` would truncate, merging two examples) is refused with the value named; a store
holds one kind of id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import close
from test_store import LOGRA, SAME_TOL, batches, contents, log, mlp

import hookinf
from hookinf import DataError, StoreError
from hookinf.ids import as_ids, concat, sort_order, take

DOCS = [f"doc-{i:02d}-é" for i in range(12)]  # non-ASCII on purpose


# ---------------------------------------------------------------------------------------------------- the front door
@pytest.mark.parametrize(
    "values",
    [[3, 1, 2], (3, 1, 2), range(3, 0, -1), np.array([3, 1, 2]), torch.tensor([[3], [1], [2]], dtype=torch.int32)],
    ids=["list", "tuple", "range", "numpy", "tensor"],
)
def test_integer_ids_become_int64_on_the_host(values: object) -> None:
    ids = as_ids(values, "ids")
    assert isinstance(ids, torch.Tensor)
    assert ids.dtype == torch.int64
    assert ids.tolist() == ([3, 2, 1] if isinstance(values, range) else [3, 1, 2])


def test_whole_floats_are_integers_and_other_floats_are_refused() -> None:
    assert as_ids([4.0, 2.0], "ids").tolist() == [4, 2]  # type: ignore[union-attr]
    assert as_ids(torch.tensor([7.0]), "ids").tolist() == [7]  # type: ignore[union-attr]
    for bad, shown in (([1.0, 2.5], "2.5"), (torch.tensor([0.5]), "0.5"), ([float("nan")], "nan"), ([2.0**60], "1.15")):
        with pytest.raises(DataError, match=f"id {shown}.* is not a whole number") as info:
            as_ids(bad, "w.tag(ids)")
        assert "w.tag(ids)" in str(info.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["a", 1], "mix strings and numbers"),
        ([True, False], "not booleans"),
        (torch.tensor([True]), "torch.bool"),
        ("doc-1", "not the single value"),
        ([b"a"], "integers or strings"),
    ],
    ids=["mixed", "bools", "bool-tensor", "one-string", "bytes"],
)
def test_ids_that_are_neither_integers_nor_strings_are_refused(values: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        as_ids(values, "ids")


def test_string_ids_are_kept_as_given() -> None:
    assert as_ids(("b", "a"), "ids") == ["b", "a"]
    assert as_ids(np.array(["b", "a"]), "ids") == ["b", "a"]
    assert as_ids(np.array(["b", "a"], dtype=object), "ids") == ["b", "a"]
    ids = ["c", "a", "b", "a2"]
    assert sort_order(ids).tolist() == [1, 3, 2, 0]
    assert take(ids, torch.tensor([2, 0])) == ["b", "c"]
    assert concat([["x"], ["y", "z"]]) == ["x", "y", "z"]
    with pytest.raises(DataError, match="integer and string ids"):
        concat([["x"], torch.tensor([1])])


def test_log_refuses_a_non_integer_float_id_naming_it(tmp_path: Path) -> None:
    case = mlp()
    with pytest.raises(DataError, match=r"id 1\.5 is not a whole number"):
        log(case, batches(case, 1), tmp_path, ids=lambda batch: [0.0, 1.5, 3.0, 4.0])


# ---------------------------------------------------------------------------------------------------- stores
def string_store(tmp_path: Path) -> tuple[hookinf.GradientStore, dict[str, torch.Tensor]]:
    """A store of the mlp's layers holding 12 examples under string ids, appended in three shards."""
    case = mlp()
    reference = log(case, batches(case, 3), tmp_path / "reference", flush_every=4)
    _, grads = contents(reference)
    store = hookinf.GradientStore.create(
        tmp_path / "strings",
        compressor=reference.compressor,
        layers=reference.layers,
        original=reference.original,
        dtype=reference.dtype,
        fingerprint=reference.fingerprint,
    )
    with store:
        for first in (0, 4, 8):
            store.append(DOCS[first : first + 4], {name: g[first : first + 4] for name, g in grads.items()})
    return store, grads


def test_a_store_keeps_string_ids(tmp_path: Path) -> None:
    store, grads = string_store(tmp_path)
    opened = hookinf.GradientStore(store.path)
    assert opened.id_kind == "str"
    assert opened.ids == DOCS
    chunk_ids, chunk = next(iter(opened.chunks()))
    assert chunk_ids == DOCS[:4]
    for name, tensor in chunk.items():
        assert torch.equal(tensor, grads[name][:4]), name
    check = opened.verify()
    assert (check.examples, check.checksummed) == (12, 3)
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert (manifest["ids"], manifest["version"]) == ("str", 2)


def test_a_store_holds_one_kind_of_id_and_each_once(tmp_path: Path) -> None:
    store, grads = string_store(tmp_path)
    one = {name: g[:1] for name, g in grads.items()}
    with pytest.raises(StoreError, match="holds str ids and these are int ids"):
        store.append(torch.tensor([100]), one)
    with pytest.raises(StoreError, match="id 'doc-03-é' is already stored"):
        store.append(["doc-03-é"], one)
    case = mlp()
    ints = log(case, batches(case, 1), tmp_path / "ints")
    with pytest.raises(StoreError, match="holds int ids and these are str ids"):
        ints.append(["new"], one)
    assert hookinf.GradientStore(store.path).ids == DOCS


# ---------------------------------------------------------------------------------------------------- scores
def test_scores_keep_string_ids_through_save_and_load(tmp_path: Path) -> None:
    scores = hookinf.Scores({"fc1": torch.arange(6.0).reshape(2, 3)}, method="exact", ids=["b", "a", "c"])
    loaded = hookinf.load_scores(scores.save(tmp_path / "scores"))
    assert loaded.ids == ["b", "a", "c"]
    if _has_pandas():
        assert loaded.to_pandas()["id"].tolist() == ["b", "a", "c"] * 2
    with pytest.raises(hookinf.ConfigurationError, match="2 ids for 3 columns"):
        hookinf.Scores({"fc1": torch.zeros(2, 3)}, method="exact", ids=["a", "b"])
    with pytest.raises(hookinf.ConfigurationError, match="int64"):
        hookinf.Scores({"fc1": torch.zeros(2, 3)}, method="exact", ids=torch.tensor([0.0, 1.0, 2.0]))


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- end to end


def test_log_and_influence_with_string_ids(tmp_path: Path) -> None:
    case = mlp()
    train = batches(case, 3)
    names = iter([DOCS[i] for i in (8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7)])  # logged out of order
    store = log(case, train, tmp_path / "store", ids=lambda batch: [next(names) for _ in range(4)])
    assert store.ids == [DOCS[i] for i in (8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7)]
    scores = hookinf.influence(case.model, store, [case.make_batch(50)], case.loss_fn, progress=False)
    assert scores.ids == DOCS  # columns sorted by id
    positions = log(case, train, tmp_path / "positions")
    by_position = hookinf.influence(case.model, positions, [case.make_batch(50)], case.loss_fn, progress=False)
    close(scores.total[:, 8:], by_position.total[:, :4], SAME_TOL, "the first batch's columns")  # DOCS[8:] = 0..3
    close(scores.total[:, :8], by_position.total[:, 4:], SAME_TOL, "the other columns")


def test_watch_tags_string_ids_and_refuses_float_ids(tmp_path: Path) -> None:
    case = mlp()
    with hookinf.watch(case.model, log_to=tmp_path / "store", compress=LOGRA, modules=case.modules) as w:
        w.tag(DOCS[:4])
        case.loss_fn(case.model, batches(case, 1)[0]).mean().backward()
        with pytest.raises(DataError, match="not a whole number"):
            w.tag([0.5, 1.0, 2.0, 3.0])
    assert hookinf.GradientStore(tmp_path / "store").ids == DOCS[:4]
