"""Attribution-quality metrics: Spearman, the linear datamodeling score, subset retraining, detection AUCs."""

import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import hookinf
from hookinf import ConfigurationError, HookinfError, Scores
from hookinf.metrics import LDSResult, auc, detection_aucs, lds, lds_per_layer, spearman
from hookinf.retrain import retrain_subsets

DTYPE = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_masks(n_subsets, n_train, seed):
    return torch.rand(n_subsets, n_train, generator=_gen(seed)) < 0.5


def _linear_datamodel(n_query=6, n_train=30, n_subsets=40, seed=0):
    """True per-example effects ``w`` and losses that are exactly additive in them: ``L = masks @ wᵀ``."""
    gen = _gen(seed)
    w = torch.randn(n_query, n_train, generator=gen, dtype=DTYPE)
    masks = torch.rand(n_subsets, n_train, generator=gen) < 0.5
    return w, masks, masks.to(DTYPE) @ w.T


# ---------------------------------------------------------------------------------------------------- spearman
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_spearman_matches_scipy(ties):
    gen = _gen(1)
    x = torch.randn(7, 25, generator=gen, dtype=DTYPE)
    y = x + torch.randn(7, 25, generator=gen, dtype=DTYPE)
    if ties:
        x, y = (2 * x).round(), (2 * y).round()
    rho = spearman(x, y)  # along the last dim
    assert rho.shape == (7,)
    assert rho.dtype == DTYPE
    for row in range(7):
        expected = spearmanr(x[row].numpy(), y[row].numpy()).statistic
        assert float(rho[row]) == pytest.approx(expected, abs=1e-12)
    along_first = spearman(x.T, y.T, dim=0)
    torch.testing.assert_close(along_first, rho, rtol=0, atol=1e-14)


def test_spearman_of_a_monotone_map_is_exactly_one():
    x = torch.randn(4, 50, generator=_gen(2), dtype=DTYPE).round()  # with ties
    assert torch.equal(spearman(x, x.pow(3) + 5), torch.ones(4, dtype=DTYPE))
    assert torch.equal(spearman(x, -x), -torch.ones(4, dtype=DTYPE))


def test_spearman_of_a_constant_row_is_nan():
    x = torch.randn(3, 10, generator=_gen(3), dtype=DTYPE)
    y = x.clone()
    y[1] = 4.0
    x[2] = -1.0
    rho = spearman(x, y)
    assert float(rho[0]) == 1.0
    assert math.isnan(float(rho[1]))
    assert math.isnan(float(rho[2]))


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "message"),
    [
        (torch.zeros(3, 4), torch.zeros(4, 3), {}, r"x \[3, 4\] and y \[4, 3\] must have the same shape"),
        (torch.zeros(3, 4), torch.zeros(3, 4), {"dim": 2}, r"dim=2 is out of range"),
        (torch.zeros(3, 1), torch.zeros(3, 1), {}, r"at least 2 values along dim=-1"),
        (torch.tensor([1.0, math.nan]), torch.tensor([1.0, 2.0]), {}, r"x holds NaN"),
        ([1.0, 2.0], torch.tensor([1.0, 2.0]), {}, r"x must be a torch.Tensor; got list"),
    ],
    ids=["shapes", "dim", "too-short", "nan", "not-a-tensor"],
)
def test_spearman_rejects_bad_input(x, y, kwargs, message):
    with pytest.raises(ConfigurationError, match=message) as exc:
        spearman(x, y, **kwargs)
    assert isinstance(exc.value, HookinfError)


