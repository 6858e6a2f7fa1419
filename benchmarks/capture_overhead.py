"""Cost of capturing per-example factors: time, peak memory and host reads of a watched step against a plain one.

    .venv/bin/python benchmarks/capture_overhead.py [--repeats 30]

Every variant (plain, a bare watch, logging with LoGra compressed in the hooks, and logging compressed after the
step — the data path before compression moved into the hooks) runs on its own copy of the model, side by side in
one process (interleaved, median of repeats), so the ratios are comparable across machines; absolute times are
printed for context only. Then the peak live tensor memory of one step of each variant (a ``TorchDispatchMode``
tracking every allocated storage until it is freed) and the device-to-host reads per training step (the aten calls
``_local_scalar_dense``, ``nonzero``, ``is_nonzero`` and ``equal``; on an accelerator each one stalls the step until
the device catches up). Memory and reads are counts, not timings, so the CPU gives the numbers a GPU would.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _memory import HostReads, LiveBytes
from torch import nn

import hookinf
from hookinf.logger import GradientLogger
from hookinf.pipeline import Pipeline
from hookinf.selection import select

Builder = Callable[[], tuple[nn.Module, Callable[[], torch.Tensor]]]


def mlp() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    return model, lambda: F.cross_entropy(model(x), y)


def cnn() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )  # fmt: skip
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return model, lambda: F.cross_entropy(model(x), y)


def tiny_gpt2() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=500, n_positions=64))
    ids = torch.randint(0, 500, (16, 64))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def step(loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    loss().backward()
    opt.step()


class Variant:
    """One way to run the training step, on its own copy of the model (same weights; lr 0, so every step is alike)."""

    def __init__(self, label: str, model: nn.Module, loss: Callable[[], torch.Tensor], how: str, tmp: Path) -> None:
        self.label = label
        self.model, self.loss = model, loss
        self.opt = torch.optim.SGD(model.parameters(), lr=0.0)
        self.ids = 0
        self.batch = _batch_size(model, loss)
        self.stack = ExitStack()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2's tied lm_head is left out of the default selection
            self.watch = _watch(model, how, tmp / label.replace(" ", "-"))
        if self.watch is not None:
            self.stack.enter_context(self.watch)

    def step(self) -> None:
        if self.watch is not None and self.watch.consumers:
            self.watch.tag(range(self.ids, self.ids + self.batch))
            self.ids += self.batch
        step(self.loss, self.opt)
        if self.watch is not None:
            self.watch.last_step  # noqa: B018 - closes the step (compress, buffer), as a consumer of the captures does

    def close(self) -> None:
        self.stack.close()


LOGRA = hookinf.LoGra(16, 16)
VARIANTS = {
    "plain": "plain",
    "watch": "watch",
    "log LoGra": "log",
    "log LoGra, compressed after the step": "log-late",
}


def _watch(model: nn.Module, how: str, directory: Path) -> hookinf.Watch | None:
    """The watch of a variant. ``log-late`` is the data path before compression moved into the hooks: the raw
    factors are held until the step closes, then compressed by a pipeline transform (kept here for comparison)."""
    if how == "plain":
        return None
    if how == "watch":
        return hookinf.Watch(model)
    if how == "log":
        return hookinf.watch(model, log_to=directory, compress=LOGRA, flush_every=1 << 20)
    selection = select(model, None)
    bound = LOGRA.bind(selection.shapes)
    logger = GradientLogger(directory, bound, selection.parameters(), 1 << 20)
    return hookinf.Watch(model, modules=selection, consumers=[Pipeline([logger], [bound.compress])])


def variants(build: Builder, tmp: Path) -> list[Variant]:
    torch.manual_seed(0)
    model, _ = build()
    state = copy.deepcopy(model.state_dict())
    out = []
    for label, how in VARIANTS.items():
        torch.manual_seed(0)
        twin, loss = build()
        twin.load_state_dict(state)
        out.append(Variant(label, twin, loss, how, tmp))
    return out


def measure(name: str, build: Builder, repeats: int) -> None:
    """Median step time of each variant, interleaved; the logging variants never flush (the writes are the
    logging benchmark's), so this is the hooks' and the compression's cost."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = variants(build, Path(tmp))
        times: dict[str, list[float]] = {v.label: [] for v in runs}
        try:
            for _ in range(3):
                for v in runs:
                    v.step()
            for _ in range(repeats):
                for v in random.sample(runs, len(runs)):  # a fresh order each round: drift hits all alike
                    start = time.perf_counter()
                    v.step()
                    times[v.label].append(time.perf_counter() - start)
        finally:
            for v in runs:
                v.close()
    plain = statistics.median(times["plain"])
    cells = "   ".join(f"{label} {statistics.median(t) / plain:5.2f}" for label, t in times.items() if label != "plain")
    print(f"{name:10s} plain {plain * 1e3:8.2f} ms   ÷ plain: {cells}")


def peak_memory(name: str, build: Builder) -> None:
    """Peak live tensor memory of one training step per variant (after warm-up steps), and its excess over plain."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = variants(build, Path(tmp))
        peaks: dict[str, float] = {}
        try:
            for v in runs:
                for _ in range(2):
                    v.step()
                with LiveBytes() as live:
                    v.step()
                peaks[v.label] = live.peak / 2**20
        finally:
            for v in runs:
                v.close()
    plain = peaks["plain"]
    cells = "   ".join(f"{label} +{peak - plain:7.2f}" for label, peak in peaks.items() if label != "plain")
    print(f"{name:10s} peak MiB: plain {plain:8.2f}   extra: {cells}")


def host_reads(name: str, build: Builder, steps: int = 8) -> None:
    torch.manual_seed(0)
    model, loss = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss().backward()  # once outside any count (lazily created library state)
    model.zero_grad()
    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants: dict[str, dict[str, Any]] = {
            "plain": {},
            "watch": {"watch": {}},
            "fit=kfac": {"watch": {"fit": "kfac"}},
            "log_to LoGra": {"watch": {"log_to": Path(tmp) / "s", "compress": hookinf.LoGra(16, 16)}, "tag": True},
        }
        for label, options in variants.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # GPT-2's tied lm_head is left out of the default selection
                w = hookinf.watch(model, **options["watch"]) if "watch" in options else None
            with HostReads() as reads:
                if w is not None:
                    w.__enter__()
                for i in range(steps):
                    if options.get("tag") and w is not None:
                        w.tag(range(1000 * i, 1000 * i + _batch_size(model, loss)))
                    opt.zero_grad()
                    loss().backward()
                    opt.step()
                if w is not None:
                    w.__exit__(None, None, None)  # counted too: it reads the last step's check
            counts[label] = reads.count / steps
    shown = "   ".join(f"{label} {value:.2f}" for label, value in counts.items())
    print(f"{name:10s} host reads per step: {shown}")


def _batch_size(model: nn.Module, loss: Callable[[], torch.Tensor]) -> int:
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(_first_dim(args, kwargs)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            loss()
    finally:
        handle.remove()
    return sizes[0]


def _first_dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("no tensor input")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    models: tuple[tuple[str, Builder], ...] = (("mlp", mlp), ("cnn", cnn), ("tiny-gpt2", tiny_gpt2))
    print("1. step time ÷ a plain step (median, interleaved)")
    for name, build in models:
        measure(name, build, args.repeats)
    print("2. peak live tensor memory of one step (MiB) and the excess over the plain step")
    for name, build in models:
        peak_memory(name, build)
    print("3. device-to-host reads per step")
    for name, build in models:
        host_reads(name, build)


if __name__ == "__main__":
    main()
