"""hookinf.CrossEntropy and the sampled (true) Fisher."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hookinf
from hookinf import ConfigurationError, CrossEntropy, DataError, HookinfError


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


def test_mismatched_logits_and_labels_are_refused():
    bad = CrossEntropy(logits=lambda m, b: torch.randn(2, 5, 3), target=lambda b: torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match=r"logits \[2, 5, 3\] do not match labels \[2\]"):
        bad(None, None)


@pytest.mark.parametrize("method", ["exact", "kfac", "ekfac"])
def test_sampled_fisher_is_the_fit_at_labels_drawn_from_the_model(classifier, method):
    """fisher='sampled' equals an empirical fit on the same batches relabelled by the same seeded draws."""
    model, batches = classifier
    sampled = hookinf.fit(model, batches, CE, method=method, fisher="sampled", progress=False)

    def relabel():  # hookinf seeds each pass's draws with 0, in batch order: every pass draws the same labels
        generator = torch.Generator().manual_seed(0)
        out = []
        for x, _ in batches:
            with torch.no_grad():
                probs = torch.softmax(model(x).double(), dim=-1)
            out.append((x, torch.multinomial(probs, 1, generator=generator).view(-1)))
        return out

    relabelled = relabel()
    if method == "ekfac":  # factors and correction from the same sampled gradients
        basis = hookinf.fit(model, relabelled, CE, method="kfac", progress=False)
        expected = hookinf.fit(model, relabelled, CE, method=hookinf.EKFAC(basis=basis), progress=False)
    else:
        expected = hookinf.fit(model, relabelled, CE, method=method, progress=False)
    for key, value in expected.tensors.items():
        torch.testing.assert_close(sampled.tensors[key], value, rtol=1e-12, atol=1e-14)
    empirical = hookinf.fit(model, batches, CE, method=method, progress=False)
    assert any(not torch.allclose(empirical.tensors[k], sampled.tensors[k]) for k in empirical.tensors)


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