# ---------------------------------------------------------------------------------------------------- lds
def test_lds_of_an_exact_linear_datamodel_is_one():
    w, masks, losses = _linear_datamodel()
    result = lds(w, masks, losses)
    assert isinstance(result, LDSResult)
    assert result.mean == 1.0
    assert torch.equal(result.per_query, torch.ones(6, dtype=DTYPE))
    assert result.skipped == 0
    # the opposite sign convention (positive = helpful) is perfectly wrong
    assert lds(-w, masks, losses).mean == -1.0
    # a positive rescaling and a per-query offset of the losses change nothing (only ranks count)
    shifted = 0.01 * losses + torch.arange(6, dtype=DTYPE)
    assert lds(w, masks, shifted).mean == 1.0
    # predicting with the left-out examples instead flips the sign: Σ_{j∉S} = Σ_j − Σ_{j∈S}
    assert lds(w, ~masks, losses).mean == -1.0


def test_lds_with_noise_and_of_random_scores():
    w, masks, losses = _linear_datamodel(n_query=20, n_train=40, n_subsets=200, seed=4)
    noisy = losses + 0.3 * torch.randn(losses.shape, generator=_gen(5), dtype=DTYPE)
    assert 0.8 < lds(w, masks, noisy).mean < 1.0
    random_scores = torch.randn(w.shape, generator=_gen(6), dtype=DTYPE)
    assert abs(lds(random_scores, masks, losses).mean) < 0.15


def test_lds_skips_constant_rows_and_says_so():
    w, masks, losses = _linear_datamodel(n_query=5, seed=7)
    w[1] = 0.0  # no influence at all: the prediction is constant across subsets
    losses[:, 3] = 2.5  # the retrained models all have the same loss on query 3
    result = lds(w, masks, losses)
    assert result.skipped == 2
    assert math.isnan(float(result.per_query[1]))
    assert math.isnan(float(result.per_query[3]))
    kept = result.per_query[[0, 2, 4]]
    assert torch.equal(kept, torch.ones(3, dtype=DTYPE))
    assert result.mean == 1.0
    assert "skipped=2" in repr(result)
    everything_constant = lds(torch.zeros_like(w), masks, losses)
    assert everything_constant.skipped == 5
    assert math.isnan(everything_constant.mean)
    assert "skipped=5" in repr(everything_constant)


def test_lds_result_repr():
    w, masks, losses = _linear_datamodel(n_query=3)
    text = repr(lds(w, masks, losses))
    assert text.startswith("LDSResult(mean=1.0000, n_query=3, skipped=0")
    assert "median 1.0000" in text


def test_lds_accepts_scores_and_per_layer():
    w, masks, losses = _linear_datamodel(n_query=8, n_train=40, n_subsets=150, seed=8)
    noise = torch.randn(w.shape, generator=_gen(9), dtype=DTYPE)
    scores = Scores(per_layer={"carries": w, "noise": noise}, method="exact")
    assert lds(scores, masks, losses).mean == lds(w + noise, masks, losses).mean
    per_layer = lds_per_layer(scores, masks, losses)
    assert list(per_layer) == ["carries", "noise"]
    assert per_layer["carries"].mean == 1.0
    assert abs(per_layer["noise"].mean) < 0.2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"masks": torch.ones(4, 9, dtype=torch.bool)}, r"subset_masks cover 9 training examples but .* n_train=10"),
        ({"masks": torch.ones(4, 10)}, r"subset_masks must be a bool tensor .* got torch.float32"),
        ({"masks": torch.ones(10, dtype=torch.bool)}, r"subset_masks must be \[n_subsets, n_train\]; got shape \[10\]"),
        ({"losses": torch.zeros(3, 2)}, r"subset_masks has 4 subsets \(rows\) but subset_query_losses has 3"),
        ({"losses": torch.zeros(4, 3)}, r"subset_query_losses has 3 queries \(columns\) but .* n_query=2"),
        ({"losses": torch.zeros(4)}, r"subset_query_losses must be \[n_subsets, n_query\]"),
        ({"losses": torch.full((4, 2), math.nan)}, r"subset_query_losses hold 8 NaN or infinite values"),
        ({"scores": torch.zeros(2, 10, 1)}, r"scores must be \[n_query, n_train\]; got shape \[2, 10, 1\]"),
        ({"scores": torch.full((2, 10), math.inf)}, r"lds: scores hold 20 NaN or infinite values"),
        ({"scores": "oops"}, r"scores must be hookinf.Scores or a \[n_query, n_train\] tensor; got str"),
        (
            {"masks": torch.ones(1, 10, dtype=torch.bool), "losses": torch.zeros(1, 2)},
            r"lds needs at least 2 subsets to rank; got 1",
        ),
    ],
    ids=[
        "n-train",
        "float-masks",
        "1d-masks",
        "n-subsets",
        "n-query",
        "1d-losses",
        "nan-losses",
        "3d-scores",
        "inf-scores",
        "str-scores",
        "one-subset",
    ],
)
def test_lds_rejects_bad_input(change, message):
    args = {"scores": torch.zeros(2, 10), "masks": torch.ones(4, 10, dtype=torch.bool), "losses": torch.zeros(4, 2)}
    args.update(change)
    with pytest.raises(ConfigurationError, match=message) as exc:
        lds(args["scores"], args["masks"], args["losses"])
    assert isinstance(exc.value, HookinfError)


