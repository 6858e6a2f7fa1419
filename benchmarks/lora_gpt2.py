"""Tokens per second of a GPT-2-size LoRA fine-tune: a plain step, a watched step, a fitting and a logging step.

    .venv/bin/python benchmarks/lora_gpt2.py [--device cuda] [--quick] [--rounds 5]

GPT-2 small's shape (12 blocks, 768 wide, 12 heads, vocabulary 50,257; random weights from its config: nothing is
downloaded) with peft LoRA (rank 16, α 32) on every attention and MLP ``Conv1D`` (``c_attn``, both ``c_proj``,
``c_fc``: 48 adapted layers, 96 tracked ``lora_A``/``lora_B``), trained with AdamW on the adapters. On CUDA the base
weights are bfloat16, the adapters float32 (peft's default) and every step runs under ``torch.autocast(bfloat16)``,
as a LoRA fine-tune on a GPU does; on the CPU (no bfloat16 arithmetic on this project's AVX2 machines) the model is
float32 unless ``--dtype bfloat16`` says otherwise.

Four variants, each on its own copy of the model (same weights), timed in interleaved rounds (a fresh random order
each round; ``torch.cuda.synchronize`` around every timed block on CUDA), ``--steps`` steps per round:

1. plain: ``zero_grad``, the forward under autocast, ``backward``, ``AdamW.step``;
2. watch: the same inside a bare ``hookinf.Watch`` (hooks capture, no consumer);
3. fit=kfac: inside ``hookinf.watch(fit="kfac")`` (the Kronecker factors accumulated on the device every step);
4. log LoGra: inside ``hookinf.watch(log_to=..., compress=LoGra(16, 16), flush_every=4 batches)`` (compressed in the
   hooks, shards written in the timed steps: the writes are included).

Then, for one step of each variant after warm-up: its peak memory above what was allocated before it (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the live tensor storages, counted with ``_memory.LiveBytes``),
and the device-to-host reads per step (``_memory.HostReads``: each one a synchronisation on a GPU). A full
run writes ``benchmarks/results/lora-gpt2-<device>.md``; ``--quick`` (a tiny GPT-2, a smoke run) writes nothing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from _memory import HostReads, LiveBytes
from _report import Report, Section
from rich.console import Console
from torch import nn

import hookinf

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "watch", "fit=kfac", "log LoGra(16, 16)")


def build(quick: bool, device: torch.device, dtype: torch.dtype, rank: int) -> nn.Module:
    """GPT-2 (small's shape, or a tiny one) with random weights in ``dtype`` on ``device``, LoRA on every Conv1D."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # "loss_type=None ... Using the default loss": the default is the one wanted

    layers, heads, width, vocab = (2, 4, 64, 500) if quick else (12, 12, 768, 50257)
    config = GPT2Config(
        n_layer=layers, n_head=heads, n_embd=width, vocab_size=vocab, n_positions=1024, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    )  # fmt: skip
    torch.manual_seed(0)
    model: nn.Module = GPT2LMHeadModel(config)
    model.to(device=device, dtype=dtype)
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out is right for GPT-2's Conv1D
        return get_peft_model(model, lora)


class Variant:
    """One way to run the training step, on its own copy of the model."""

    def __init__(self, label: str, model: nn.Module, batches: list[torch.Tensor], autocast: Any, tmp: Path) -> None:
        self.label, self.model, self.batches, self.autocast = label, model, batches, autocast
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.ids, self.i = 0, 0
        self.batch = int(batches[0].shape[0])
        self.stack = ExitStack()
        self.watch: hookinf.Watch | None = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2's tied lm_head: not trainable under peft, nothing to warn about
            if label == "watch":
                self.watch = hookinf.Watch(model)
            elif label == "fit=kfac":
                self.watch = hookinf.watch(model, fit="kfac")
            elif label.startswith("log"):
                self.watch = hookinf.watch(
                    model, log_to=tmp / "store", compress=hookinf.LoGra(16, 16), flush_every=4 * self.batch
                )
        if self.watch is not None:
            self.stack.enter_context(self.watch)

    def step(self) -> None:
        ids = self.batches[self.i % len(self.batches)]
        self.i += 1
        if self.watch is not None and self.label.startswith("log"):
            self.watch.tag(range(self.ids, self.ids + self.batch))
            self.ids += self.batch
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()

    def close(self) -> None:
        self.stack.close()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_memory(variant: Variant, device: torch.device) -> float:
    """MiB a step of ``variant`` holds at its peak above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        variant.step()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before) / 2**20
    with LiveBytes() as live:
        variant.step()
    return float(live.peak) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT-2 (a smoke run); no results file")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8 on CUDA, 2 on CPU)")
    parser.add_argument("--tokens", type=int, help="tokens per sequence (default 1024 on CUDA, 128 on CPU)")
    parser.add_argument("--steps", type=int, help="steps per variant per round (default 5 on CUDA, 3 on CPU)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5 on CUDA, 3 on CPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    batch = args.batch or (8 if cuda and not args.quick else 2)
    tokens = args.tokens or (32 if args.quick else 1024 if cuda else 128)
    steps = 2 if args.quick else args.steps or (5 if cuda else 3)
    rounds = 2 if args.quick else args.rounds or (5 if cuda else 3)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()

    console = Console(width=150)  # the device tool returns the output as text: keep the table's columns whole
    report = Report(console, f"LoRA GPT-2 on {device.type}: tokens per second of a plain, a watched and a logging step")
    report.run_header(__file__, sys.argv[1:], None if cuda else args.threads)
    if cuda:
        report.line(f"device: {torch.cuda.get_device_name(device)} · torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    vocab = 500 if args.quick else 50257
    batches = [torch.randint(0, vocab, (batch, tokens), generator=gen).to(device) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        runs = []
        for i, label in enumerate(VARIANTS):
            variant = Variant(label, build(args.quick, device, dtype, 16), batches, autocast, Path(tmp) / str(i))
            stack.callback(variant.close)
            runs.append(variant)
        tracked = len(runs[1].watch.layers) if runs[1].watch is not None else 0
        for v in runs:
            for _ in range(2):  # warm-up: allocator, cuBLAS handles, lazily built projections
                v.step()
        synchronize(device)
        times: dict[str, list[float]] = {v.label: [] for v in runs}
        for _ in range(rounds):
            for v in random.sample(runs, len(runs)):
                synchronize(device)
                start = time.perf_counter()
                for _ in range(steps):
                    v.step()
                synchronize(device)
                times[v.label].append((time.perf_counter() - start) / steps)
        memory = {v.label: step_memory(v, device) for v in runs}
        reads: dict[str, float] = {}
        for v in runs:
            with HostReads() as counter:
                for _ in range(steps):
                    v.step()
            reads[v.label] = counter.count / steps
    plain = statistics.median(times["plain"])
    section = Section(
        f"{batch} × {tokens} tokens per step, {'bfloat16 autocast' if dtype == torch.bfloat16 else 'float32'}, "
        f"{tracked} tracked LoRA layers; median of {rounds} rounds of {steps} steps",
        ["step", "ms / step", "tokens / s", "÷ plain step", "peak MiB above the step's start", "extra over plain",
         "host reads / step"],
    )  # fmt: skip
    for label, values in times.items():
        seconds = statistics.median(values)
        section.rows.append(
            [label, f"{seconds * 1e3:.1f}", f"{batch * tokens / seconds:,.0f}", f"{seconds / plain:.2f}",
             f"{memory[label]:.1f}", "" if label == "plain" else f"+{memory[label] - memory['plain']:.1f}",
             f"{reads[label]:.2f}"]
        )  # fmt: skip
    section.notes.append(
        "the logging step's time includes its shards' writes (a shard every 4 steps); host reads count aten "
        "_local_scalar_dense, nonzero, is_nonzero and equal calls per step, AdamW's included"
    )
    report.add(section)
    if not args.quick:
        results = ROOT / "benchmarks" / "results" / f"lora-gpt2-{device.type}.md"
        results.write_text(report.markdown(), encoding="utf-8")
        console.print(f"written: {results.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
