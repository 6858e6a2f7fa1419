"""hookinf.watch around existing training loops with torch_optimizer's Lamb and AdaHessian.

    python examples/existing_loop_optimizers.py

AdaHessian differentiates twice (``loss.backward(create_graph=True)`` and a Hessian-vector product inside its step),
Lamb is a plain first-order optimizer; neither loop changes to be watched. At every step the per-example gradients
the watch captured are compared with those of a plain backward on a copy of the model at the same weights, and at the
end the K-FAC statistics accumulated inside an AdaHessian loop (learning rate 0, so the weights stay fixed) are
compared with ``hookinf.fit`` over the same data. Exits non-zero if anything differs.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch_optimizer
from sklearn.datasets import load_wine
from torch import nn

import hookinf


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's wine data, standardised, in batches of 32 (float64)."""
    features, labels = load_wine(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(labels)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]


def model() -> nn.Module:
    """13 → 16 → 3 MLP."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def plain_gradients(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example gradients from a plain backward on a copy of ``net`` (the reference)."""
    twin = copy.deepcopy(net)
    with hookinf.watch(twin) as w:
        F.cross_entropy(twin(batch[0]), batch[1]).backward()
        return w.per_example_gradients()


def train(make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], second_order: bool, epochs: int = 3) -> float:
    """Trains inside a watch; returns the largest difference to the plain-backward reference over all steps."""
    net = model()
    optimizer = make_optimizer(net)
    worst = 0.0
    with hookinf.watch(net) as w:
        for _ in range(epochs):
            for batch in data():
                optimizer.zero_grad()
                loss = F.cross_entropy(net(batch[0]), batch[1])
                loss.backward(create_graph=second_order)  # the user's loop, unchanged
                captured = w.per_example_gradients()
                reference = plain_gradients(net, batch)
                worst = max(worst, *(float((captured[k] - reference[k]).abs().max()) for k in reference))
                optimizer.step()
                if second_order:
                    optimizer.zero_grad(set_to_none=True)  # create_graph leaves .grad in a cycle with the params
    return worst


def statistics_in_the_loop() -> float:
    """K-FAC factors from an AdaHessian loop at lr=0 vs ``hookinf.fit``: the largest relative difference."""
    net = model()
    batches = data()
    before = copy.deepcopy(net.state_dict())
    # AdaHessian refuses lr=0; at lr=1e-300 its updates vanish next to the weights, which stay bitwise fixed (checked
    # below), while its step still runs the Hessian-vector product through the watched graph.
    optimizer = torch_optimizer.Adahessian(net.parameters(), lr=1e-300)
    with hookinf.watch(net, fit="kfac") as w:
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward(create_graph=True)
            optimizer.step()
        collected = w.curvature()
    if any(not torch.equal(before[k], v) for k, v in net.state_dict().items()):
        raise RuntimeError("the weights moved; the comparison with hookinf.fit would not be at fixed weights")

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    reference = hookinf.fit(net, batches, loss_fn, method="kfac", progress=False)
    return max(
        float((collected.tensors[k] - v).abs().max() / v.abs().max().clamp_min(1e-300))
        for k, v in reference.tensors.items()
    )


def main() -> dict[str, float]:
    """Runs the checks; returns the largest differences."""
    results = {
        "sgd": train(lambda m: torch.optim.SGD(m.parameters(), lr=0.1), second_order=False),
        "lamb": train(lambda m: torch_optimizer.Lamb(m.parameters(), lr=0.01), second_order=False),
        "adahessian": train(lambda m: torch_optimizer.Adahessian(m.parameters(), lr=0.1), second_order=True),
        "adahessian k-fac vs fit": statistics_in_the_loop(),
    }
    for name, value in results.items():
        print(f"{name:26s} largest difference {value:.2e}")
    return results


if __name__ == "__main__":
    # float64 throughout: the captured gradients equal the plain backward's up to summation order (~1e-15).
    sys.exit(0 if all(v < 1e-10 for v in main().values()) else 1)
