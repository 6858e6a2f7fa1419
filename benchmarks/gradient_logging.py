"""Gradient-logging benchmark: cost of logging compressed gradients from a training loop, and what it keeps.

    .venv-bench/bin/python benchmarks/gradient_logging.py [--quick]   # with LogIX (benchmarks/setup-bench.sh)
    .venv/bin/python benchmarks/gradient_logging.py [--quick]         # hookinf only: LogIX cells say so

(Not ``benchmarks/logging.py``: a script's directory comes first on ``sys.path``, so a ``logging.py`` there would
shadow the standard library's ``logging`` for every script in ``benchmarks/`` — torch imports it.)

Parts, in one run:

1. Logging step ÷ plain step, on an MLP 784-1024-1024-10 (batch 256, float32) and a tiny GPT-2 (4 layers, 256
   wide, vocabulary 2,000, 16 × 128 tokens; ``lm_head`` is tied to ``wte`` and left out with ``modules=``): a plain
   training step (forward, backward, SGD step); the same step inside ``hookinf.watch(model, log_to=..., compress=C,
   flush_every=...)`` with ``w.tag(ids)``, for C = LoGra(16, 16), Dropout(r=256) and Gaussian(r=256) (or the
   largest r its ``max_bytes`` allows, said so); and LogIX's LoGra logging step at rank 16. Every variant trains its
   own copy of the same model on the same batches, one step each in turn (in a fresh random order every step) so that
   drift in machine load hits all alike. Store writes count: the last timed step fills the last shard, and
   "total ÷ N" includes every shard and closing the store. Peak memory: each variant again in a fresh subprocess
   (this script with ``--worker``).
2. Compression alone on the GPT-2: ``bound.compress(step)`` for Dropout(r) and Gaussian(r), r ∈ {64, 256, 1024}.
3. Attribution quality on the digits MLP with 10% flipped labels: mislabel-detection AUC of exact self-influence,
   uncompressed and compressed, in memory and through a gradient store (``hookinf.log`` then ``self_influence``).

``--profile`` only profiles hookinf's logging steps and the Gaussian compression (cProfile: time by hookinf
function). A full run (not ``--quick``) writes the tables to
``benchmarks/results/logging.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from _memory import peak_mib, rss_mib
from _report import Report, Section
from rich.console import Console
from torch import Tensor, nn

import hookinf
from hookinf.capture import Step
from hookinf.errors import ConfigurationError
from hookinf.metrics import auc

try:
    import logix
except ImportError as err:  # the benchmark runs without it; its cells then say why
    logix = None
    LOGIX_MISSING = f"LogIX: not available (not installed: {err})"
else:
    LOGIX_MISSING = ""

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "logging.md"
SEED = 0
RANK = 16  # LoGra(16, 16) and LogIX's LoRA rank
R = 256  # Dropout(r) and Gaussian(r) in parts 1 and 3


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """Sizes of one run; ``--quick`` shrinks all of them."""

    quick: bool = False
    threads: int = 2
    mlp_hidden: int = 1024
    mlp_batch: int = 256
    mlp_flush: int = 4096  # flush_every: 16 steps of 256
    mlp_steps: int = 96  # steps per variant, warm-up included: 6 shards
    gpt_layers: int = 4
    gpt_width: int = 256
    gpt_vocab: int = 2000
    gpt_tokens: int = 128
    gpt_batch: int = 16
    gpt_flush: int = 128  # flush_every: 8 steps of 16 sequences (4096 would need 256 steps per variant)
    gpt_steps: int = 64  # 8 shards
    warmup: int = 2  # untimed (logged) steps per variant first
    gaussian_flushes: int = 1  # Gaussian's own timing loop: this many flushes' worth of steps
    ranks: tuple[int, ...] = (64, 256, 1024)
    compress_repeats: int = 5
    digits_epochs: int = 30

    @classmethod
    def make(cls, quick: bool, threads: int) -> Config:
        if not quick:
            return cls(threads=threads)
        return cls(
            quick=True,
            threads=threads,
            mlp_hidden=256,
            mlp_batch=64,
            mlp_flush=256,
            mlp_steps=8,
            gpt_layers=2,
            gpt_width=64,
            gpt_tokens=32,
            gpt_batch=8,
            gpt_flush=32,
            gpt_steps=8,
            warmup=1,
            compress_repeats=3,
            digits_epochs=10,
        )


# ---------------------------------------------------------------------------------------------------- report
def note(console: Console, text: str) -> None:
    console.print(f"[dim]… {text}[/dim]", highlight=False)


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


# ---------------------------------------------------------------------------------------------------- helpers


def interleaved_medians(calls: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each call over ``repeats`` rounds, the calls alternating within a round (after one
    untimed round), so that drift in machine load hits all alike."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, out in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            out.append(time.perf_counter() - start)
    return [statistics.median(out) for out in times]


def quiet_libraries() -> None:
    """Silences transformers' config warnings and LogIX's INFO log (it prints every tracked module)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    # LogIX's full backward hook on the first LoRA bottleneck, whose input needs no gradient: harmless
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    if logix is not None:
        from logix.utils import get_logger

        get_logger().setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------------- models
