import pytest
import torch
from sklearn.metrics import roc_auc_score

from hookinf import ConfigurationError, HookinfError
from hookinf.metrics import auc


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_auc_matches_sklearn(ties):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(200, generator=gen)
    if ties:
        scores = scores.round()
    positives = torch.rand(200, generator=gen) < 0.2
    assert auc(scores, positives) == pytest.approx(roc_auc_score(positives.numpy(), scores.numpy()), abs=1e-12)


def test_auc_needs_both_classes():
    with pytest.raises(ConfigurationError, match="at least one positive") as exc:
        auc(torch.ones(3), torch.zeros(3, dtype=torch.bool))
    assert isinstance(exc.value, HookinfError)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_roc_curve_matches_sklearn_and_its_area_is_the_auc(ties):
    from sklearn.metrics import roc_curve as sk_roc_curve

    from hookinf.metrics import roc_curve

    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(300, generator=gen, dtype=torch.float64)
    if ties:
        scores = scores.round()
    positives = torch.rand(300, generator=gen) < 0.15
    fpr, tpr = roc_curve(scores, positives)
    expected_fpr, expected_tpr, _ = sk_roc_curve(positives.numpy(), scores.numpy(), drop_intermediate=False)
    assert fpr.dtype == tpr.dtype == torch.float64
    assert fpr.shape == (scores.unique().numel() + 1,)
    torch.testing.assert_close(fpr, torch.from_numpy(expected_fpr), rtol=0, atol=1e-15)
    torch.testing.assert_close(tpr, torch.from_numpy(expected_tpr), rtol=0, atol=1e-15)
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(auc(scores, positives), abs=1e-12)
    with pytest.raises(ConfigurationError, match="roc_curve needs at least one positive"):
        roc_curve(scores, torch.zeros(300, dtype=torch.bool))
