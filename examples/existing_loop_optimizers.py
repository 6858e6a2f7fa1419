"""hookinf.watch around existing training loops with torch_optimizer's Lamb and AdaHessian.

    python examples/existing_loop_optimizers.py [--epochs N]

AdaHessian differentiates twice (``loss.backward(create_graph=True)`` and a Hessian-vector product inside its step),
Lamb is a plain first-order optimizer; neither loop changes to be watched. At every step the per-example gradients
the watch captured are compared with those of a plain backward on a copy of the model at the same weights, and at the
end the K-FAC statistics accumulated inside an AdaHessian loop (learning rate 0, so the weights stay fixed) are
compared with ``hookinf.fit`` over the same data. Prints each largest difference with what it compares, and exits
non-zero if any is above the tolerance (1e-10: float64 throughout, so the captured gradients equal the plain
backward's up to summation order, ~1e-15).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence

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


TOLERANCE = 1e-10
"""The largest difference a check may show (float64 throughout)."""


def main(epochs: int = 3) -> dict[str, float]:
    """Runs the checks, prints each largest difference with what it compares; returns them by check."""
    loops = {
        "sgd": train(lambda m: torch.optim.SGD(m.parameters(), lr=0.1), second_order=False, epochs=epochs),
        "lamb": train(lambda m: torch_optimizer.Lamb(m.parameters(), lr=0.01), second_order=False, epochs=epochs),
        "adahessian": train(
            lambda m: torch_optimizer.Adahessian(m.parameters(), lr=0.1), second_order=True, epochs=epochs
        ),
    }
    fitted = statistics_in_the_loop()
    print(
        f"Per-example gradients captured by hookinf.watch inside each loop vs a plain backward on a copy of the "
        f"model, every step of {epochs} epoch{'' if epochs == 1 else 's'}: largest absolute difference"
    )
    for name, value in loops.items():
        print(f"  {name:12s} {value:.2e}  {'ok' if value < TOLERANCE else 'DIFFERS'}")
    print("K-FAC factors accumulated inside an AdaHessian loop (weights fixed) vs hookinf.fit: largest relative error")
    print(f"  {'adahessian':12s} {fitted:.2e}  {'ok' if fitted < TOLERANCE else 'DIFFERS'}")
    print(f"(pass: every difference below {TOLERANCE:.0e}; float64 differs from the reference by summation order only)")
    return {**loops, "adahessian k-fac vs fit": fitted}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's options (``--help`` describes the checks)."""
    parser = argparse.ArgumentParser(
        description="Watch existing training loops (SGD, torch_optimizer's Lamb and AdaHessian, which differentiates "
        "twice) with hookinf.watch, unchanged, and check that the captured per-example gradients and K-FAC "
        "statistics equal a plain backward's and hookinf.fit's. Prints each largest difference; exits with status 1 "
        f"if one is above {TOLERANCE:.0e}.",
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each training loop (default 3)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: give 1 or more")
    return args


if __name__ == "__main__":
    sys.exit(0 if all(v < TOLERANCE for v in main(parse().epochs).values()) else 1)
