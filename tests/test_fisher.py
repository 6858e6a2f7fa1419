"""hookinf.CrossEntropy and the sampled (true) Fisher."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hookinf
from hookinf import ConfigurationError, CrossEntropy, DataError, HookinfError, Sampler
from hookinf.losses import draw_labels
from hookinf.methods.kfac import KFACCurvature, KFACFactors


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    return model, [(x[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5)]


CE = CrossEntropy(logits=lambda model, batch: model(batch[0]), target=lambda batch: batch[1])


def test_cross_entropy_is_per_example_cross_entropy(classifier):
    model, batches = classifier
    x, y = batches[0]
    torch.testing.assert_close(CE(model, (x, y)), F.cross_entropy(model(x), y, reduction="none"))


def test_sequence_cross_entropy_shifts_ignores_padding_and_reduces_per_example():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5))
    ids[1, 3:] = -100  # padding
    summed = CrossEntropy(logits=lambda m, b: logits, target=lambda b: ids, shift=True)
    mean = CrossEntropy(logits=lambda m, b: logits, target=lambda b: ids, shift=True, per_example="mean")
    tokens = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none").view(2, 4)
    torch.testing.assert_close(summed(None, None), tokens.sum(1))
    torch.testing.assert_close(mean(None, None), tokens.sum(1) / torch.tensor([4.0, 2.0], dtype=torch.float64))


def test_sampled_sequence_labels_keep_the_padding():
    """Padding stays padding: positions with a dominant class cost ~0, uniform padding positions would cost log 7."""
    logits = torch.zeros(2, 5, 7, dtype=torch.float64)
    logits[..., 3] = 60.0
    logits[1, 2:4] = 0.0  # the positions whose shifted labels are padding
    ids = torch.randint(0, 7, (2, 5))
    ids[1, 3:] = -100
    for per_example in ("sum", "mean"):
        loss = CrossEntropy(logits=lambda m, b: logits, target=lambda b: ids, shift=True, per_example=per_example)
        sampled = loss.sampled(None, None, Sampler(0))
        assert sampled.shape == (2,)
        assert float(sampled.abs().max()) < 1e-12


def test_mismatched_logits_and_labels_are_refused():
    bad = CrossEntropy(logits=lambda m, b: torch.randn(2, 5, 3), target=lambda b: torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match=r"logits \[2, 5, 3\] do not match labels \[2\]"):
        bad(None, None)


def relabel(model, batches, seed, index):
    """The batches with the labels pass ``index`` of a fit seeded with ``seed`` draws (in batch order)."""
    sampler = Sampler.for_pass(seed, index)
    out = []
    for x, _ in batches:
        with torch.no_grad():
            logits = model(x)
        out.append((x, draw_labels(logits, sampler.generator(logits.device))))
    return out


@pytest.mark.parametrize("method", ["exact", "kfac", "ekfac"])
def test_sampled_fisher_is_the_fit_at_labels_drawn_from_the_model(classifier, method):
    """fisher='sampled' equals an empirical fit on the same batches relabelled by pass k's draws (seed, k)."""
    model, batches = classifier
    sampled = hookinf.fit(model, batches, CE, method=method, fisher="sampled", seed=5, progress=False)
    first, second = relabel(model, batches, 5, 0), relabel(model, batches, 5, 1)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))  # each pass draws afresh
    if method == "ekfac":  # factors from pass 0's draws, the correction from pass 1's (not a replay of pass 0)
        basis = hookinf.fit(model, first, CE, method="kfac", progress=False)
        expected = hookinf.fit(model, second, CE, method=hookinf.EKFAC(basis=basis), progress=False)
    else:
        expected = hookinf.fit(model, first, CE, method=method, progress=False)
    for key, value in expected.tensors.items():
        torch.testing.assert_close(sampled.tensors[key], value, rtol=1e-12, atol=1e-14)
    empirical = hookinf.fit(model, batches, CE, method=method, progress=False)
    assert any(not torch.allclose(empirical.tensors[k], sampled.tensors[k]) for k in empirical.tensors)


def test_a_sampled_fit_is_reproducible_by_its_seed_and_runs_the_model_on_every_pass(classifier):
    model, batches = classifier
    forwards = []

    def logits(model, batch):
        forwards.append(len(batch[0]))
        return model(batch[0])

    counting = CrossEntropy(logits=logits, target=lambda batch: batch[1])

    def fit(seed):
        return hookinf.fit(model, batches, counting, method="ekfac", fisher="sampled", seed=seed, progress=False)

    first = fit(0)
    assert len(forwards) == 2 * len(batches)  # the step cache (on by default) does not replay sampled draws
    again, other = fit(0), fit(1)
    for key, value in first.tensors.items():
        assert torch.equal(value, again.tensors[key]), key
    for layer in ("0", "2"):
        assert torch.equal(first.stat(layer, "A"), other.stat(layer, "A"))  # activations do not depend on labels
        assert not torch.equal(first.stat(layer, "S"), other.stat(layer, "S"))
        assert not torch.equal(first.stat(layer, "eigen"), other.stat(layer, "eigen"))


