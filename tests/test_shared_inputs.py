"""Layers that read one input (q, k and v of an attention block; gate and up of a gated MLP) share their activations.

Their activations ``a`` are formed once per step and held once (:meth:`hookinf.layers.LayerAdapter.sharing_key`);
K-FAC accumulates ``Σ aᵀa`` once for all of them and decomposes the (bit-identical) factor once; EK-FAC rotates
``a`` by that shared eigenbasis once per step. The oracle is the same model whose layers each read their own copy
of the input (``x.clone()``: the same numbers, nothing shared): every statistic and score must agree with it, to the
rounding of another summation order in float64 (1e-12 relative), and the shared factors must be bit-identical
across their readers. The saving is counted in operations (eigendecompositions, ``[I, I]`` products), not timed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import hookinf
from hookinf.capture import Step

F64 = torch.float64
IN = 12  # the shared input's width: no other factor is [12, 12]
TOL = 1e-12  # the same float64 numbers summed in another order


class Block(nn.Module):
    """q, k (Linear, no bias) and v (GPT-2 Conv1D, bias frozen) read ``x``; qb (Linear with a bias) reads it too
    but forms other activations (its ones column); o reads the mixed result. ``separate=True``: each reads a copy."""

    def __init__(self, separate: bool = False) -> None:
        super().__init__()
        self.separate = separate
        self.q = nn.Linear(IN, 7, bias=False)
        self.k = nn.Linear(IN, 7, bias=False)
        self.v = Conv1D(7, IN)
        self.v.bias.requires_grad_(False)
        self.qb = nn.Linear(IN, 7)
        self.o = nn.Linear(7, 3)

    def _input(self, x: Tensor) -> Tensor:
        return x.clone() if self.separate else x

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.q(self._input(x)) * self.k(self._input(x)) + self.v(self._input(x)) + self.qb(self._input(x))
        return self.o(torch.tanh(mixed)).mean(dim=1)


def pair() -> tuple[Block, Block]:
    torch.manual_seed(0)
    shared = Block().to(F64)
    separate = Block(separate=True).to(F64)
    separate.load_state_dict(shared.state_dict())
    return shared, separate


def batches(n: int = 3) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 5, IN, generator=gen, dtype=F64), torch.randint(0, 3, (4,), generator=gen)) for _ in range(n)
    ]


LOSS = hookinf.CrossEntropy(logits=lambda model, batch: model(batch[0]), target=lambda batch: batch[1])


class Collect:
    """A consumer keeping every step."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def consume(self, step: Step) -> None:
        self.steps.append(step)

    def close(self) -> None:
        pass


def watched_step(model: Block, batch: tuple[Tensor, Tensor]) -> Step:
    collect = Collect()
    with hookinf.Watch(model, consumers=[collect]):
        F.cross_entropy(model(batch[0]), batch[1]).backward()
    model.zero_grad()
    return collect.steps[0]


