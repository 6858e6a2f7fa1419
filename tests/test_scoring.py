"""Per-token scores and low-rank query gradients (scoring straight from the captured factors)."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES, assert_close

import hookinf
from hookinf import ConfigurationError, HookinfError, watch

# float64 throughout; the per-token and low-rank paths reorder the same sums (or, at full rank, reconstruct the
# query matrix from its SVD to ~1e-15), so they agree with the dense reference to far better than 1e-10.
RTOL = 1e-10


def _batches(case, n=3):
    return [case.make_batch(seed) for seed in range(n)]


@pytest.mark.parametrize("case_id", ["seq-linear", "gpt2-conv1d"])
@pytest.mark.parametrize("method", ["identity", "ekfac"])
def test_per_token_scores_sum_to_example_scores_and_match_brute_force(case_id, method):
    case = MODEL_CASES[case_id]()
    train, query = _batches(case), [case.make_batch(10)]
    kwargs = {"modules": case.modules, "method": method, "progress": False}
    scores = hookinf.influence(case.model, train, query, case.loss_fn, per_token=True, **kwargs)
    plain = hookinf.influence(case.model, train, query, case.loss_fn, **kwargs)
    assert scores.per_token is not None
    for name, part in scores.per_token.items():
        assert_close(part.sum(dim=2), plain.per_layer[name], rtol=RTOL, what=name)
    assert_close(scores.token_scores().sum(dim=2), plain.total, rtol=RTOL, what="total")
    # brute force for the identity method: −δ_tᵀ Q a_t with Q the query's gradient matrix
    if method == "identity":
        with watch(case.model, modules=case.modules, loss_reduction="sum") as w:
            case.losses(query[0]).sum().backward()
            q = w.last_step.gradients()
            case.model.zero_grad(set_to_none=True)
            case.losses(train[0]).sum().backward()
            step = w.last_step
        case.model.zero_grad(set_to_none=True)
        for name, capture in step.layers.items():
            expected = -torch.einsum("qoi,bso,bsi->qbs", q[name].double(), capture.delta.double(), capture.a.double())
            got = scores.per_token[name][:, : capture.batch_size, : capture.a.shape[1]]
            assert_close(got, expected, rtol=RTOL, what=f"{name} per token")


def test_per_token_refuses_layers_with_different_positions():
    case = MODEL_CASES["conv2d"]()
    with pytest.raises(ConfigurationError, match="same positions") as exc:
        hookinf.influence(
            case.model, _batches(case, 1), _batches(case, 1), case.loss_fn, per_token=True, progress=False
        )
    assert isinstance(exc.value, HookinfError)


def test_scores_without_per_token_have_no_token_split():
    case = MODEL_CASES["mlp-bias"]()
    scores = hookinf.influence(case.model, _batches(case, 1), _batches(case, 1), case.loss_fn, progress=False)
    assert scores.per_token is None
    with pytest.raises(ConfigurationError, match="per_token=True"):
        scores.token_scores()


@pytest.mark.parametrize("case_id", ["mlp-bias", "seq-linear", "conv2d"])
def test_full_rank_query_equals_exact_and_rank_k_equals_explicit_truncation(case_id):
    case = MODEL_CASES[case_id]()
    train, query = _batches(case), [case.make_batch(10)]
    exact = hookinf.influence(case.model, train, query, case.loss_fn, method="exact", progress=False)
    full = hookinf.influence(case.model, train, query, case.loss_fn, method="exact", query_rank=10_000, progress=False)
    assert_close(full.total, exact.total, rtol=RTOL, what="full rank")
    # rank 1: explicit truncation of every preconditioned query matrix, then dense scoring
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="exact", progress=False)
    low = hookinf.influence(case.model, train, query, case.loss_fn, method=curvature, query_rank=1, progress=False)
    with watch(case.model, loss_reduction="sum") as w:
        case.losses(query[0]).sum().backward()
        q = w.last_step.gradients()
        case.model.zero_grad(set_to_none=True)
        expected = {}
        for name in w.layers:
            pre = curvature.apply(name, q[name])
            u, s, vh = torch.linalg.svd(pre, full_matrices=False)
            truncated = (u[..., :1] * s[..., None, :1]) @ vh[..., :1, :]
            parts = []
            for batch in train:
                case.losses(batch).sum().backward()
                g = w.last_step.layers[name].gradients().double()
                case.model.zero_grad(set_to_none=True)
                parts.append(-torch.einsum("qoi,boi->qb", truncated, g))
            expected[name] = torch.cat(parts, dim=1)
    for name, part in expected.items():
        assert_close(low.per_layer[name], part, rtol=RTOL, what=f"rank-1 {name}")


def test_bad_query_rank_is_refused():
    case = MODEL_CASES["mlp-bias"]()
    with pytest.raises(ConfigurationError, match="query_rank"):
        hookinf.influence(case.model, _batches(case, 1), _batches(case, 1), case.loss_fn, query_rank=0, progress=False)