@pytest.mark.parametrize("bad", ["0", 1.5, True, None])
def test_the_seed_must_be_an_integer(classifier, bad):
    model, batches = classifier
    with pytest.raises(ConfigurationError, match=r"seed=.*integer"):
        hookinf.fit(model, batches, CE, method="kfac", fisher="sampled", seed=bad, progress=False)
    with pytest.raises(ConfigurationError, match=r"seed=.*integer"):
        hookinf.self_influence(model, batches, CE, method="identity", fisher="sampled", seed=bad, progress=False)


class Dtypes(TorchDispatchMode):
    """Records the dtypes of every tensor the aten calls in its block produce."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen |= {t.dtype for t in (out if isinstance(out, tuple | list) else [out]) if isinstance(t, torch.Tensor)}
        return out


def test_draws_follow_the_softmax_in_float32_without_any_float64():
    """Gumbel-max frequencies match softmax(z) within 5 standard errors (binomial); no float64 for low precision."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, -30.0]]).expand(200_000, 5)
    probs = torch.softmax(logits[0].double(), dim=0)
    for dtype in (torch.float32, torch.bfloat16):
        with Dtypes() as dtypes:
            labels = draw_labels(logits.to(dtype), torch.Generator().manual_seed(0))
        assert torch.float64 not in dtypes.seen, dtypes.seen
        assert torch.float32 in dtypes.seen, dtypes.seen
        assert labels.dtype == torch.int64
        assert labels.shape == (200_000,)
        freq = torch.bincount(labels, minlength=5).double() / 200_000
        se = (probs * (1 - probs) / 200_000).sqrt()
        assert ((freq - probs).abs() <= 5 * se + 1e-12).all(), (dtype, freq, probs)
    assert Sampler.for_pass(0, 0).seed != Sampler.for_pass(0, 1).seed != Sampler.for_pass(1, 0).seed


def test_sampled_fisher_converges_to_the_true_fisher():
    """Averaged over many draws, the sampled block approaches Σ_c p_c g_c g_cᵀ (the true Fisher)."""
    torch.manual_seed(2)
    model = nn.Linear(3, 4, bias=False).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    batches = [(x.expand(500, 3), torch.zeros(500, dtype=torch.long))] * 8
    curvature = hookinf.fit(model, batches, CE, method="exact", fisher="sampled", progress=False)
    estimate = curvature.stat("", "gram") / curvature.num_examples
    probs = torch.softmax(model(x), dim=-1)[0].detach()
    truth = torch.zeros(12, 12, dtype=torch.float64)
    for c in range(4):
        delta = probs - F.one_hot(torch.tensor(c), 4).double()
        g = torch.outer(delta, x[0]).flatten()
        truth += probs[c] * torch.outer(g, g)
    # Monte Carlo with 4,000 draws: relative error of order 1/sqrt(4000) ≈ 1.6%, so 10% of the largest entry is safe.
    assert (estimate - truth).abs().max() < 0.1 * truth.abs().max()


# -------------------------------------------------------------- convergence to the expected (true) Fisher
# A 2-layer MLP, 5 classes, 40 examples (float64). Each fit sees every example COPIES times (one independent draw
# each), and SEEDS fits are averaged: DRAWS = 400 draws per example. The sampled sums are unbiased for the exact
# expectations over y ~ softmax(logits), and each entry of their average has the standard error sqrt(Var / DRAWS),
# with Var the exact variance of one draw per example (computed over the classes too). Every entry is a mean of
# 16,000 independent terms (40 examples x 400 draws), so it is close to normal, and |z| < 5 fails with probability
# about 6e-7 per entry, under 1e-4 over the ~60 entries checked. Checking 100 and 400 draws checks that the error
# shrinks like 1/sqrt(draws); the empirical Fisher (given labels) fails the same check.
N, CLASSES, COPIES, SEEDS = 40, 5, 100, 4
DRAWS = COPIES * SEEDS


