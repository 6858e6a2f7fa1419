"""hookinf's own passes differentiate with respect to the tracked layers' outputs, not the weights, where that is safe.

The output gradients ``δ`` are all hookinf needs; weight gradients are half a backward's work and thrown away. These
tests check that no weight gradient is formed on a plain model, that the in-place and checkpointing cases fall back
to the parameters exactly where needed, and that the scores stay equal to those of a plain backward (float64; the
two backwards run the same products for δ, so they agree to rounding, 1e-12 relative).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, seeded
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import hookinf

DTYPE = torch.float64


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def data(n_batches: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(5, 6, generator=gen, dtype=DTYPE), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(n_batches)
    ]


def mlp(inplace: bool) -> nn.Sequential:
    with seeded(3):
        return nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(6, 8),
                act1=nn.ReLU(inplace=inplace),
                fc2=nn.Linear(8, 8),
                act2=nn.Tanh(),
                fc3=nn.Linear(8, 3),
            )
        ).to(DTYPE)


class WeightGradientSpy:
    """Counts, per module, the backward computations of its weight gradient (tensor hooks on the parameters)."""

    def __init__(self, model: nn.Module) -> None:
        self.counts: dict[str, int] = {}
        self.handles = [p.register_hook(self._counter(name.rsplit(".", 1)[0])) for name, p in model.named_parameters()]

    def _counter(self, module: str):  # type: ignore[no-untyped-def]
        def hook(grad: Tensor) -> None:
            self.counts[module] = self.counts.get(module, 0) + 1

        return hook

    def __enter__(self) -> WeightGradientSpy:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def parameter_backward_scores(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> Tensor:
    """Exact scores with every backward taken with respect to the parameters (the path before this optimisation)."""
    with monkeypatch.context() as patch:
        patch.setattr(hookinf.Watch, "gradient_targets", lambda self: None)
        return hookinf.influence(model, data(3, 1), data(1, 2), loss_fn, method="exact", progress=False).total


def test_plain_model_forms_no_weight_gradient_and_scores_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp(inplace=False)
    with WeightGradientSpy(model) as spy:
        scores = hookinf.influence(model, data(3, 1), data(1, 2), loss_fn, method="exact", progress=False)
    assert spy.counts == {}  # the backward stopped at the layer outputs: no weight gradient was ever computed
    expected = parameter_backward_scores(model, monkeypatch)
    assert_close(scores.total, expected, rtol=1e-12, what="output targets vs parameter targets")


def test_inplace_activation_falls_back_to_that_layers_parameters_only(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp(inplace=True)  # relu_ rewrites fc1's output after fc1's forward hook saw it
    with WeightGradientSpy(model) as spy:
        scores = hookinf.influence(model, data(3, 1), data(1, 2), loss_fn, method="exact", progress=False)
    assert set(spy.counts) == {"fc1"}  # fc2 and fc3 still stop at their outputs
    expected = parameter_backward_scores(model, monkeypatch)
    assert_close(scores.total, expected, rtol=1e-12, what="in-place ReLU: output targets vs parameter targets")


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = self.block(h) if self.use_reentrant is None else checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        return self.head(h)


@pytest.fixture
def plain_checkpointed_scores() -> tuple[Checkpointed, Tensor]:
    with seeded(4):
        model = Checkpointed(None).to(DTYPE)
    return model, hookinf.influence(model, data(3, 1), data(1, 2), loss_fn, method="exact", progress=False).total


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_scores(
    plain_checkpointed_scores: tuple[Checkpointed, Tensor], use_reentrant: bool
) -> None:
    model, expected = plain_checkpointed_scores
    model.use_reentrant = use_reentrant  # reentrant: the block's first forward runs without grad → parameters used
    got = hookinf.influence(model, data(3, 1), data(1, 2), loss_fn, method="exact", progress=False).total
    assert_close(got, expected, rtol=1e-12, what=f"checkpointed (use_reentrant={use_reentrant}) vs plain")


def test_recording_ends_when_loss_fn_raises() -> None:
    model = mlp(inplace=False)

    def broken(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        model(batch[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hookinf.influence(model, data(1, 1), data(1, 2), broken, method="identity", progress=False)
    with hookinf.watch(model) as w:  # a fresh watch afterwards records nothing unless asked
        F.cross_entropy(model(data(1, 3)[0][0]), data(1, 3)[0][1]).backward()
        assert w.gradient_targets() is None


def test_reentrant_checkpoint_leaves_every_grad_as_it_was(
    plain_checkpointed_scores: tuple[Checkpointed, Tensor],
) -> None:
    model, _ = plain_checkpointed_scores
    model.use_reentrant = True  # only backward() runs through it: hookinf must put every .grad back
    marks = {name: torch.full_like(p, float(i)) for i, (name, p) in enumerate(model.named_parameters())}
    for name, p in model.named_parameters():
        p.grad = marks[name].clone() if name.startswith("block") else None
    hookinf.influence(model, data(2, 1), data(1, 2), loss_fn, method="identity", progress=False)
    for name, p in model.named_parameters():
        if name.startswith("block"):
            assert p.grad is not None, name
            assert torch.equal(p.grad, marks[name]), name
        else:
            assert p.grad is None, name


# ---------------------------------------------------------------------------------------------------- scalar losses
def _mean_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])  # the batch mean, F.cross_entropy's default


def _sum_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")


@pytest.mark.parametrize(
    "call",
    [
        lambda model, train, loss: hookinf.fit(model, train, loss, method="kfac", progress=False),
        lambda model, train, loss: hookinf.influence(model, train, train[:1], loss, method="identity", progress=0),
        lambda model, train, loss: hookinf.self_influence(model, train, loss, method="exact", progress=False),
    ],
    ids=["fit", "influence", "self_influence"],
)
def test_a_scalar_loss_is_refused_unless_declared_a_sum(call: object) -> None:
    """A batch mean taken as a sum would scale every gradient by 1/B: refused, with the two fixes in the message."""
    model, train = mlp(inplace=False), data(3, seed=0)
    assert callable(call)
    with pytest.raises(hookinf.DataError, match=r"reduction='none'.*hookinf\.summed"):
        call(model, train, _mean_loss)
    with pytest.raises(hookinf.DataError, match="one number for the whole batch"):
        call(model, train, _sum_loss)  # a sum, undeclared: refused too (hookinf cannot tell)
    declared, per_example = call(model, train, hookinf.summed(_sum_loss)), call(model, train, loss_fn)
    if isinstance(declared, hookinf.Curvature):
        for key, value in per_example.tensors.items():
            assert_close(declared.tensors[key], value, rtol=1e-12, atol=1e-14)
    elif isinstance(declared, hookinf.Scores):
        assert isinstance(per_example, hookinf.Scores)
        assert_close(declared.total, per_example.total, rtol=1e-10, atol=0)
    else:
        assert_close(declared, per_example, rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------------- bad input
def test_an_empty_module_list_is_refused_with_what_to_pass() -> None:
    model, train = mlp(inplace=False), data(1, seed=0)
    with pytest.raises(hookinf.ConfigurationError, match=r"modules=\[\] selects no layer.*modules=None"):
        hookinf.fit(model, train, loss_fn, modules=[], method="kfac", progress=False)
    with pytest.raises(hookinf.ConfigurationError, match=r"modules=\[\]"):
        hookinf.watch(model, modules=[])


def test_a_model_on_the_meta_device_is_refused_naming_the_layer() -> None:
    with torch.device("meta"):
        model = mlp(inplace=False)
    with pytest.raises(hookinf.ConfigurationError, match=r"layer 'fc1' has its parameters on the 'meta' device"):
        hookinf.fit(model, data(1, seed=0), loss_fn, method="kfac", progress=False)
    with pytest.raises(hookinf.ConfigurationError, match="meta"):
        hookinf.watch(model)


def test_a_batch_led_by_a_scalar_tensor_is_refused_when_ids_are_counted(tmp_path: Path) -> None:
    model = mlp(inplace=False)
    batches = [(torch.tensor(i), x, y) for i, (x, y) in enumerate(data(2, seed=0))]  # a batch index put first

    def indexed_loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        return loss_fn(model, (batch[1], batch[2]))

    compress = hookinf.LoGra(2, 2)
    with pytest.raises(hookinf.DataError, match=r"first tensor is a scalar \(0-d\).*ids="):
        hookinf.log(model, batches, indexed_loss, compress=compress, path=tmp_path / "s", progress=False)

    def ids(batch: tuple[Tensor, Tensor, Tensor]) -> range:
        return range(5 * int(batch[0]), 5 * int(batch[0]) + 5)

    store = hookinf.log(model, batches, indexed_loss, compress=compress, path=tmp_path / "t", ids=ids, progress=False)
    assert sorted(store.ids.tolist()) == list(range(10))


def test_the_default_method_is_exact_for_small_layers_and_ekfac_for_large_ones() -> None:
    """One default for fit, influence and self_influence: a layer above 8,192 parameters no longer fails the call."""
    small, train = mlp(inplace=False), data(2, seed=0)
    assert hookinf.fit(small, train, loss_fn, progress=False).method == "exact"
    assert hookinf.influence(small, train, train[:1], loss_fn, progress=False).method == "exact"
    with seeded(0):
        large = nn.Sequential(nn.Linear(6, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 3))
    large = large.to(DTYPE)
    scores = hookinf.influence(large, train, train[:1], loss_fn, progress=False)  # Linear(128, 128): 16,512 > 8,192
    assert scores.method == "ekfac"
    assert hookinf.fit(large, train, loss_fn, progress=False).method == "ekfac"
    assert hookinf.self_influence(large, train, loss_fn, progress=False).shape == (10,)
    compressed = hookinf.influence(large, train, train[:1], loss_fn, compress=hookinf.LoGra(8, 8), progress=False)
    assert compressed.method == "exact"  # 8 × 8 compressed dimensions per layer
    with pytest.raises(hookinf.ConfigurationError, match="'auto'"):
        hookinf.influence(small, train, train[:1], loss_fn, method="bogus", progress=False)