@dataclass
class Bench:
    """A model, its batches and its loss: everything a variant needs to run training steps on its own copy."""

    name: str
    description: str
    model: nn.Module
    batches: list[Any]  # cycled: step i uses batches[i % len(batches)]
    batch_size: int
    loss: Callable[[nn.Module, Any], Tensor]  # the mean loss of the batch
    flush_every: int
    steps: int
    modules: str | None = None  # hookinf's modules= (None: every supported layer)
    logix_filter: list[str] | None = None  # LogIX's name_filter
    linear_copy: bool = False  # LogIX needs nn.Linear layers (GPT-2 uses transformers' Conv1D)

    def batch(self, step: int) -> Any:
        return self.batches[step % len(self.batches)]

    def ids(self, step: int) -> Tensor:
        """Distinct example ids for every step (a store holds each id once)."""
        return torch.arange(step * self.batch_size, (step + 1) * self.batch_size)

    def shapes(self) -> dict[str, hookinf.LayerShape]:
        w = hookinf.watch(self.model, modules=self.modules)  # not entered: only resolves the layers
        return {name: hookinf.LayerShape.of(adapter) for name, adapter in w.adapters.items()}


def mlp_bench(cfg: Config) -> Bench:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    h = cfg.mlp_hidden
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(784, h), relu1=nn.ReLU(), fc2=nn.Linear(h, h), relu2=nn.ReLU(), fc3=nn.Linear(h, 10))
    )
    batches = [
        (torch.randn(cfg.mlp_batch, 784, generator=gen), torch.randint(0, 10, (cfg.mlp_batch,), generator=gen))
        for _ in range(4)
    ]

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    return Bench(
        "mlp",
        f"MLP 784-{h}-{h}-10 (float32), batch {cfg.mlp_batch}",
        model,
        batches,
        cfg.mlp_batch,
        loss,
        cfg.mlp_flush,
        cfg.mlp_steps,
    )


def gpt_bench(cfg: Config) -> Bench:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    config = GPT2Config(
        n_layer=cfg.gpt_layers,
        n_head=4,
        n_embd=cfg.gpt_width,
        vocab_size=cfg.gpt_vocab,
        n_positions=cfg.gpt_tokens,
    )
    model = GPT2LMHeadModel(config)
    shape = (cfg.gpt_batch, cfg.gpt_tokens)
    batches = [torch.randint(0, cfg.gpt_vocab, shape, generator=gen) for _ in range(4)]

    def loss(model: nn.Module, batch: Tensor) -> Tensor:
        return model(input_ids=batch, labels=batch).loss

    return Bench(
        "gpt2",
        f"GPT-2 ({cfg.gpt_layers} layers, width {cfg.gpt_width}, vocabulary {cfg.gpt_vocab}), "
        f"batch {cfg.gpt_batch} × {cfg.gpt_tokens} tokens",
        model,
        batches,
        cfg.gpt_batch,
        loss,
        cfg.gpt_flush,
        cfg.gpt_steps,
        modules="transformer.h.*",
        logix_filter=["transformer.h."],
        linear_copy=True,
    )


def build(name: str, cfg: Config) -> Bench:
    return mlp_bench(cfg) if name == "mlp" else gpt_bench(cfg)


def linear_copy(model: nn.Module) -> nn.Module:
    """A copy of a GPT-2 with every ``Conv1D`` (``y = x W + b``, ``W`` ``[I, O]``) replaced by the same
    ``nn.Linear`` (``W`` transposed): the same function and cost, in the layer type LogIX supports."""
    from transformers.pytorch_utils import Conv1D

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, linear)
    return out


# ---------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One way of running the training step."""

    key: str
    label: str
    compressor: hookinf.Compressor | None = None


def gaussian_bytes(shapes: dict[str, hookinf.LayerShape], r: int) -> int:
    """Bytes of float64 projection matrices ``Gaussian(r).bind(shapes)`` would draw (its max_bytes check)."""
    return sum(8 * min(r, s.dim) * s.dim for s in shapes.values())


def gaussian_plan(shapes: dict[str, hookinf.LayerShape], r: int) -> tuple[int, str | None]:
    """``(r to run, refusal)``: ``r`` when Gaussian(r) fits its max_bytes, else the largest r that does and why."""
    limit = hookinf.Gaussian(r).max_bytes
    if gaussian_bytes(shapes, r) <= limit:
        return r, None
    try:
        hookinf.Gaussian(r).bind(shapes)  # refused before drawing anything: confirms hookinf's own check
        refusal = f"Gaussian(r={r}) was not refused although it exceeds max_bytes"
    except ConfigurationError:
        refusal = (
            f"Gaussian(r={r}) refused: needs {gaussian_bytes(shapes, r) / 2**30:.2f} GiB of float64 projections "
            f"> max_bytes {limit / 2**30:.0f} GiB"
        )
    lo, hi = 1, r
    while lo < hi:  # the largest r' with gaussian_bytes(r') ≤ limit
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if gaussian_bytes(shapes, mid) <= limit else (lo, mid - 1)
    return lo, refusal


def variants(bench: Bench) -> tuple[list[Variant], str | None]:
    r_gauss, refusal = gaussian_plan(bench.shapes(), R)
    out = [
        Variant("plain", "plain step (forward, backward, SGD step)"),
        Variant("logra", f"hookinf watch(log_to=…, compress=LoGra({RANK}, {RANK}))", hookinf.LoGra(RANK, RANK)),
        Variant("dropout", f"hookinf watch(log_to=…, compress=Dropout(r={R}))", hookinf.Dropout(r=R)),
        Variant(
            "gaussian",
            f"hookinf watch(log_to=…, compress=Gaussian(r={r_gauss}))" + (" ‡" if refusal else ""),
            hookinf.Gaussian(r_gauss),
        ),
    ]
    if logix is not None:
        if bench.linear_copy:
            out.append(Variant("plain-linear", "plain step, Conv1D → nn.Linear copy (LogIX's model)"))
        out.append(Variant("logix", f"LogIX {logix.__version__} LoGra logging step (LoRA rank {RANK})"))
    return out, refusal