@pytest.fixture
def tiny():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, CLASSES)).double()
    x = torch.randn(N, 4, dtype=torch.float64)
    train = [(x.repeat(COPIES // 4, 1), torch.zeros(N * COPIES // 4, dtype=torch.long))] * 4  # COPIES per example
    return model, x, train


def per_class(model, x):
    """Activations ``{layer: [n, I]}`` (ones column last), output gradients ``{layer: [C, n, O]}`` at each label c
    (by backpropagating class c's loss), and the model's probabilities ``[n, C]``."""
    z1 = model[0](x)
    h = model[1](z1)
    z2 = model[2](h)
    grads = [
        torch.autograd.grad(F.cross_entropy(z2, torch.full((N,), c), reduction="sum"), (z1, z2), retain_graph=True)
        for c in range(CLASSES)
    ]
    ones = torch.ones(N, 1, dtype=torch.float64)
    a = {"0": torch.cat([x, ones], dim=1), "2": torch.cat([h.detach(), ones], dim=1)}
    deltas = {"0": torch.stack([g[0] for g in grads]), "2": torch.stack([g[1] for g in grads])}
    return a, deltas, torch.softmax(z2, dim=1).detach()


def moments(values, probs):
    """Exact mean and variance of ``Σ_i values[y_i, i]`` with ``y_i ~ probs[i]`` independent: ``values [C, n, ...]``."""
    weights = probs.T.reshape(*probs.T.shape, *[1] * (values.dim() - 2))  # [C, n, 1, ...]
    mean = (weights * values).sum(dim=0)
    return mean.sum(dim=0), ((weights * values.square()).sum(dim=0) - mean.square()).sum(dim=0)


def max_z(estimate, mean, var, draws):
    """The largest ``|estimate − mean|`` in standard errors ``sqrt(var / draws)`` (entries of zero variance: 0/0)."""
    se = (var / draws).sqrt()
    return float(((estimate - mean).abs() / (se + 1e-9 * se.max())).max())


def test_sampled_kfac_factors_converge_to_the_expected_fisher(tiny):
    model, x, train = tiny
    a, deltas, probs = per_class(model, x)
    fits = [
        hookinf.fit(model, train, CE, method="kfac", fisher="sampled", seed=seed, progress=False)
        for seed in range(SEEDS)
    ]
    for layer in ("0", "2"):
        outer = deltas[layer][:, :, :, None] * deltas[layer][:, :, None, :]  # [C, n, O, O]
        mean, var = moments(outer, probs)
        sums = [fit.stat(layer, "S") for fit in fits]
        assert max_z(sums[0] / COPIES, mean, var, COPIES) < 5, layer
        assert max_z(sum(sums) / DRAWS, mean, var, DRAWS) < 5, layer
        given = deltas[layer][torch.randint(0, CLASSES, (N,)), torch.arange(N)]  # at labels not from the model
        assert max_z(given.T @ given, mean, var, DRAWS) > 5, layer  # the check tells the empirical Fisher apart
        torch.testing.assert_close(fits[0].stat(layer, "A") / COPIES, a[layer].T @ a[layer], rtol=1e-12, atol=0)


def test_sampled_ekfac_correction_converges_to_its_expectation_in_a_fixed_basis(tiny):
    """In the eigenbasis of the exact expected K-FAC factors, E[Λ] = Σ_i E_y[(Q_Sᵀ δ_iy a_iᵀ Q_A)²]."""
    model, x, train = tiny
    a, deltas, probs = per_class(model, x)
    layout = hookinf.fit(model, train[:1], CE, method="kfac", progress=False)
    state = {}
    for layer in ("0", "2"):
        s_mean, _ = moments(deltas[layer][:, :, :, None] * deltas[layer][:, :, None, :], probs)
        state[layer] = KFACFactors(a[layer].T @ a[layer], s_mean, torch.tensor(float(N), dtype=torch.float64))
    basis = KFACCurvature(layout.layers, layout.damping, N, state)
    fits = [
        hookinf.fit(model, train, CE, method=hookinf.EKFAC(basis=basis), fisher="sampled", seed=seed, progress=False)
        for seed in range(SEEDS)
    ]
    for layer in ("0", "2"):
        _, q_a, _, q_s = basis.eigenbasis(layer)
        rotated = (deltas[layer] @ q_s)[:, :, :, None] * (a[layer] @ q_a)[None, :, None, :]  # [C, n, O, I]
        mean, var = moments(rotated.square(), probs)
        sums = [fit.stat(layer, "eigen") for fit in fits]
        assert max_z(sums[0] / COPIES, mean, var, COPIES) < 5, layer
        assert max_z(sum(sums) / DRAWS, mean, var, DRAWS) < 5, layer


def test_sampled_fisher_needs_a_samplable_loss(classifier):
    model, batches = classifier

    def plain(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(ConfigurationError, match=r"hookinf\.CrossEntropy") as exc:
        hookinf.fit(model, batches, plain, method="kfac", fisher="sampled", progress=False)
    assert isinstance(exc.value, HookinfError)
    with pytest.raises(ConfigurationError, match="'empirical', 'sampled'"):
        hookinf.fit(model, batches, CE, method="kfac", fisher="true", progress=False)


def test_scores_use_the_given_labels_whatever_the_fisher(classifier):
    model, batches = classifier
    identity_a = hookinf.influence(model, batches, batches[:1], CE, method="identity", fisher="sampled", progress=False)
    identity_b = hookinf.influence(model, batches, batches[:1], CE, method="identity", progress=False)
    torch.testing.assert_close(identity_a.total, identity_b.total)
