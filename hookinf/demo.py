"""The embedded demo: find flipped labels in scikit-learn's bundled digits with an MLP.

It trains a small MLP on 1,200 digits of which 10% have a (seeded) wrong label, computes self-influence and the
influence of every training example on a held-out set with ``exact`` and ``identity``, and prints a report: the top
suspects, the detection AUC against the known flips, and each layer's share of the influence. Everything is
bundled (no download) and it runs in seconds on a laptop CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.panel import Panel
from torch import Tensor, nn

from hookinf.errors import ConfigurationError
from hookinf.helpers import influence, self_influence
from hookinf.metrics import auc
from hookinf.report.terminal import comparison_table, suspects_table
from hookinf.scores import Scores
from hookinf.self_scores import SelfScores

METHODS = ("exact", "identity")


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured.

    Attributes:
        auc: method → AUC of self-influence for detecting the flipped labels.
        harmful_auc: method → AUC of the summed influence on the held-out loss for the same task.
        scores: method → held-out influence :class:`~hookinf.Scores`.
        self_influence: method → self-influence (:class:`~hookinf.SelfScores`, per layer and ``total``).
        flipped: ``[n_train]`` booleans, the flipped labels.
        test_accuracy: held-out accuracy of the trained model.
    """

    auc: dict[str, float]
    harmful_auc: dict[str, float]
    scores: dict[str, Scores]
    self_influence: dict[str, SelfScores]
    flipped: Tensor
    test_accuracy: float


def flipped_digits(
    seed: int = 0, n_train: int = 1200, flip_fraction: float = 0.1
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits (8×8 images as 64 features in [0, 1]) with a seeded fraction of training labels flipped.

    Args:
        seed: seeds the split and the flips.
        n_train: training examples; the rest of the 1,797 digits are held out.
        flip_fraction: fraction of training labels replaced by a (uniformly drawn) wrong class.

    Returns:
        ``(x_train [n, 64], y_train (with flips), y_train_true, x_test, y_test, flipped [n] bool)``, float64 features.
    """
    try:
        from sklearn.datasets import load_digits  # examples extra; imported here so `import hookinf` stays light
    except ImportError as err:
        raise ConfigurationError(
            "the demo trains on scikit-learn's bundled digits, and scikit-learn is not installed: "
            "pip install 'hookinf[examples]'."
        ) from err

    gen = torch.Generator().manual_seed(seed)
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float64) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=gen)
    train_idx, test_idx = order[:n_train], order[n_train:]
    y_train = y[train_idx].clone()
    n_flip = round(flip_fraction * n_train)
    flip_idx = torch.randperm(n_train, generator=gen)[:n_flip]
    y_train[flip_idx] = (y_train[flip_idx] + torch.randint(1, 10, (n_flip,), generator=gen)) % 10
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[flip_idx] = True
    return x[train_idx], y_train, y[train_idx], x[test_idx], y[test_idx], flipped


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def run(
    *,
    seed: int = 0,
    n_train: int = 1200,
    flip_fraction: float = 0.1,
    epochs: int = 30,
    console: Console | None = None,
) -> DemoResult:
    """Trains the MLP, computes influence with each method and prints the report.

    Args:
        seed: seeds the split, the flips, the initialisation and the batch order.
        n_train: training examples (the rest of the 1,797 digits are held out).
        flip_fraction: fraction of training labels replaced by a wrong class.
        epochs: training epochs (Adam, batches of 64).
        console: where to print (``None``: the terminal).
    """
    console = console or Console()
    x_train, y_train, y_true, x_test, y_test, flipped = flipped_digits(seed, n_train, flip_fraction)
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(hidden=nn.Linear(64, 32), relu=nn.ReLU(), output=nn.Linear(32, 10)),
    ).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n_train, generator=gen).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
    with torch.no_grad():
        test_accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    console.print(
        Panel.fit(
            f"MLP 64→32→10 on scikit-learn digits: {n_train} training examples, {int(flipped.sum())} with a flipped "
            f"label, {len(x_test)} held out (accuracy {test_accuracy:.1%}).\n"
            "Self-influence g(z)ᵀ(G+λI)⁻¹g(z) ranks the training examples the model finds hardest to fit; "
            "influence on the held-out loss shows which layers carry it.",
            title="hookinf demo",
        )
    )
    train = [(x_train[i : i + 200], y_train[i : i + 200]) for i in range(0, n_train, 200)]
    query = [(x_test[i : i + 200], y_test[i : i + 200]) for i in range(0, len(x_test), 200)]
    aucs: dict[str, float] = {}
    harmful: dict[str, float] = {}
    all_scores: dict[str, Scores] = {}
    selfs: dict[str, SelfScores] = {}
    rows = []
    k = int(flipped.sum())
    for method in METHODS:
        selfs[method] = self_influence(model, train, _loss, method=method)
        all_scores[method] = influence(model, train, query, _loss, method=method)
        aucs[method] = auc(selfs[method], flipped)
        harmful[method] = auc(all_scores[method].total.sum(dim=0), flipped)
        precision = float(flipped[selfs[method].topk(k).indices].double().mean())
        rows.append((f"{method} self-influence", aucs[method], precision))
        rows.append((f"{method} influence on held-out loss", harmful[method], _precision(all_scores[method], flipped)))

    def describe(index: int) -> str:
        return f"label {int(y_train[index])} (true {int(y_true[index])})"

    console.print(suspects_table(selfs["exact"], k=10, flipped=flipped, describe=describe))
    console.print(comparison_table(rows, title=f"Mislabel detection ({k} flips; top-{k} precision)"))
    for method in METHODS:
        console.print(all_scores[method].layer_table(title=f"Per-layer influence on the held-out loss ({method})"))
    for method in METHODS:
        console.print(f"AUC {aucs[method]:.4f} {method}", highlight=False)
    return DemoResult(aucs, harmful, all_scores, selfs, flipped, test_accuracy)


def _precision(scores: Scores, flipped: Tensor) -> float:
    k = int(flipped.sum())
    return float(flipped[scores.total.sum(dim=0).topk(k).indices].double().mean())
