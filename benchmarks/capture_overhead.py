"""Cost of capturing per-example factors: a training step inside ``hookinf.watch`` ÷ the same step without it.

    .venv/bin/python benchmarks/capture_overhead.py [--repeats 30]

Both variants run side by side in one process on the same model and batches (interleaved, median of repeats),
so the ratio is comparable across machines; absolute times are printed for context only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name, build in (("mlp", mlp), ("cnn", cnn), ("tiny-gpt2", tiny_gpt2)):
        measure(name, build, args.repeats)


if __name__ == "__main__":
    main()