class Runner:
    """A plain training step on its own copy of the model."""

    def __init__(self, bench: Bench, model: nn.Module | None = None) -> None:
        self.bench = bench
        self.model = model if model is not None else copy.deepcopy(bench.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=1e-3)

    def train_step(self, step: int) -> None:
        self.model.zero_grad(set_to_none=True)
        self.bench.loss(self.model, self.bench.batch(step)).backward()
        self.optimizer.step()

    def step(self, step: int) -> None:
        self.train_step(step)

    def flushes(self) -> int:
        return 0

    def writes_at(self, step: int) -> bool:
        """Whether step ``step`` fills the buffer and hands a shard to the store (every ``flush_every`` examples)."""
        return False

    def close(self) -> None:
        """Ends logging: writes what is buffered and waits until the store is complete."""

    def floats_per_example(self) -> int | None:
        return None


class HookinfRunner(Runner):
    """The step inside ``hookinf.watch(log_to=..., compress=...)``, tagging each batch's ids."""

    def __init__(self, bench: Bench, compressor: hookinf.Compressor, directory: Path, stack: ExitStack) -> None:
        super().__init__(bench)
        w = hookinf.watch(
            self.model, modules=bench.modules, log_to=directory, compress=compressor, flush_every=bench.flush_every
        )
        self.exit = ExitStack()
        self.watch = self.exit.enter_context(w)
        stack.callback(self.exit.close)  # the watch ends with the caller's stack, unless close() ended it earlier

    def step(self, step: int) -> None:
        self.watch.tag(self.bench.ids(step))
        self.train_step(step)
        self.watch.last_step  # noqa: B018 - closes the step (compress, buffer, flush when due) inside the timing

    def writes_at(self, step: int) -> bool:
        return (step + 1) * self.bench.batch_size % self.bench.flush_every == 0

    def close(self) -> None:
        self.exit.close()  # the watch's exit: flushes the buffer and waits for the shards being written

    def flushes(self) -> int:
        """Shards written so far (complete ones only: hookinf writes them in a background thread)."""
        return len(self.watch.store.shards)

    def floats_per_example(self) -> int:
        return sum(shape.dim for shape in self.watch.store.layers.values())