def test_lds_per_layer_needs_scores():
    with pytest.raises(ConfigurationError, match=r"lds_per_layer needs hookinf.Scores .* got Tensor"):
        lds_per_layer(torch.zeros(2, 10), torch.ones(4, 10, dtype=torch.bool), torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------------------- retrain_subsets
def test_retrain_subsets_masks_and_losses():
    calls = []

    def train_fn(mask):
        calls.append(mask.clone())
        mask[:] = False  # a copy: this must not change the returned masks
        return torch.stack([calls[-1].sum().to(DTYPE), calls[-1][:5].sum().to(DTYPE)])

    masks, losses = retrain_subsets(train_fn, 11, n_subsets=7, fraction=0.3, seed=3, progress=True)
    assert masks.shape == (7, 11)
    assert masks.dtype == torch.bool
    assert torch.equal(masks.sum(dim=1), torch.full((7,), round(0.3 * 11)))
    assert torch.equal(torch.stack(calls), masks)  # called once per mask, in order
    assert losses.shape == (7, 2)
    assert losses.dtype == DTYPE
    assert torch.equal(losses[:, 1], masks[:, :5].sum(dim=1).to(DTYPE))
    assert len({tuple(row.tolist()) for row in masks}) > 1


def test_retrain_subsets_is_reproducible_and_leaves_the_global_rng_alone():
    def train_fn(mask):
        return torch.randn(3)  # uses the global RNG, which must not move the masks

    torch.manual_seed(0)
    first, _ = retrain_subsets(train_fn, 20, n_subsets=5, seed=11, progress=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(123)
    second, _ = retrain_subsets(train_fn, 20, n_subsets=5, seed=11, progress=False)
    other, _ = retrain_subsets(train_fn, 20, n_subsets=5, seed=12, progress=False)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    torch.random.set_rng_state(state)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([torch.zeros(3), torch.zeros(3), torch.zeros(4)], r"returned 4 query losses for subset 2 but 3 for subset 0"),
        ([torch.zeros(3, 1)], r"shape \[n_query\]; subset 0 returned shape \[3, 1\]"),
        ([torch.tensor(1.0)], r"subset 0 returned shape \[\] \(for a single query return shape \[1\]\)"),
        ([torch.zeros(2), torch.tensor([0.0, math.nan])], r"train_fn's losses for subset 1 hold 1 NaN"),
        ([1.5], r"subset 0 returned float"),
    ],
    ids=["changing-n-query", "2d", "scalar", "nan", "not-a-tensor"],
)
def test_retrain_subsets_checks_train_fn_output(outputs, message):
    returned = iter(outputs)
    with pytest.raises(ConfigurationError, match=message) as exc:
        retrain_subsets(lambda mask: next(returned), 10, n_subsets=5, progress=False)
    assert isinstance(exc.value, HookinfError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_subsets": 1}, r"n_subsets=1 must be at least 2"),
        ({"fraction": 1.0}, r"fraction=1.0 must be a number strictly between 0 and 1"),
        ({"fraction": 0.01}, r"fraction=0.01 of n_train=10 rounds to 0 examples per subset"),
        ({"fraction": 0.98}, r"rounds to 10 examples per subset"),
        ({"n_subsets": 2.5}, r"n_subsets=2.5 must be an integer"),
    ],
    ids=["one-subset", "fraction-one", "rounds-to-none", "rounds-to-all", "float-count"],
)
def test_retrain_subsets_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        retrain_subsets(lambda mask: torch.zeros(1), 10, progress=False, **kwargs)


