"""Where an EK-FAC fit spends its time: each phase of ``hookinf.fit(method="ekfac")`` ÷ one plain training epoch.

    .venv/bin/python benchmarks/ekfac_breakdown.py [--quick] [--threads 2] [--device cuda]

The model and data are those of ``curvature.py``'s part a (an MLP 784-1024-1024-10 in float32, 5,000 synthetic
examples, batches of 256). Each phase is timed on its own, the fastest of ``--repeats`` runs, in one process, with a
plain epoch (forward, backward, SGD step) timed in the same rounds:

* pass: the watched forward and backward of every batch (hookinf's ``Runner``: output gradients only, no weight
  gradient), its steps dropped;
* factor GEMMs: the same pass feeding K-FAC's factor accumulator, minus the pass alone (``Σ aᵀa`` and ``Σ δᵀδ``);
* eigendecompositions: the factors' ``eigh`` in float32 (what a fit of a float32 model does), in float64 (what it did
  before), and in float32 two at a time in threads;
* correction: EK-FAC's second pass replayed from the first pass's steps (``Σ (Q_Sᵀ δ aᵀ Q_A)²``);
* the whole ``hookinf.fit(method="ekfac")`` (its first-pass cache on, as by default).

Then layers that read one input: a stand-in for transformer blocks (q, k and v reading one normalised hidden state,
gate and up another; ``o`` and ``down`` their own), whose activation factors hookinf accumulates, decomposes and
rotates once per shared input. The same model with each projection reading its own copy of the input (``clone()``:
the same numbers, nothing shared) is the comparison, fitted in interleaved rounds with a plain epoch.

It needs only the dev environment. With ``--device cuda`` the model, the data and therefore every statistic and
eigendecomposition are on the GPU (``torch.cuda.synchronize`` closes every timed block).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hookinf
from hookinf.curvature import statistics_dtype
from hookinf.damping import as_damping
from hookinf.methods.ekfac import EKFAC
from hookinf.methods.kfac import FactorAccumulator, KroneckerCurvature
from hookinf.runner import Runner

LOSS = hookinf.CrossEntropy(logits=lambda model, batch: model(batch[0]), target=lambda batch: batch[1])


def setup(n: int, hidden: int, batch: int, device: torch.device) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(784, hidden), relu1=nn.ReLU(), fc2=nn.Linear(hidden, hidden), relu2=nn.ReLU(),
            fc3=nn.Linear(hidden, 10),
        )
    )  # fmt: skip
    x = torch.randn(n, 784, generator=gen)
    y = (x @ torch.randn(784, 10, generator=gen)).argmax(dim=1)
    x, y = x.to(device), y.to(device)
    return model.to(device), [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def synchronize() -> None:
    """Wait for the GPU's queued work (timed blocks end here); nothing on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``run`` takes, its queued GPU work included, and what it returned."""
    synchronize()
    start = time.perf_counter()
    out = run()
    synchronize()
    return time.perf_counter() - start, out


