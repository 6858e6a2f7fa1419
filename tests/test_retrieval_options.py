"""``hookinf.top_k`` with ``per_token=True`` and ``query_rank=k``, against ``hookinf.influence`` with the same options.

Oracles: ``influence(..., per_token=True)`` (its ``per_token`` at the chosen columns: streaming must keep exactly
those per-token parts, padded the same way) and ``influence(..., query_rank=k).top_k`` (streaming must choose the
same entries with the same scores). Tolerance ``SAME_TOL`` of ``test_retrieval``: the same float64 contractions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_CASES, ModelCase, close
from test_retrieval import LOGRA, SAME_TOL, assert_parts, assert_same_top, batches, log, mlp, queries
from torch import Tensor

import hookinf
from hookinf import ConfigurationError


def sequences() -> tuple[ModelCase, list[tuple[Tensor, ...]], list[tuple[Tensor, ...]]]:
    """conftest's ``seq-linear`` (batches [4, 5, 6] → per-position losses summed), one training batch cut to 3
    positions so the per-token parts are padded."""
    case = MODEL_CASES["seq-linear"]()
    train = [case.make_batch(seed) for seed in range(1, 7)]
    x, y = train[2]
    train[2] = (x[:, :3].contiguous(), y[:, :3].contiguous())
    return case, train, [case.make_batch(50), case.make_batch(51)]


def at_columns(tokens: Tensor, columns: Tensor) -> Tensor:
    """``tokens`` ``[n_query, n_train, T]`` at ``columns`` ``[n_query, k]``: ``[n_query, k, T]``."""
    return tokens.gather(1, columns[..., None].expand(-1, -1, tokens.shape[2]))


@pytest.mark.parametrize("compress", [None, LOGRA], ids=["uncompressed", "logra"])
def test_per_token_parts_of_the_top_k_are_those_of_influence(compress: hookinf.Compressor | None) -> None:
    case, train, query = sequences()
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="kfac", compress=compress, progress=False)
    for method in ("exact", curvature):
        run: dict[str, Any] = {"method": method, "compress": compress, "progress": False}
        dense = hookinf.influence(case.model, train, query, case.loss_fn, per_token=True, **run)
        assert dense.per_token is not None
        for k in (3, 24):  # k = 24: every example, the cut batch's padded ones included
            got = hookinf.top_k(case.model, train, query, case.loss_fn, k=k, per_token=True, **run)
            label = f"{getattr(method, 'method', method)} k={k}"
            assert_same_top(got, dense.top_k(k), label)
            assert_parts(got, dense, label)
            assert got.harmful_tokens is not None
            assert got.helpful_tokens is not None
            for side, tokens in (("harmful", got.harmful_tokens), ("helpful", got.helpful_tokens)):
                assert list(tokens) == list(dense.layers), label
                for layer, part in tokens.items():
                    assert part.shape == (8, k, 5), (label, part.shape)
                    expected = at_columns(dense.per_token[layer], getattr(got, side))
                    close(part, expected, SAME_TOL, f"{label}: {side} tokens of {layer}")
                    close(part.sum(dim=2), getattr(got, f"{side}_parts")[layer], SAME_TOL, f"{label}: Σ_t")
        cut = (got.harmful >= 8) & (got.harmful < 12)  # the cut batch's examples: positions 3 and 4 are padding
        assert bool(cut.any()), "vacuous: no example of the cut batch among the chosen"
        for part in got.harmful_tokens.values():
            assert bool((part[..., 3:][cut] == 0).all())
    plain = hookinf.top_k(case.model, train, query, case.loss_fn, k=3, compress=compress, progress=False)
    assert plain.harmful_tokens is None
    assert plain.helpful_tokens is None


def test_per_token_with_candidates_keeps_the_candidates_tokens() -> None:
    case, train, query = sequences()
    dense = hookinf.influence(case.model, train, query, case.loss_fn, method="identity", per_token=True, progress=False)
    assert dense.per_token is not None
    candidates = torch.stack([torch.randperm(24, generator=torch.Generator().manual_seed(q))[:6] for q in range(8)])
    got = hookinf.top_k(case.model, train, query, case.loss_fn, k=2, method="identity", candidates=candidates,
                        per_token=True, progress=False)  # fmt: skip
    assert got.harmful_tokens is not None
    for q in range(8):
        assert set(got.harmful[q].tolist()) <= set(candidates[q].tolist())
    for layer, part in got.harmful_tokens.items():
        close(part, at_columns(dense.per_token[layer], got.harmful), SAME_TOL, f"candidates: tokens of {layer}")


def test_query_rank_top_k_equals_influence_query_rank_top_k(tmp_path: Path) -> None:
    case = mlp()
    train, query = batches(case, 6), queries(case)
    store = log(case, train, tmp_path, flush_every=6)
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="kfac", progress=False)
    compressed = hookinf.fit(case.model, train, case.loss_fn, method="kfac", compress=LOGRA, progress=False)
    # fc1's query matrices are [7, 6] (uncompressed) or [2, 3] (LoGra(3, 2)): ranks 1 and 2 are approximations
    cases = [(train, "exact", (1, 2)), (train, curvature, (1, 2)), (store, "exact", (1,)), (store, compressed, (1,))]
    for source, method, ranks in cases:
        where = "store" if isinstance(source, hookinf.GradientStore) else "data"
        full = hookinf.influence(case.model, source, query, case.loss_fn, method=method, progress=False)
        for rank in ranks:
            dense = hookinf.influence(
                case.model, source, query, case.loss_fn, method=method, query_rank=rank, progress=False
            )
            assert not torch.allclose(dense.total, full.total), "vacuous: the rank-k queries are exact"
            for k in (1, 5):
                got = hookinf.top_k(
                    case.model, source, query, case.loss_fn, k=k, method=method, query_rank=rank, progress=False
                )
                label = f"{where} {getattr(method, 'method', method)} rank {rank} k={k}"
                assert_same_top(got, dense.top_k(k), label)
                assert_parts(got, dense, label)


def test_per_token_and_query_rank_are_refused_where_they_have_no_meaning(tmp_path: Path) -> None:
    case = mlp()
    train, query = batches(case, 2), queries(case)
    store = log(case, train, tmp_path / "store")
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="exact", compress=LOGRA, progress=False)
    pre = hookinf.precondition_store(store, curvature, tmp_path / "pre", progress=False)
    run: dict[str, Any] = {"progress": False}
    for source in (store, pre):
        with pytest.raises(ConfigurationError, match="a gradient store keeps each example's gradient summed"):
            hookinf.top_k(case.model, source, query, case.loss_fn, per_token=True, **run)
    # influence too: it used to split a stored gradient over its compressed columns as if they were tokens
    with pytest.raises(ConfigurationError, match="a gradient store keeps each example's gradient summed"):
        hookinf.influence(case.model, store, query, case.loss_fn, method=curvature, per_token=True, **run)
    with pytest.raises(ConfigurationError, match=r"per_token.*Gaussian.*LoGra"):
        hookinf.top_k(case.model, train, query, case.loss_fn, per_token=True, compress=hookinf.Gaussian(4), **run)
    with pytest.raises(ConfigurationError, match="the queries are never preconditioned"):
        hookinf.top_k(case.model, pre, query, case.loss_fn, query_rank=1, **run)
    with pytest.raises(ConfigurationError, match="query_rank=0 must be a positive integer"):
        hookinf.top_k(case.model, train, query, case.loss_fn, method="identity", query_rank=0, **run)