class LogixRunner(Runner):
    """LogIX's recipe: ``watch`` → ``add_lora`` (rank 16) → ``setup({"grad": ["log"]})``, each step inside
    ``with run(data_id=ids, save=True)``; its buffer flushes every ``flush_every`` examples, as hookinf's."""

    def __init__(self, bench: Bench, directory: Path) -> None:
        super().__init__(bench, linear_copy(bench.model) if bench.linear_copy else copy.deepcopy(bench.model))
        assert logix is not None
        linears = [
            m
            for name, m in self.model.named_modules()
            if isinstance(m, nn.Linear) and (bench.logix_filter is None or any(f in name for f in bench.logix_filter))
        ]
        self.per_example = sum(min(RANK, m.in_features, m.out_features) ** 2 for m in linears)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "root_dir": str(directory),
            "logging": {"flush_threshold": bench.flush_every * self.per_example - 1, "num_workers": 1},
            "lora": {"rank": RANK, "init": "random"},
        }
        (directory / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.run = logix.LogIX("bench", config=str(directory / "config.yaml"))
        self.run.watch(self.model, name_filter=bench.logix_filter)
        self.run.add_lora()
        self.run.setup({"grad": ["log"]})
        for param in self.params:  # LogIX freezes every parameter but its LoRA bottlenecks; train the model again
            param.requires_grad_(True)

    def step(self, step: int) -> None:
        ids = [str(int(i)) for i in self.bench.ids(step)]
        with self.run(data_id=ids, save=True):
            self.model.zero_grad(set_to_none=True)
            self.bench.loss(self.model, self.bench.batch(step)).backward()
        self.optimizer.step()

    def flushes(self) -> int:
        return int(self.run.logger.log_saver.flush_count)

    def writes_at(self, step: int) -> bool:
        return (step + 1) * self.bench.batch_size % self.bench.flush_every == 0

    def close(self) -> None:
        self.run.finalize()  # writes what is buffered, its state and its config

    def floats_per_example(self) -> int:
        return self.per_example


def make_runner(variant: Variant, bench: Bench, directory: Path, stack: ExitStack) -> Runner:
    if variant.key == "plain":
        return Runner(bench)
    if variant.key == "plain-linear":
        return Runner(bench, linear_copy(bench.model))
    if variant.key == "logix":
        return LogixRunner(bench, directory)
    assert variant.compressor is not None
    return HookinfRunner(bench, variant.compressor, directory, stack)


# ---------------------------------------------------------------------------------------------------- 1. step cost
@dataclass
class Timing:
    median: float
    mean: float  # (timed steps + close) ÷ number of timed steps: every shard written counts
    flushes: int
    flush_median: float | None  # median of the timed steps that filled the buffer (and handed it to the store)
    close: float  # ending the logging: the last shards written and synced
    cycle: float | None  # median over complete shard cycles (the steps from one shard to the next) of their mean step
    floats: int | None
    steps: int


def time_variants(
    bench: Bench, cfg: Config, chosen: list[Variant], workdir: Path, steps: int
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Every variant on its own copy, one step each in turn (shuffled order); also why a variant could not run.

    ``steps`` counts the warm-up too, so the last timed step fills the last shard (``steps`` is a multiple of the
    steps per shard); then every variant's ``close()`` is timed as well: hookinf writes shards in a background thread
    and its watch's exit waits for them, LogIX's ``finalize`` writes its state and config.
    """
    failed: dict[str, str] = {}
    with ExitStack() as stack:
        runners: dict[str, Runner] = {}
        for variant in chosen:
            try:
                runners[variant.key] = runner = make_runner(variant, bench, workdir / variant.key, stack)
                for i in range(cfg.warmup):
                    runner.step(i)
            except Exception as err:  # LogIX may not run here: its cells say why
                if variant.key != "logix":
                    raise
                runners.pop(variant.key, None)
                failed[variant.key] = f"LogIX: not available ({type(err).__name__}: {err})"
        start_flushes = {key: runner.flushes() for key, runner in runners.items()}
        times: dict[str, list[float]] = {key: [] for key in runners}
        flush_times: dict[str, list[float]] = {key: [] for key in runners}
        closes: dict[str, float] = {}
        keys = list(runners)
        order = random.Random(SEED)
        for i in range(cfg.warmup, steps):
            order.shuffle(keys)  # a fresh order every step: no variant always runs right after the same one
            for key in keys:
                runner = runners[key]
                start = time.perf_counter()
                runner.step(i)
                times[key].append(time.perf_counter() - start)
                if runner.writes_at(i):
                    flush_times[key].append(times[key][-1])
        order.shuffle(keys)
        for key in keys:
            start = time.perf_counter()
            runners[key].close()
            closes[key] = time.perf_counter() - start
        per_shard = bench.flush_every // bench.batch_size
        timings = {
            key: Timing(
                median=statistics.median(times[key]),
                mean=(sum(times[key]) + closes[key]) / len(times[key]),
                flushes=runner.flushes() - start_flushes[key],
                flush_median=statistics.median(flush_times[key]) if flush_times[key] else None,
                close=closes[key],
                cycle=cycle_median(times[key], cfg.warmup, per_shard),
                floats=runner.floats_per_example(),
                steps=len(times[key]),
            )
            for key, runner in runners.items()
        }
    return timings, failed


def cycle_median(times: list[float], first: int, per_shard: int) -> float | None:
    """Median over the complete shard cycles of their mean step time; ``times[j]`` is step ``first + j``.

    A cycle is the ``per_shard`` steps ending with one that fills a shard, so each holds exactly one write: a
    spike-robust cost per step with the writes included (the mean of all steps is not robust to a stray stall).
    """
    cycles: dict[int, list[float]] = {}
    for j, seconds in enumerate(times):
        cycles.setdefault((first + j) // per_shard, []).append(seconds)
    means = [sum(c) / per_shard for c in cycles.values() if len(c) == per_shard]
    return statistics.median(means) if means else None


def memory_worker(bench_name: str, key: str, cfg: Config, workdir: Path) -> dict[str, Any]:
    """Peak RSS growth of one variant in a fresh process: model and batches loaded, then setup + one flush's steps."""
    torch.set_num_threads(cfg.threads)
    quiet_libraries()
    bench = build(bench_name, cfg)
    chosen = {v.key: v for v in variants(bench)[0]}
    with torch.no_grad():  # load kernels before the baseline
        bench.loss(bench.model, bench.batch(0))
    before = rss_mib()
    with ExitStack() as stack:
        runner = make_runner(chosen[key], bench, workdir / f"mem-{bench_name}-{key}", stack)
        steps = bench.flush_every // bench.batch_size
        for i in range(steps):
            runner.step(i)
        runner.close()
    return {"rss_growth_mib": peak_mib() - before, "flushes": runner.flushes(), "steps": steps}


def run_memory_worker(bench_name: str, key: str, cfg: Config, workdir: Path) -> dict[str, Any] | str:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{bench_name}:{key}"]
    command += ["--workdir", str(workdir), "--config", json.dumps(asdict(cfg))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"worker failed (exit {done.returncode}): {tail}"
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


@dataclass
class StepResults:
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # bench → variant → total÷N ratio to plain


def part_steps(cfg: Config, workdir: Path, report: Report, results: StepResults) -> None:
    console = report.console
    for bench_name in ("mlp", "gpt2"):
        bench = build(bench_name, cfg)
        chosen, refusal = variants(bench)
        steps_per_flush = bench.flush_every // bench.batch_size
        note(console, f"{bench_name}: timing {len(chosen) - 1} variants × {bench.steps} steps, interleaved")
        main = [variant for variant in chosen if variant.key != "gaussian"]
        timings, failed = time_variants(bench, cfg, main, workdir / bench_name, bench.steps)
        gauss_steps = steps_per_flush * cfg.gaussian_flushes
        note(console, f"{bench_name}: timing Gaussian and plain × {gauss_steps} steps, interleaved")
        pair = [chosen[0], next(variant for variant in chosen if variant.key == "gaussian")]
        gauss_timings, _ = time_variants(bench, cfg, pair, workdir / f"{bench_name}-gaussian", gauss_steps)
        timings["gaussian"] = gauss_timings["gaussian"]
        note(console, f"{bench_name}: memory, each variant in a fresh process")
        keys = [variant.key for variant in chosen if variant.key not in failed]
        with ThreadPoolExecutor(max_workers=2) as pool:  # peaks are per process: two at a time do not mix
            found = pool.map(partial(run_memory_worker, bench_name, cfg=cfg, workdir=workdir), keys)
            memory: dict[str, dict[str, Any] | str] = dict(zip(keys, found, strict=True))
        plain = timings["plain"]
        timed = plain.steps
        section = Section(
            f"1{'ab'[bench_name == 'gpt2']}. Logging step ÷ plain step: {bench.description}, flush_every="
            f"{bench.flush_every} ({steps_per_flush} steps), {timed} timed steps per variant, {cfg.threads} threads",
            [
                "variant",
                "median step (ms)",
                "÷ plain (medians)",
                "total ÷ N (ms)",
                "÷ plain (total ÷ N: flushes and close included)",
                "÷ plain (median shard cycle)",
                "shards written",
                "step that fills a shard, median (ms)",
                "close (ms)",
                "floats / example",
                "peak RSS growth (MiB)",
            ],
        )
        ratios = results.ratios.setdefault(bench_name, {})
        for variant in chosen:
            if variant.key in failed:
                section.rows.append([variant.label, failed[variant.key], *[""] * 9])
                continue
            t = timings[variant.key]
            base = gauss_timings["plain"] if variant.key == "gaussian" else plain
            mem = memory[variant.key]
            ratios[variant.key] = t.mean / base.mean
            logs = variant.key not in ("plain", "plain-linear")
            section.rows.append(
                [
                    variant.label,
                    f"{t.median * 1e3:.1f}",
                    f"{t.median / base.median:.2f}",
                    f"{t.mean * 1e3:.1f}",
                    f"{t.mean / base.mean:.2f}",
                    f"{t.cycle / base.cycle:.2f}" if t.cycle is not None and base.cycle is not None else "",
                    str(t.flushes) if logs else "",
                    f"{t.flush_median * 1e3:.1f}" if logs and t.flush_median is not None else "",
                    f"{t.close * 1e3:.1f}" if logs else "",
                    f"{t.floats:,}" if t.floats is not None else "",
                    f"{mem['rss_growth_mib']:.0f}" if isinstance(mem, dict) else mem,
                ]
            )
        if logix is None:
            section.rows.append([f"LogIX LoGra logging step (rank {RANK})", LOGIX_MISSING, *[""] * 9])
        g_plain = gauss_timings["plain"]
        section.notes += [
            f"Each variant trains its own copy of the same model (SGD, lr 1e-3) on the same {len(bench.batches)} "
            f"batches, one step of each variant in turn, in a fresh random order every step, after {cfg.warmup} "
            f"untimed (logged) step(s) each. N = {timed} timed steps, so that the last of them fills the last shard "
            f"(a shard every {bench.flush_every} examples); 'total ÷ N' = (the N step times + close) ÷ N, where close "
            "ends the logging (hookinf: the watch's exit, which waits for the shards its background thread is "
            "writing; LogIX: finalize). hookinf's step includes w.last_step, which closes the step, compresses it and "
            "buffers it, handing a full buffer to the writer thread; LogIX writes its buffer synchronously in the "
            "step that fills it.",
            f"'median shard cycle': the {steps_per_flush} steps from one shard to the next hold exactly one write; the "
            "median over the complete cycles of their total, ÷ that of the plain steps — the same cost as total ÷ N "
            "but robust to a stray stall from other processes.",
            f"Gaussian runs in a second interleaved loop, {g_plain.steps} timed steps against its own plain steps "
            f"(plain there: median {g_plain.median * 1e3:.1f} ms, total ÷ N {g_plain.mean * 1e3:.1f} ms); its ratios "
            "are to those: its multi-GB temporaries per step would slow the step of whichever variant runs next.",
            "Peak RSS growth: each variant in a fresh subprocess (two at a time), its peak RSS (VmHWM) over its setup "
            f"(the watch binds the projections), {steps_per_flush} steps (one shard) and close, minus its RSS before "
            "them (model and batches loaded); it includes the variant's copy of the model.",
        ]
        if refusal:
            section.notes.append(f"‡ {refusal}; it runs at the largest r that fits.")
        if bench.modules:
            section.notes.append(
                f"hookinf tracks modules='{bench.modules}' (lm_head shares wte's weight and is left out)"
                + (f"; LogIX the same layers (name_filter={bench.logix_filter})." if logix is not None else ".")
            )
        if logix is not None and "logix" not in failed:
            section.notes.append(
                "LogIX inserts LoRA-like modules (A: I→r, B: r×r, C: r→O, B zero-initialised) into the model and logs "
                "B's per-example gradient (r_eff × r_eff, r_eff = min(r, I, O), no bias column); hookinf's "
                "LoGra(16, 16) keeps min(16, O) × min(16, I + 1) per layer. LogIX freezes every other parameter; the "
                "benchmark unfreezes the model's own parameters so that its step trains like the others, with the "
                "same SGD step. LogIX writes its buffer (numpy memmap) when it exceeds flush_threshold elements, set "
                "to flush every flush_every examples (num_workers=1; with more, its ThreadPoolExecutor is still "
                "joined before the step returns)."
            )
            if bench.linear_copy:
                section.notes.append(
                    "LogIX's LoRA supports nn.Linear/nn.Conv2d only, not GPT-2's transformers Conv1D, so LogIX runs on "
                    "a copy with every Conv1D replaced by the equivalent nn.Linear (same outputs, same cost: see the "
                    "'plain step, … nn.Linear copy' row); its ratio is to the common plain step."
                )
        report.add(section)


# ---------------------------------------------------------------------------------------------------- 2. compression
@dataclass
class CompressResults:
    ratio: dict[int, float] = field(default_factory=dict)  # r → Gaussian ÷ Dropout


def captured_step(bench: Bench) -> tuple[Step, dict[str, hookinf.LayerShape]]:
    """One batch's captured step and the tracked layers' shapes."""
    with hookinf.watch(bench.model, modules=bench.modules) as w:
        bench.loss(bench.model, bench.batch(0)).backward()
        step = w.last_step
        shapes = {name: hookinf.LayerShape.of(adapter) for name, adapter in w.adapters.items()}
    bench.model.zero_grad(set_to_none=True)
    assert step is not None
    return step, shapes


def part_compress(cfg: Config, report: Report) -> CompressResults:
    console = report.console
    bench = gpt_bench(cfg)
    step, shapes = captured_step(bench)
    by_shape: dict[hookinf.LayerShape, list[str]] = {}
    for name, shape in shapes.items():
        by_shape.setdefault(shape, []).append(name)
    section = Section(
        f"2. Compression alone: bound.compress(step) on one captured GPT-2 step ({bench.description}; "
        f"{len(shapes)} layers, d = {sum(s.dim for s in shapes.values()):,} parameters)",
        ["r", "Dropout(r) (ms)", "Gaussian(r) (ms)", "Gaussian ÷ Dropout", "Gaussian projections (GiB, float64)"],
    )
    results = CompressResults()
    per_layer_rs: list[int] = []
    for r in cfg.ranks:
        note(console, f"compression at r={r}")
        dropout = hookinf.Dropout(r=r).bind(shapes)
        size = gaussian_bytes(shapes, r)
        if size <= hookinf.Gaussian(r).max_bytes:
            gaussian = hookinf.Gaussian(r).bind(shapes)
            t_dropout, t_gauss = interleaved_medians(
                [partial(dropout.compress, step), partial(gaussian.compress, step)], cfg.compress_repeats
            )
            shown = f"{t_gauss * 1e3:.1f}"
            del gaussian
        else:  # all layers' projections at once exceed max_bytes (and this machine): one layer shape at a time
            per_layer_rs.append(r)
            t_dropout = t_gauss = 0.0
            for shape, names in by_shape.items():
                one = hookinf.Gaussian(r, max_bytes=2**40).bind({names[0]: shape})
                capture = step.layers[names[0]]
                pair = interleaved_medians(
                    [partial(dropout.compress_layer, capture), partial(one.compress_layer, capture)],
                    cfg.compress_repeats,
                )
                t_dropout += len(names) * pair[0]
                t_gauss += len(names) * pair[1]
                del one
            shown = f"{t_gauss * 1e3:.1f} †"
        results.ratio[r] = t_gauss / t_dropout
        section.rows.append(
            [str(r), f"{t_dropout * 1e3:.2f}", shown, f"{t_gauss / t_dropout:.0f}×", f"{size / 2**30:.2f}"]
        )
    logra = hookinf.LoGra(RANK, RANK).bind(shapes)
    (t_logra,) = interleaved_medians([partial(logra.compress, step)], cfg.compress_repeats)
    section.rows.append([f"LoGra({RANK}, {RANK}) for reference", f"{t_logra * 1e3:.2f}", "", "", ""])
    section.notes.append(
        f"Median of {cfg.compress_repeats} calls after one untimed call, Dropout and Gaussian calls alternating; "
        f"float32 captures, {cfg.threads} threads. "
        "Dropout gathers r entries of each layer's gradient from the factors, O(S·r) per example; Gaussian forms "
        "every per-example gradient [B, O, I] and multiplies it by a dense [r, d] projection, O(r·d) per example."
    )
    if per_layer_rs:
        section.notes.append(
            f"† r ∈ {per_layer_rs}: Gaussian(r) over all layers is refused by its max_bytes (2 GiB) and would not fit "
            "in this machine's memory either, so each distinct layer shape was bound alone (max_bytes raised), "
            "compress_layer timed on that layer's capture (Dropout's too, alternating), and the times summed over the "
            "layers of that shape (the blocks are identical, so this is the cost of the whole step)."
        )
    report.add(section)
    return results


# ---------------------------------------------------------------------------------------------------- 3. quality
@dataclass
class QualityResults:
    uncompressed: float
    compressed: dict[str, float] = field(default_factory=dict)  # in memory
    stored: dict[str, float] = field(default_factory=dict)  # through a store


def train_digits(x: Tensor, y: Tensor, epochs: int) -> nn.Module:
    """hookinf/demo.py's model and schedule: MLP 64-32-10 in float64, Adam 1e-2, weight decay 1e-3, batches of 64."""
    torch.manual_seed(SEED)
    model = nn.Sequential(OrderedDict(hidden=nn.Linear(64, 32), relu=nn.ReLU(), output=nn.Linear(32, 10))).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model


def digits_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def part_quality(cfg: Config, workdir: Path, report: Report) -> QualityResults:
    from hookinf.demo import flipped_digits

    note(report.console, "digits: training and self-influence")
    x, y, _, x_test, y_test, flipped = flipped_digits(SEED)
    model = train_digits(x, y, cfg.digits_epochs)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    train = [(x[i : i + 200], y[i : i + 200]) for i in range(0, len(x), 200)]
    common: dict[str, Any] = {"method": "exact", "progress": False}

    start = time.perf_counter()
    base = hookinf.self_influence(model, train, digits_loss, **common)
    seconds = time.perf_counter() - start
    results = QualityResults(auc(base, flipped))
    section = Section(
        f"3. Attribution quality: digits MLP 64-32-10 (float64), {len(x)} train with {int(flipped.sum())} flipped "
        "labels — mislabel-detection AUC of exact self-influence",
        [
            "compression",
            "AUC in memory",
            "− uncompressed",
            "AUC via store",
            "store − in memory (AUC; max |Δ self-influence|)",
            "time in memory / log + score (s)",
        ],
    )
    section.rows.append(["none", f"{results.uncompressed:.4f}", "", "", "", f"{seconds:.2f}"])
    for key, label, compressor in (
        ("logra", f"LoGra({RANK}, {RANK})", hookinf.LoGra(RANK, RANK)),
        ("dropout", f"Dropout(r={R})", hookinf.Dropout(r=R)),
        ("gaussian", f"Gaussian(r={R})", hookinf.Gaussian(R)),
    ):
        start = time.perf_counter()
        in_memory = hookinf.self_influence(model, train, digits_loss, compress=compressor, **common)
        t_memory = time.perf_counter() - start
        start = time.perf_counter()
        store = hookinf.log(
            model, train, digits_loss, compress=compressor, path=workdir / f"digits-{key}", progress=False
        )
        stored = hookinf.self_influence(model, store, digits_loss, **common)
        t_store = time.perf_counter() - start
        a_memory, a_store = auc(in_memory, flipped), auc(stored, flipped)
        results.compressed[key], results.stored[key] = a_memory, a_store
        gap = float((stored.total - in_memory.total).abs().max())
        section.rows.append(
            [
                label,
                f"{a_memory:.4f}",
                f"{a_memory - results.uncompressed:+.4f}",
                f"{a_store:.4f}",
                f"{a_store - a_memory:+.4f}; {gap:.1e}",
                f"{t_memory:.2f} / {t_store:.2f}",
            ]
        )
    section.notes += [
        f"Model as in hookinf/demo.py (seed {SEED}, {cfg.digits_epochs} epochs; held-out accuracy {accuracy:.1%}); "
        "self-influence with method='exact', damping 0.1 (relative), batches of 200.",
        "'via store': hookinf.log(model, train, loss, compress=C, path=...) then "
        "hookinf.self_influence(model, store, loss, method='exact') (the store's own compressor, float64 shards).",
    ]
    report.add(section)
    return results


# ---------------------------------------------------------------------------------------------------- targets
def part_targets(
    cfg: Config, steps: StepResults, compress: CompressResults, quality: QualityResults, report: Report
) -> None:
    section = Section("Targets", ["target", "measured", "holds"])
    if cfg.quick:
        section.notes.append(
            "--quick: the targets are set for the full sizes; at these small ones hookinf's fixed cost per layer and "
            "step outweighs a ~1 ms plain step, and Gaussian projections are small."
        )
    for bench_name, ratios in steps.ratios.items():
        for key, label in (("logra", f"LoGra({RANK}, {RANK})"), ("dropout", f"Dropout(r={R})")):
            value = ratios[key]
            section.rows.append(
                [f"{bench_name}: {label} logging step ≤ 1.3× plain (total ÷ N)", f"{value:.2f}×", yes(value <= 1.3)]
            )
    for r, ratio in compress.ratio.items():
        section.rows.append(
            [f"gpt2: Dropout(r={r}) compression ≥ 10× cheaper than Gaussian(r={r})", f"{ratio:.0f}×", yes(ratio >= 10)]
        )
    gap = quality.compressed["logra"] - quality.uncompressed
    section.rows.append(
        [
            f"digits: LoGra({RANK}, {RANK}) AUC within 0.02 of uncompressed exact",
            f"{quality.compressed['logra']:.4f} vs {quality.uncompressed:.4f} ({gap:+.4f})",
            yes(abs(gap) <= 0.02),
        ]
    )
    same = all(abs(quality.stored[k] - quality.compressed[k]) < 1e-12 for k in quality.compressed)
    section.rows.append(
        ["digits: AUC via a store = AUC in memory (every compressor)", "equal" if same else "differ", yes(same)]
    )
    report.add(section)


# ---------------------------------------------------------------------------------------------------- profile
def profile(cfg: Config, console: Console) -> None:
    """Where hookinf's logging steps and the Gaussian compression spend their time (cProfile, by function).

    cProfile rather than torch.profiler: the overhead to explain is mostly Python around small tensor operations,
    and torch 2.13's profiler intermittently fails to decode its own event names when ``with_stack=True``.
    """
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="hookinf-bench-") as tmp:
        for bench_name in ("mlp", "gpt2"):
            bench = build(bench_name, cfg)
            plain = Runner(bench)
            for key, compressor in (("logra", hookinf.LoGra(RANK, RANK)), ("dropout", hookinf.Dropout(r=R))):
                with ExitStack() as stack:
                    runner = HookinfRunner(bench, compressor, Path(tmp) / f"{bench_name}-{key}", stack)
                    for i in range(cfg.warmup):
                        runner.step(i)
                        plain.step(i)
                    steps = range(cfg.warmup, cfg.warmup + 2 * bench.flush_every // bench.batch_size)  # 2 shards
                    title = f"{bench_name}: {len(steps)} logging steps with {compressor!r}"
                    _profiled(console, title, steps, runner.step, plain.step)
        bench = gpt_bench(cfg)
        step, shapes = captured_step(bench)
        r = gaussian_plan(shapes, R)[0]
        bound = hookinf.Gaussian(r).bind(shapes)
        _profiled(console, f"gpt2: 3 × Gaussian(r={r}).compress(step)", range(3), lambda _: bound.compress(step))


def _profiled(
    console: Console,
    title: str,
    items: range,
    run: Callable[[int], object],
    plain: Callable[[int], object] | None = None,
) -> None:
    """Profiles ``run(i)`` for ``i`` in ``items``; prints hookinf's functions (cumulative) and the costliest leaves."""
    import cProfile
    import pstats

    plain_total = 0.0
    if plain is not None:  # the same steps without hookinf, unprofiled, for scale
        start = time.perf_counter()
        for item in items:
            plain(item)
        plain_total = time.perf_counter() - start
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for item in items:
        run(item)
    profiler.disable()
    wall = time.perf_counter() - start
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in stats.values())

    def label(key: tuple[str, int, str]) -> str:
        file, line, name = key
        if "/hookinf/" in file:
            return f"hookinf/{file.split('/hookinf/', 1)[1]}:{line} {name}"
        if file == "~":
            return name
        return f"{Path(file).name}:{line} {name}"

    scale = f"{wall / len(items) * 1e3:.1f} ms each under cProfile"
    if plain is not None:
        scale += f"; the plain step, unprofiled: {plain_total / len(items) * 1e3:.1f} ms"
    section = Section(
        f"{title} — {scale}",
        ["hookinf function (cumulative: with its callees)", "calls", "cumulative (s)", "share of profiled time"],
    )
    ours = sorted(((k, v) for k, v in stats.items() if "/hookinf/" in k[0]), key=lambda kv: -kv[1][3])
    for key, (_, calls, _, cumulative, _) in ours[:14]:
        section.rows.append([label(key), str(calls), f"{cumulative:.3f}", f"{cumulative / total:.1%}"])
    console.print(section.rich())
    section = Section(
        "… and the functions with the most own time (their largest caller)",
        ["function (own time)", "calls", "own (s)", "share", "largest caller"],
    )
    for key, (_, calls, own, _, callers) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:10]:
        caller = max(callers.items(), key=lambda kv: kv[1][3])[0] if callers else None
        section.rows.append(
            [label(key), str(calls), f"{own:.3f}", f"{own / total:.1%}", label(caller) if caller else ""]
        )
    console.print(section.rich())


# ---------------------------------------------------------------------------------------------------- main
def source_revision() -> str:
    """`` (commit abc1234)`` of the checkout hookinf runs from, ``+ changes`` when hookinf/ differs; else ``""``."""
    package = Path(hookinf.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" (commit {commit}{' + changes' if changed else ''})"


@contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hookinf-bench-logging-") as tmp:
        yield Path(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the target machine's cores)")
    parser.add_argument("--profile", action="store_true", help="only profile hookinf's logging steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        bench_name, key = args.worker.split(":")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.config).items()}
        cfg = Config(**fields)
        print("RESULT " + json.dumps(memory_worker(bench_name, key, cfg, Path(args.workdir))), flush=True)
        return

    cfg = Config.make(args.quick, args.threads)
    torch.set_num_threads(cfg.threads)
    quiet_libraries()
    console = Console(width=max(150, Console().width))
    if args.profile:
        profile(cfg, Console(width=400))
        return
    report = Report(console, "Gradient-logging benchmark: hookinf vs LogIX")
    python = os.path.relpath(sys.executable) if sys.executable.startswith(str(Path.cwd())) else sys.executable
    report.line(f"command: {shlex.join([python, os.path.relpath(__file__), *sys.argv[1:]])}")
    logix_version = f"LogIX {logix.__version__}" if logix is not None else LOGIX_MISSING
    report.line(
        f"torch {torch.__version__} · transformers {_dist_version('transformers')} · {logix_version} · "
        f"hookinf {hookinf.__version__}{source_revision()} · Python {platform.python_version()}"
    )
    report.line(
        f"{cfg.threads} torch threads · {os.cpu_count()} CPUs · {platform.processor() or platform.machine()} · load "
        f"average at start {os.getloadavg()[0]:.2f} · {'--quick' if cfg.quick else 'full run'} · "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    start = time.perf_counter()
    with workspace() as workdir:
        steps = StepResults()
        part_steps(cfg, workdir, report, steps)
        compress = part_compress(cfg, report)
        quality = part_quality(cfg, workdir, report)
    part_targets(cfg, steps, compress, quality, report)
    report.line(f"total {time.perf_counter() - start:.0f} s · load average at end {os.getloadavg()[0]:.2f}")
    if not cfg.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(report.markdown(), encoding="utf-8")
        console.print(f"wrote {os.path.relpath(RESULTS)}")


if __name__ == "__main__":
    main()