# ---------------------------------------------------------------------------------------------------- regression
def _ridge_problem(n_train=100, n_query=12, scales=(3.0, 1.0, 0.3, 0.1), sigma=0.5, seed=0):
    """Linear regression with anisotropic features; returns design matrices with a ones column for the bias."""
    gen = _gen(seed)
    scale = torch.tensor(scales, dtype=DTYPE)
    d = len(scales)
    x = torch.randn(n_train, d, generator=gen, dtype=DTYPE) * scale
    w_true = torch.randn(d, generator=gen, dtype=DTYPE)
    y = x @ w_true + 0.3 + sigma * torch.randn(n_train, generator=gen, dtype=DTYPE)
    xq = torch.randn(n_query, d, generator=gen, dtype=DTYPE) * scale
    yq = xq @ w_true + 0.3 + sigma * torch.randn(n_query, generator=gen, dtype=DTYPE)
    return x, y, xq, yq


def _with_ones(x):
    return torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], dim=1)


def test_lds_of_exact_influence_on_ridge_regression_with_real_retraining():
    """Retraining is exact: θ(S) = argmin Σ_{i∈S} ½(θ·x̃_i − y_i)² + ½ λ‖θ‖², solved in closed form.

    Removing an example sets its weight in that sum from 1 to 0, so first-order influence predicts
    L_q(S) ≈ const + Σ_{j∈S} I(q, j) with I(q, j) = −g_qᵀ H⁻¹ g_j, H = X̃ᵀX̃ + λI.

    hookinf's ``exact`` does not use H but the damped empirical Fisher G + λ_h I, G = (1/n) Σ_i r_i² x̃_i x̃_iᵀ (the
    Gauss-Newton block of ½ r² is x̃ x̃ᵀ, without the r_i²). With homoscedastic noise r_i² ≈ mean(r²) = s, so
    G ≈ (s/n) X̃ᵀX̃, and with λ_h = s λ / n the damped Fisher is ≈ (s/n) H: a positive multiple, which Spearman
    ignores. Its LDS should then be close to that of the true-Hessian influence — which is itself below 1, since
    dropping half the data is far outside the first-order regime.
    """
    ridge = 1.0
    x, y, xq, yq = _ridge_problem()
    n_train, d = x.shape
    design, design_q = _with_ones(x), _with_ones(xq)

    def fit(mask):
        a, t = design[mask], y[mask]
        return torch.linalg.solve(a.T @ a + ridge * torch.eye(d + 1, dtype=DTYPE), a.T @ t)

    def train_fn(mask):
        theta = fit(mask)
        return 0.5 * (design_q @ theta - yq).pow(2)

    theta = fit(torch.ones(n_train, dtype=torch.bool))
    model = nn.Linear(d, 1).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_(theta[:d].view(1, d))
        model.bias.copy_(theta[d:])

    def loss_fn(m, batch):
        inputs, targets = batch
        return 0.5 * (m(inputs).squeeze(-1) - targets).pow(2)

    train, query = [(x[:50], y[:50]), (x[50:], y[50:])], [(xq, yq)]
    mean_sq_residual = float((design @ theta - y).pow(2).mean())
    damping = hookinf.Damping(absolute=mean_sq_residual * ridge / n_train)
    exact = hookinf.influence(model, train, query, loss_fn, method="exact", damping=damping, progress=False)
    identity = hookinf.influence(model, train, query, loss_fn, method="identity", progress=False)

    hessian = design.T @ design + ridge * torch.eye(d + 1, dtype=DTYPE)
    g_train = (design @ theta - y)[:, None] * design
    g_query = (design_q @ theta - yq)[:, None] * design_q
    true_influence = -(g_query @ torch.linalg.solve(hessian, g_train.T))

    masks, losses = retrain_subsets(train_fn, n_train, n_subsets=60, seed=0, progress=False)
    result = lds(exact, masks, losses)
    flipped = lds(-exact.total, masks, losses)
    reference = lds(true_influence, masks, losses).mean
    without_curvature = lds(identity, masks, losses).mean

    assert result.skipped == 0
    assert result.mean > 0.5, result
    assert torch.equal(flipped.per_query, -result.per_query)  # the wrong sign is exactly as bad
    assert abs(result.mean - reference) < 0.1, (result.mean, reference)
    # the features' scales span 30×, so dropping the curvature (TracIn-style dot products) ranks subsets worse
    assert result.mean > without_curvature + 0.15, (result.mean, without_curvature)
    assert result.mean > -without_curvature + 1.0  # far above identity with the sign negated
    assert lds_per_layer(exact, masks, losses)[""].mean == result.mean  # the model is one layer, named ""


