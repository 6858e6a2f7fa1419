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
