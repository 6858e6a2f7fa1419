"""Cost of capturing per-example factors: a training step inside ``hookinf.watch`` ÷ the same step without it.

    .venv/bin/python benchmarks/capture_overhead.py [--repeats 30]

Both variants run side by side in one process on the same model and batches (interleaved, median of repeats),
so the ratio is comparable across machines; absolute times are printed for context only.

Then, per model, the device-to-host reads per training step (the aten calls ``_local_scalar_dense``, ``nonzero``,
``is_nonzero`` and ``equal``, counted with a ``TorchDispatchMode``; on an accelerator each one stalls the step
until the device catches up): plain, inside a bare ``watch``, with ``fit="kfac"`` and with ``log_to=`` +
``LoGra(16, 16)``. They are counts, not timings, so the CPU gives the numbers a GPU would.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hookinf


def mlp() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    return model, lambda: F.cross_entropy(model(x), y)


def cnn() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 15 * 15, 10),
    )  # fmt: skip
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return model, lambda: F.cross_entropy(model(x), y)


def tiny_gpt2() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=500, n_positions=64))
    ids = torch.randint(0, 500, (16, 64))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def step_time(loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    loss().backward()
    opt.step()
    return time.perf_counter() - start


def measure(name: str, build: Callable[[], tuple[nn.Module, Callable[[], torch.Tensor]]], repeats: int) -> None:
    torch.manual_seed(0)
    model, loss = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: identical work each step
    plain, watched = [], []
    for _ in range(3):
        step_time(loss, opt)
    for _ in range(repeats):  # interleaved so that drift in machine load hits both alike
        plain.append(step_time(loss, opt))
        with hookinf.watch(model) as w:
            start = time.perf_counter()
            step_time(loss, opt)
            w.last_step  # noqa: B018 - closes the step, as a consumer of the captures does
            watched.append(time.perf_counter() - start)
    p, c = statistics.median(plain), statistics.median(watched)
    print(f"{name:10s} plain {p * 1e3:8.2f} ms   watched {c * 1e3:8.2f} ms   ratio {c / p:5.2f}")


class HostReads(TorchDispatchMode):
    """Counts the aten calls that read a tensor's value on the host."""

    NAMES = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "equal"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func.overloadpacket.__name__ in self.NAMES
        return func(*args, **(kwargs or {}))


def host_reads(name: str, build: Callable[[], tuple[nn.Module, Callable[[], torch.Tensor]]], steps: int = 8) -> None:
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
    for name, build in (("mlp", mlp), ("cnn", cnn), ("tiny-gpt2", tiny_gpt2)):
        measure(name, build, args.repeats)
    for name, build in (("mlp", mlp), ("cnn", cnn), ("tiny-gpt2", tiny_gpt2)):
        host_reads(name, build)


if __name__ == "__main__":
    main()