# ---------------------------------------------------------------------------------------------------- detection
def test_detection_aucs():
    gen = _gen(10)
    n_train = 200
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[torch.randperm(n_train, generator=gen)[:20]] = True
    self_influence = torch.randn(n_train, generator=gen, dtype=DTYPE) + 3 * flipped
    # flipped examples are harmful on average (positive influence); clean ones slightly helpful
    total = torch.randn(15, n_train, generator=gen, dtype=DTYPE) + 2.0 * flipped - 0.2
    scores = Scores(per_layer={"a": 0.25 * total, "b": 0.75 * total}, method="exact")

    both = detection_aucs(self_influence, scores, flipped)
    assert list(both) == ["self_influence", "mean_query_influence"]
    assert both["self_influence"] == auc(self_influence, flipped)
    assert both["self_influence"] > 0.9
    assert both["mean_query_influence"] == pytest.approx(auc(total.mean(dim=0), flipped), abs=1e-12)
    assert both["mean_query_influence"] > 0.9
    assert detection_aucs(None, total, flipped) == pytest.approx({"mean_query_influence": both["mean_query_influence"]})
    assert list(detection_aucs(self_influence, None, flipped)) == ["self_influence"]
    # helpful-positive scores (the other sign convention) rank the flips last
    assert detection_aucs(None, -total, flipped)["mean_query_influence"] < 0.1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((None, None, torch.zeros(4, dtype=torch.bool)), r"needs self_influence, scores or both; both are None"),
        ((torch.zeros(5), None, torch.zeros(4, dtype=torch.bool)), r"self_influence has shape \[5\] but flipped"),
        ((None, torch.zeros(2, 5), torch.zeros(4, dtype=torch.bool)), r"scores are \[n_query=2, n_train=5\] but"),
        ((torch.zeros(4), None, torch.zeros(4)), r"flipped must be a bool tensor; got torch.float32"),
        ((torch.zeros(4), None, torch.zeros(4, dtype=torch.bool)), r"at least one positive and one negative"),
    ],
    ids=["nothing", "self-shape", "scores-shape", "float-flipped", "no-positives"],
)
def test_detection_aucs_rejects_bad_input(args, message):
    with pytest.raises(ConfigurationError, match=message) as exc:
        detection_aucs(*args)
    assert isinstance(exc.value, HookinfError)
