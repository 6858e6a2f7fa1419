"""Results carry ids: ``TopK``'s ids of the chosen columns, and ``SelfScores`` (per layer, total, ids, top-k)."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console

import hookinf
from hookinf import ConfigurationError, Scores, SelfScores
from hookinf.metrics import auc, detection_aucs
from hookinf.report import suspects_section, suspects_table

F64 = torch.float64


def parts(n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"fc1": torch.rand(n, generator=gen, dtype=F64), "fc2": 2 * torch.rand(n, generator=gen, dtype=F64)}


# ---------------------------------------------------------------------------------------------------- TopK ids
def test_top_k_gives_the_ids_of_the_chosen_columns():
    gen = torch.Generator().manual_seed(1)
    per_layer = {"a": torch.randn(3, 8, generator=gen, dtype=F64), "b": torch.randn(3, 8, generator=gen, dtype=F64)}
    plain = Scores(per_layer, "exact").top_k(3)
    assert torch.equal(plain.harmful_ids, plain.harmful)  # no ids: the ids are the columns
    assert torch.equal(plain.helpful_ids, plain.helpful)
    ids = torch.arange(100, 108) * 7
    top = Scores(per_layer, "exact", ids=ids).top_k(3)
    assert torch.equal(top.harmful_ids, ids[top.harmful])
    assert torch.equal(top.helpful_ids, ids[top.helpful])
    names = [f"doc-{j}" for j in range(8)]
    named = Scores(per_layer, "exact", ids=names).top_k(3)
    assert named.harmful_ids == [[names[j] for j in row] for row in named.harmful.tolist()]
    assert named.helpful_ids == [[names[j] for j in row] for row in named.helpful.tolist()]
    assert len(named.harmful_ids) == 3
    assert all(len(row) == 3 for row in named.helpful_ids)


# ---------------------------------------------------------------------------------------------------- SelfScores
def test_self_scores_sum_their_layers_and_read_like_the_total():
    per_layer = parts()
    values = SelfScores(per_layer, "exact", damping={"fc1": 0.1, "fc2": 0.2})
    torch.testing.assert_close(values.total, per_layer["fc1"] + per_layer["fc2"])
    assert values.total.dtype == F64
    assert values.layers == ("fc1", "fc2")
    assert len(values) == 12
    assert values.shape == (12,)
    assert values[3] == values.total[3]
    assert values.tolist() == values.total.tolist()
    top = values.topk(4)
    expected = values.total.topk(4)
    assert torch.equal(top.values, expected.values)
    assert torch.equal(top.indices, expected.indices)
    assert torch.equal(top.ids, expected.indices)  # no ids: the positions
    assert values.topk(100).indices.numel() == 12  # at most n
    shares = values.layer_shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["fc1"] == pytest.approx(float(per_layer["fc1"].sum() / values.total.sum()))
    assert repr(values).splitlines()[0] == "SelfScores(method='exact', n=12, layers=2)"
    assert "fc2" in repr(values)


def test_self_scores_topk_carries_the_store_ids():
    int_ids = torch.arange(12) * 10 + 5
    top = SelfScores(parts(), "exact", ids=int_ids).topk(3)
    assert torch.equal(top.ids, int_ids[top.indices])
    names = [f"doc-{j:02d}" for j in range(12)]
    named = SelfScores(parts(), "exact", ids=names).topk(3)
    assert named.ids == [names[j] for j in named.indices.tolist()]


@pytest.mark.parametrize(
    ("per_layer", "kwargs", "message"),
    [
        ({}, {}, "at least one layer"),
        ({"a": torch.zeros(3), "b": torch.zeros(4)}, {}, "must all be [n]"),
        ({"a": torch.zeros(3, 2)}, {}, "must all be [n]"),
        ({"a": torch.zeros(3)}, {"ids": torch.arange(4)}, "must be int64 [3]"),
        ({"a": torch.zeros(3)}, {"ids": ["x", "y"]}, "2 ids for 3 columns"),
    ],
)
def test_bad_self_scores_are_configuration_errors(per_layer, kwargs, message):
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        SelfScores(per_layer, "exact", **kwargs)
    with pytest.raises(ConfigurationError, match=r"topk\(k=0\)"):
        SelfScores(parts(), "exact").topk(0)


def test_metrics_and_reports_take_self_scores():
    values = SelfScores(parts(), "exact")
    flipped = torch.zeros(12, dtype=torch.bool)
    flipped[values.topk(3).indices] = True
    assert auc(values, flipped) == auc(values.total, flipped) == 1.0
    assert detection_aucs(values, None, flipped) == {"self_influence": 1.0}
    # ids that are not the positions would not line up with labels indexed by position: refused, with the fix
    shuffled = SelfScores(parts(), "exact", ids=torch.arange(12) + 100)
    with pytest.raises(ConfigurationError, match=re.escape("flipped[values.ids]")):
        auc(shuffled, flipped)
    assert auc(SelfScores(parts(), "exact", ids=torch.arange(12)), flipped) == 1.0  # dataset positions: fine
    # the suspects table shows (and describes) the ids
    named = SelfScores(parts(), "exact", ids=[f"doc-{j}" for j in range(12)])
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(suspects_table(named, k=2, describe=lambda who: f"about {who}"))
    text = console.file.getvalue()
    first = named.topk(1).ids[0]
    assert "train id" in text
    assert f"about {first}" in text
    pytest.importorskip("matplotlib")
    section = suspects_section(named, k=2)
    assert f'data-train="{first}"' in section.body


def test_self_influence_from_a_store_carries_its_ids(tmp_path):
    from conftest import MODEL_CASES

    case = MODEL_CASES["mlp-bias"]()
    train = [case.make_batch(seed) for seed in range(2)]
    position = iter(range(100))  # string ids out of order: 7k mod 13 for the k-th example
    store = hookinf.log(
        case.model, train, case.loss_fn, compress=hookinf.LoGra(2, 2), path=tmp_path / "s",
        ids=lambda batch: [f"ex-{7 * next(position) % 13:02d}" for _ in range(len(batch[0]))], progress=False,
    )  # fmt: skip
    values = hookinf.self_influence(case.model, store, case.loss_fn, method="exact", progress=False)
    assert store.ids != sorted(store.ids)
    assert values.ids == sorted(store.ids)
    top = values.topk(2)
    assert top.ids == [values.ids[j] for j in top.indices.tolist()]
    assert values.method == "exact"
    assert set(values.damping) == set(values.layers)


# ---------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize(
    "ids", [None, torch.arange(12) * 3, [f"doc-{j}" for j in range(12)]], ids=["none", "int", "str"]
)
def test_self_scores_save_and_load_bit_for_bit(tmp_path, ids):
    scores = SelfScores(parts(), "ekfac", damping={"fc1": 0.5, "fc2": 0.25}, ids=ids)
    assert scores.save(tmp_path / "self") == tmp_path / "self"
    loaded = hookinf.load_self_scores(tmp_path / "self")
    assert loaded.layers == scores.layers
    assert loaded.method == "ekfac"
    assert loaded.damping == scores.damping
    for name in scores.layers:
        assert torch.equal(loaded.per_layer[name], scores.per_layer[name])
    assert torch.equal(loaded.total, scores.total)
    if isinstance(ids, torch.Tensor):
        assert torch.equal(loaded.ids, ids)
    else:
        assert loaded.ids == ids
    scores.save(tmp_path / "self")  # a second save replaces the first: one tensor file
    assert len(list((tmp_path / "self").glob("*.safetensors"))) == 1


def test_damaged_or_edited_self_scores_are_refused(tmp_path):
    path = SelfScores(parts(), "exact").save(tmp_path / "self")
    manifest = path / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"exact"', '"kfac"'))
    with pytest.raises(hookinf.HookinfError, match="checksum"):
        hookinf.load_self_scores(path)
    manifest.write_text(text)
    tensors = next(path.glob("*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))
    with pytest.raises(hookinf.HookinfError, match="SHA-256"):
        hookinf.load_self_scores(path)
    with pytest.raises(hookinf.HookinfError, match="no hookinf self-influence"):
        hookinf.load_self_scores(tmp_path / "nothing")
    Scores({"fc1": torch.zeros(2, 3)}, "exact").save(tmp_path / "pairwise")
    with pytest.raises(hookinf.HookinfError, match=r"hookinf\.self-scores"):
        hookinf.load_self_scores(tmp_path / "pairwise")  # pairwise scores are not self-influence
