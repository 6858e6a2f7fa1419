"""Checkpoint ensembles: which combination of per-checkpoint EK-FAC scores predicts retraining best, and the cost.

    .venv/bin/python benchmarks/checkpoints.py [--quick] [--subsets 50]

Two cases, each trained once with :class:`hookinf.Snapshots` keeping four checkpoints (after 1/4, 2/4, 3/4 and all
of training), scored with EK-FAC (empirical Fisher, damping 0.1) on 100 held-out queries:

A. the digits MLP of ``benchmarks/curvature.py``, 64-32-10 (float32; scikit-learn's digits, 1,200 training
   examples of which 10% have flipped labels, ``hookinf.demo.flipped_digits``), Adam (lr 1e-2, weight decay 1e-3),
   100 epochs of batches of 64; checkpoints after epochs 25, 50, 75, 100.
B. a small CNN on the same digits as 1×8×8 images (conv 3×3 8 → conv 3×3 16 → linear 10), SGD with momentum 0.9,
   lr 0.05 with a cosine decay to 0 over 40 epochs of batches of 64; checkpoints after epochs 10, 20, 30, 40.

For each: the LDS (``hookinf.metrics.lds``) against models retrained from scratch (same schedule and seed) on random
halves of the training set (``hookinf.retrain.retrain_subsets``) of the final checkpoint alone, of each checkpoint
alone, and of the combinations ``combine="sum"``, ``"normalized"`` and the learning-rate weights of TracInCP (the
learning rate at each checkpoint: constant under Adam in case A, so it equals the sum there), and of 8 models
trained independently (another data order each) summed and normalized. Then the cost: seconds of
``hookinf.influence(..., method="ekfac", checkpoints=...)`` (fit and scoring) for 1, 2 and 4 checkpoints (case A,
fastest of 3). A full run writes ``benchmarks/results/checkpoints.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import Report, Section
from rich.console import Console
from torch import Tensor, nn

import hookinf
from hookinf.demo import flipped_digits
from hookinf.metrics import lds
from hookinf.retrain import retrain_subsets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "checkpoints.md"
SEED = 0
BATCH = 64
SCORE_BATCH = 200
N_QUERY = 100
ENSEMBLE = 8
LOSS = hookinf.CrossEntropy(logits=lambda model, batch: model(batch[0]), target=lambda batch: batch[1])


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    optimizer: str  # "adam" or "sgd-cosine"
    epochs: int
    shape: tuple[int, ...]  # one example's input shape


def mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(hidden=nn.Linear(64, 32), relu=nn.ReLU(), output=nn.Linear(32, 10)))


def cnn() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 8, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 16, 3),
            relu2=nn.ReLU(),
            flat=nn.Flatten(),
            out=nn.Linear(16 * 6 * 6, 10),
        )
    )


def train(
    case: Case, x: Tensor, y: Tensor, *, order_seed: int = SEED
) -> tuple[nn.Module, hookinf.Snapshots, list[float]]:
    """Trains from a fixed init; returns the model, its four snapshots and the learning rate at each of them."""
    torch.manual_seed(SEED)
    model = case.make()
    snaps = hookinf.Snapshots(model, every=case.epochs // 4)
    gen = torch.Generator().manual_seed(order_seed)
    steps_per_epoch = math.ceil(len(x) / BATCH)
    opt: torch.optim.Optimizer
    if case.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
        sched = None
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=case.epochs * steps_per_epoch)
    rates: list[float] = []
    for epoch in range(1, case.epochs + 1):
        for idx in torch.randperm(len(x), generator=gen).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if sched is not None:
                sched.step()
        if snaps.take(epoch):
            rates.append(float(opt.param_groups[0]["lr"]))
    return model, snaps, rates


def batches(x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + SCORE_BATCH], y[i : i + SCORE_BATCH]) for i in range(0, len(x), SCORE_BATCH)]


def mean_se(values: Tensor) -> str:
    kept = values[~values.isnan()]
    return f"{float(kept.mean()):+.3f} ± {float(kept.std() / math.sqrt(kept.numel())):.3f}"


def run_case(case: Case, n_subsets: int, report: Report) -> dict[str, float]:
    console = report.console
    x, y, _, x_test, y_test, _ = flipped_digits(SEED)
    x = x.float().reshape(-1, *case.shape)
    xq = x_test[:N_QUERY].float().reshape(-1, *case.shape)
    yq = y_test[:N_QUERY]
    start = time.perf_counter()
    model, snaps, rates = train(case, x, y)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(x_test.float().reshape(-1, *case.shape)).argmax(1) == y_test).float().mean())
    data, query = batches(x, y), batches(xq, yq)
    console.print(f"[{case.name}] trained in {train_seconds:.1f} s (test accuracy {accuracy:.1%}); scoring")

    start = time.perf_counter()
    curvatures = hookinf.fit(model, data, LOSS, method="ekfac", checkpoints=snaps.checkpoints, progress=False)
    combined = hookinf.influence(
        model, data, query, LOSS, method=curvatures, checkpoints=snaps.checkpoints, progress=False
    )
    assert isinstance(combined, hookinf.CheckpointScores)
    parts = combined.per_checkpoint
    score_seconds = time.perf_counter() - start

    console.print(f"[{case.name}] training {ENSEMBLE} independent models (another data order each)")
    members = [train(case, x, y, order_seed=SEED + 1 + k)[0].state_dict() for k in range(ENSEMBLE)]
    ensemble = hookinf.influence(model, data, query, LOSS, method="ekfac", checkpoints=members, progress=False)
    assert isinstance(ensemble, hookinf.CheckpointScores)

    console.print(f"[{case.name}] retraining {n_subsets} random halves")

    def retrain(mask: Tensor) -> Tensor:
        retrained, _, _ = train(case, x[mask], y[mask])
        with torch.no_grad():
            return F.cross_entropy(retrained(xq), yq, reduction="none")

    start = time.perf_counter()
    masks, losses = retrain_subsets(retrain, len(x), n_subsets=n_subsets, fraction=0.5, seed=SEED, progress=False)
    retrain_seconds = time.perf_counter() - start

    def weighted(weights: Sequence[float]) -> Tensor:
        return hookinf.checkpoint_scores.combine_scores(parts, list(weights)).total

    def normalized(scores: Sequence[hookinf.Scores]) -> Tensor:
        return hookinf.checkpoint_scores.combine_scores(scores, "normalized").total

    rows: list[tuple[str, Tensor]] = [(f"final checkpoint alone (epoch {snaps.steps[-1]})", parts[-1].total)]
    steps = snaps.steps[:-1]
    rows += [(f"checkpoint after epoch {step} alone", part.total) for step, part in zip(steps, parts, strict=False)]
    rows += [
        ('combine="sum" (4 checkpoints)', weighted([1.0] * len(parts))),
        ('combine="normalized" (4 checkpoints)', normalized(parts)),
        (
            f"combine=[learning rates] (TracInCP; {', '.join(f'{r:.3g}' for r in rates)})",
            weighted(rates) if any(r > 0 for r in rates) else weighted([1.0] * len(parts)),
        ),
        (f"{ENSEMBLE} independently trained models, summed", weighted_sum(ensemble.per_checkpoint)),
        (f"{ENSEMBLE} independently trained models, normalized", normalized(ensemble.per_checkpoint)),
    ]
    section = Section(
        f"{case.name}: LDS over {n_subsets} models retrained on random halves, {len(x)} train × {N_QUERY} queries, "
        f"EK-FAC",
        ["scores", "LDS (± s.e. over queries)", "− final checkpoint's LDS (paired ± s.e.)"],
    )
    means: dict[str, float] = {}
    final = lds(rows[0][1], masks, losses).per_query
    for label, total in rows:
        result = lds(total, masks, losses)
        section.rows.append([label, mean_se(result.per_query).lstrip("+"), mean_se(result.per_query - final)])
        means[label] = result.mean
    section.notes += [
        f"Trained once in {train_seconds:.1f} s (test accuracy {accuracy:.1%}); fitting and scoring the 4 checkpoints "
        f"{score_seconds:.1f} s; the {ENSEMBLE} extra models {ENSEMBLE} trainings more; the {n_subsets} retrainings "
        f"{retrain_seconds:.0f} s (one seed per subset: the same init and data-order seed as the scored run).",
        "The last checkpoint is the final model: 'final checkpoint alone' is what hookinf.influence(model, ...) "
        "gives without checkpoints=.",
    ]
    report.add(section)
    return means


def weighted_sum(scores: Sequence[hookinf.Scores]) -> Tensor:
    return hookinf.checkpoint_scores.combine_scores(scores, "sum").total


def cost(report: Report, repeats: int) -> None:
    case = CASES[0]
    x, y, _, x_test, y_test, _ = flipped_digits(SEED)
    x = x.float()
    model, snaps, _ = train(case, x, y)
    data, query = batches(x, y), batches(x_test[:N_QUERY].float(), y_test[:N_QUERY])
    section = Section(
        f"Cost: hookinf.influence(method='ekfac', checkpoints=...) on case A ({len(x)} train × {N_QUERY} queries), "
        f"fit and scoring, fastest of {repeats}",
        ["checkpoints", "seconds", "÷ 1 checkpoint", "seconds per checkpoint"],
    )
    base = None
    for count in (1, 2, 4):
        chosen = snaps.checkpoints[-count:]
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            hookinf.influence(model, data, query, LOSS, method="ekfac", checkpoints=chosen, progress=False)
            seconds.append(time.perf_counter() - start)
        best = min(seconds)
        base = base or best
        section.rows.append([str(count), f"{best:.3f}", f"{best / base:.2f}", f"{best / count:.3f}"])
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(repeats):
            hookinf.influence(model, data, query, LOSS, method="ekfac", progress=False)
        plain = (time.perf_counter() - start) / repeats
    section.notes.append(
        f"Without checkpoints= the same call takes {plain:.3f} s (mean of {repeats}); each checkpoint costs one fit "
        f"(EK-FAC: one pass, its correction replayed from memory) and one scoring pass, plus loading and restoring its "
        f"weights."
    )
    report.add(section)


CASES = (
    Case("A. digits MLP 64-32-10, Adam, 100 epochs", mlp, "adam", 100, (64,)),
    Case(
        "B. digits CNN (conv 8, conv 16, linear), SGD momentum + cosine lr, 40 epochs", cnn, "sgd-cosine", 40, (1, 8, 8)
    ),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 retrained subsets, 1 cost repeat: a smoke run")
    parser.add_argument("--subsets", type=int, default=50, help="retrained random halves per case (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_subsets, repeats = (10, 1) if args.quick else (args.subsets, 3)
    console = Console(width=max(150, Console().width))
    report = Report(console, "Checkpoint ensembles: LDS of combined EK-FAC scores, and cost")
    report.run_header(__file__, sys.argv[1:], args.threads)
    start = time.perf_counter()
    for case in CASES:
        run_case(case, n_subsets, report)
    cost(report, repeats)
    report.line(f"total {time.perf_counter() - start:.0f} s · load average at end {os.getloadavg()[0]:.2f}")
    if not args.quick:
        RESULTS.write_text(report.markdown(), encoding="utf-8")
        console.print(f"wrote {os.path.relpath(RESULTS)}")


if __name__ == "__main__":
    main()