def best(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    runs = [timed(run) for _ in range(repeats)]
    return min(seconds for seconds, _ in runs), runs[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the model and data live (e.g. cuda)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, hidden = (512, 128) if args.quick else (5000, 1024)
    model, train = setup(n, hidden, 256, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def plain_epoch() -> None:
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    damping = as_damping(0.1)
    dtype = statistics_dtype([p for p in model.parameters()], None)
    rows: list[tuple[str, float]] = []
    with Runner(model, LOSS, progress=False) as runner:

        def pass_only() -> list[Any]:
            return [step.batch_size for step in runner.steps(train, "pass")]

        def pass_and_factors() -> tuple[FactorAccumulator, list[Any]]:
            factors, steps = FactorAccumulator(runner.shapes, dtype, None), []
            for step in runner.steps(train, "factors"):
                factors.update(step)
                steps.append(step)
            return factors, steps

        plain_epoch()  # warm-up (allocator, threads)
        t_plain, _ = best(plain_epoch, args.repeats)
        t_pass, _ = best(pass_only, args.repeats)
        t_factors, (factors, steps) = best(pass_and_factors, args.repeats)
        basis = factors.finish(damping)
        layers = list(basis.layers)

        def eigendecompositions(precision: torch.dtype) -> None:
            for layer in layers:
                for matrix in basis.factors(layer):
                    torch.linalg.eigh(matrix.to(precision))

        def eigendecompositions_threaded(precision: torch.dtype) -> None:
            matrices = [matrix.to(precision) for layer in layers for matrix in basis.factors(layer)]
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(torch.linalg.eigh, matrices))

        t_eig64, _ = best(lambda: eigendecompositions(torch.float64), args.repeats)
        t_eig32, _ = best(lambda: eigendecompositions(torch.float32), args.repeats)
        t_eig32_threads, _ = best(lambda: eigendecompositions_threaded(torch.float32), args.repeats)

        def correction() -> float:
            accumulator = EKFAC(basis=basis).accumulator(runner.shapes, dtype)  # its eigendecompositions: not timed

            def replay() -> None:
                for step in steps:
                    accumulator.update(step)

            return timed(replay)[0]

        t_correction = min(correction() for _ in range(args.repeats))
    t_fit, t_fit64, t_plain_fit = interleaved_fits(model, train, plain_epoch, args.repeats)
    rows += [
        ("plain epoch (forward, backward, SGD step)", t_plain),
        ("pass: watched forward + backward to the outputs", t_pass),
        ("factor GEMMs (pass with factors − pass)", t_factors - t_pass),
        ("eigendecompositions, float64 (as fitted before)", t_eig64),
        ("eigendecompositions, float32 (as fitted: the statistics' dtype)", t_eig32),
        ("eigendecompositions, float32, two at a time in threads (not used)", t_eig32_threads),
        ("correction from the cached steps", t_correction),
        ("sum of the fit's phases (pass, factors, eigh float32, correction)", t_factors + t_eig32 + t_correction),
        ("hookinf.fit(method='ekfac')", t_fit),
        ("hookinf.fit(method='ekfac'), float64 eigendecompositions (before)", t_fit64),
    ]
    print(
        f"EK-FAC fit breakdown: MLP 784-{hidden}-{hidden}-10, {n} examples, batch 256, {args.threads} threads, "
        f"on {device}"
    )
    print(f"{'phase':70s} {'time (s)':>9s} {'÷ plain epoch':>14s}")
    for label, seconds in rows:
        print(f"{label:70s} {seconds:9.3f} {seconds / t_plain:14.2f}")
    print(
        f"interleaved rounds (median of {args.repeats}): fit ÷ plain epoch {t_fit / t_plain_fit:.2f}, float64-eigh fit "
        f"÷ plain epoch {t_fit64 / t_plain_fit:.2f}, fit ÷ float64-eigh fit {t_fit / t_fit64:.2f}"
    )
    shared_inputs(args.quick, args.repeats, device)


class Block(nn.Module):
    """q, k, v read one normalised input and gate, up another (``separate``: each reads its own copy of it)."""

    def __init__(self, hidden: int, separate: bool) -> None:
        super().__init__()
        self.separate = separate
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate, self.up = (nn.Linear(hidden, 2 * hidden, bias=False) for _ in range(2))
        self.down = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.layer_norm(x, x.shape[-1:])
        read = (lambda: h.clone()) if self.separate else (lambda: h)
        x = x + self.o(torch.tanh(self.q(read()) * self.k(read())) + self.v(read()))
        m = F.layer_norm(x, x.shape[-1:])
        read = (lambda: m.clone()) if self.separate else (lambda: m)
        return x + self.down(F.silu(self.gate(read())) * self.up(read()))


class MeanTokens(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def blocks(hidden: int, separate: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(hidden, separate), Block(hidden, separate), MeanTokens(), nn.Linear(hidden, 10))


def shared_inputs(quick: bool, repeats: int, device: torch.device) -> None:
    """Fit time of the blocks with shared inputs and with copies, interleaved with a plain epoch."""
    hidden, tokens, n, batch = (64, 4, 64, 16) if quick else (256, 8, 512, 64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, tokens, hidden, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    train = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    models = {"shared": blocks(hidden, False).to(device), "copies": blocks(hidden, True).to(device)}
    models["copies"].load_state_dict(models["shared"].state_dict())
    opt = torch.optim.SGD(models["shared"].parameters(), lr=0.0)

    def plain_epoch() -> None:
        for xb, yb in train:
            opt.zero_grad()
            F.cross_entropy(models["shared"](xb), yb).backward()
            opt.step()

    times: dict[str, list[float]] = {"plain": [], "shared": [], "copies": []}
    plain_epoch()
    for _ in range(repeats):
        for label, model in models.items():
            times[label].append(timed(partial(hookinf.fit, model, train, LOSS, method="ekfac", progress=False))[0])
        times["plain"].append(timed(plain_epoch)[0])
    plain, shared, copies = (statistics.median(times[k]) for k in ("plain", "shared", "copies"))
    print(
        f"\nlayers reading one input: 2 blocks (q, k, v ← one input; gate, up ← another), hidden {hidden}, {tokens} "
        f"tokens, {n} examples, batch {batch}; median of {repeats} interleaved rounds"
    )
    print(f"{'fit':70s} {'time (s)':>9s} {'÷ plain epoch':>14s}")
    print(f"{'plain epoch (forward, backward, SGD step)':70s} {plain:9.3f} {1.0:14.2f}")
    print(f"{'hookinf.fit(method=ekfac), inputs shared':70s} {shared:9.3f} {shared / plain:14.2f}")
    print(f"{'hookinf.fit(method=ekfac), each layer reading a copy':70s} {copies:9.3f} {copies / plain:14.2f}")
    print(f"shared ÷ copies: {shared / copies:.2f}")


def interleaved_fits(
    model: nn.Module, train: list[tuple[Tensor, Tensor]], plain_epoch: Callable[[], None], repeats: int
) -> tuple[float, float, float]:
    """Medians over rounds of (fit, fit with float64 eigendecompositions, plain epoch), run one after the other.

    The float64 variant is the fit before eigendecompositions followed the statistics' dtype: the benchmark (not
    the library) makes the Kronecker curvature report float64 as its compute dtype for that fit, which changes only
    the dtype its eigenbasis is computed in (a fit never preconditions).
    """
    fit, fit64, plain = [], [], []
    original = KroneckerCurvature.compute_dtype

    def fit_once() -> None:
        hookinf.fit(model, train, LOSS, method="ekfac", progress=False)

    for _ in range(repeats):
        fit.append(timed(fit_once)[0])
        KroneckerCurvature.compute_dtype = lambda self, layer: torch.float64  # type: ignore[method-assign]
        try:
            fit64.append(timed(fit_once)[0])
        finally:
            KroneckerCurvature.compute_dtype = original  # type: ignore[method-assign]
        plain.append(timed(plain_epoch)[0])
    return statistics.median(fit), statistics.median(fit64), statistics.median(plain)


if __name__ == "__main__":
    main()