class CountOps(TorchDispatchMode):
    """Counts eigendecompositions and the matrix products whose right operand is ``[IN, IN]`` (a ``Q_A`` of the
    shared input) or whose output is ``[IN, IN]`` (its ``Σ aᵀa``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "_linalg_eigh":
            self.counts["eigh"] += 1
        elif name in ("addmm", "addmm_", "mm") and isinstance(out, Tensor) and tuple(out.shape) == (IN, IN):
            self.counts["gram"] += 1
        elif name in ("mm", "bmm") and tuple(args[1].shape[-2:]) == (IN, IN):
            self.counts["rotation"] += 1
        return out


def test_layers_reading_one_input_alike_get_one_activation_tensor() -> None:
    shared, separate = pair()
    batch = batches(1)[0]
    step, oracle = watched_step(shared, batch), watched_step(separate, batch)
    layers = step.layers
    assert layers["q"].a is layers["k"].a is layers["v"].a  # Linear and Conv1D form a alike from one input
    assert layers["qb"].a is not layers["q"].a  # its bias's ones column makes other activations
    assert len({id(c.a) for c in oracle.layers.values()}) == 5  # copies of the input: nothing shared
    for name in layers:
        assert torch.equal(layers[name].a, oracle.layers[name].a), name
        assert torch.equal(layers[name].delta, oracle.layers[name].delta), name


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_shared_factors_are_accumulated_and_decomposed_once_with_the_same_result(method: str) -> None:
    shared, separate = pair()
    data = batches()
    counted = {}
    fits = {}
    for label, model in (("shared", shared), ("separate", separate)):
        with CountOps() as ops:
            fits[label] = hookinf.fit(model, data, LOSS, method=method)
            assert len(fits[label].lambdas) == 5  # forces K-FAC's lazy eigendecompositions
        counted[label] = ops.counts
    # eigendecompositions: A of {q, k, v}, of qb and of o, and S of all five = 8, not 10 — also for the copies,
    # whose three factors are bit-identical too (the same numbers, summed alike): equal factors are decomposed once
    assert counted["shared"]["eigh"] == counted["separate"]["eigh"] == 8
    # Σ aᵀa of the shared input: once per step, not three times
    assert counted["shared"]["gram"] == len(data)
    assert counted["separate"]["gram"] == 3 * len(data)
    if method == "ekfac":  # the rotation a Q_A of the shared input by its shared basis: once per step
        assert counted["shared"]["rotation"] == len(data)
        assert counted["separate"]["rotation"] == 3 * len(data)
    fit, oracle = fits["shared"], fits["separate"]
    for name in ("k", "v"):
        assert torch.equal(fit.stat(name, "A"), fit.stat("q", "A")), name  # bit-identical: the same additions
    for key, value in fit.tensors.items():
        assert_close(value, oracle.tensors[key], rtol=TOL, atol=TOL * float(value.abs().max()), what=key)


def test_scores_with_shared_inputs_equal_the_unshared_model() -> None:
    shared, separate = pair()
    train, query = batches(3), batches(1)
    got = hookinf.influence(shared, train, query, LOSS, method="ekfac")
    want = hookinf.influence(separate, train, query, LOSS, method="ekfac")
    for name in got.per_layer:
        scale = float(want.per_layer[name].abs().max())
        assert_close(got.per_layer[name], want.per_layer[name], rtol=1e-10, atol=1e-10 * scale, what=name)


def test_a_saved_fit_with_shared_factors_loads_and_scores_alike(tmp_path: Any) -> None:
    shared, _ = pair()
    fit = hookinf.fit(shared, batches(), LOSS, method="ekfac")
    fit.save(tmp_path / "fit")
    loaded = hookinf.load(tmp_path / "fit")
    for key, value in fit.tensors.items():
        assert torch.equal(loaded.tensors[key], value), key
    query = batches(1)
    got = hookinf.influence(shared, batches(), query, LOSS, method=loaded)
    want = hookinf.influence(shared, batches(), query, LOSS, method=fit)
    for name in want.per_layer:
        assert torch.equal(got.per_layer[name], want.per_layer[name]), name


def test_lora_adapters_on_two_projections_of_one_input_share_their_activations() -> None:
    peft = pytest.importorskip("peft")

    class QV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.v, self.head = nn.Linear(IN, IN), nn.Linear(IN, IN), nn.Linear(IN, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.q(x) * self.v(x))).mean(dim=1)

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["q", "v"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(QV().to(F64), config)
    collect = Collect()
    x, y = batches(1)[0]
    with hookinf.Watch(model, modules=["*.lora_A.default", "*.lora_B.default"], consumers=[collect]):
        F.cross_entropy(model(x), y).backward()
    layers = {name.split(".")[-3] + "." + name.split(".")[-2]: c for name, c in collect.steps[0].layers.items()}
    assert layers["q.lora_A"].a is layers["v.lora_A"].a  # both adapters' A matrices read the block's input
    assert layers["q.lora_B"].a is not layers["v.lora_B"].a  # their B matrices read each A's output
    assert torch.equal(layers["q.lora_A"].a, x.reshape(4, 5, IN))


class CountAminmax(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += func.overloadpacket.__name__ == "aminmax"
        return func(*args, **(kwargs or {}))


def test_a_shared_input_is_checked_for_finiteness_once_and_named_by_its_first_reader() -> None:
    shared, separate = pair()
    x, y = batches(1)[0]
    counts = {}
    for label, model in (("shared", shared), ("separate", separate)):
        with CountAminmax() as ops:
            watched_step(model, (x, y))
        counts[label] = ops.calls
    # inputs: x once (not 4 times: q, k, v, qb) and o's; output gradients: one per layer (5)
    assert counts["shared"] == 2 + 5
    assert counts["separate"] == 5 + 5
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    collect = Collect()
    error = pytest.raises(hookinf.NonFiniteGradientError, match="layer 'q': captured input activations")
    with error, hookinf.Watch(shared, consumers=[collect]) as watch:
        F.cross_entropy(shared(bad), y).backward()
        watch.verify()
