"""``hookinf.watch`` checks its first backward's loss against ``loss_reduction`` (issue: loss scaling silently wrong).

Before this check, ``watch()``'s default ``loss_reduction="mean"`` with a summed loss gave per-example gradients ``B``
times too large without a word (the first test shows the size of that error against ``torch.func``). Oracle: the
per-example gradients from ``torch.func`` (conftest's ``oracle_matrices``), and the verdicts listed in
``hookinf.reduction_probe``'s docstring.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_CASES, ModelCase, close, oracle_matrices
from torch import Tensor
from torch.overrides import _get_current_function_mode_stack

import hookinf
from hookinf import ConfigurationError
from hookinf.reduction_probe import reduction_of

# float64 model, per-example gradients from the hooks vs torch.func: summation order only (see test_capture.py).
TOL = 1e-10


def mlp() -> ModelCase:
    return MODEL_CASES["mlp-bias"]()


def logits_and_labels(case: ModelCase) -> tuple[Tensor, Tensor]:
    x, y = case.make_batch(1)
    return case.model(x), y


Loss = Callable[[Tensor, Tensor], Tensor]


def watched_backward(case: ModelCase, loss: Loss, declared: str = "mean", *, grad: bool = False) -> None:
    """One watched step differentiating ``loss(logits, labels)`` with ``backward`` (or ``autograd.grad``)."""
    with hookinf.watch(case.model, modules=case.modules, loss_reduction=declared):
        value = loss(*logits_and_labels(case))
        if grad:
            torch.autograd.grad(value, list(case.model.parameters()))
        else:
            value.backward()


def test_a_sum_loss_under_the_default_mean_is_refused_before_the_backward() -> None:
    case = mlp()
    before = {name: p.detach().clone() for name, p in case.model.named_parameters()}
    with pytest.raises(ConfigurationError, match=r"is a sum over the batch of 4 .* loss_reduction='sum'"):
        watched_backward(case, lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    assert all(p.grad is None for p in case.model.parameters())  # refused before the backward ran
    assert all(torch.equal(p, before[name]) for name, p in case.model.named_parameters())
    assert _get_current_function_mode_stack() == []
    assert not torch.nn.modules.module._global_forward_pre_hooks


@pytest.mark.parametrize("declared", ["mean", "sum"])
def test_the_declared_reduction_gives_each_examples_own_gradient(declared: str) -> None:
    case = mlp()
    batch = case.make_batch(1)
    with hookinf.watch(case.model, modules=case.modules, loss_reduction=declared) as w:
        losses = case.loss_fn(case.model, batch)
        (losses.mean() if declared == "mean" else losses.sum()).backward()
        grads = w.per_example_gradients()
    for name, expected in oracle_matrices(case.model, case.loss_fn, [batch], list(w.layers)).items():
        close(grads[name], expected, TOL, f"{declared}: layer {name!r}")


@pytest.mark.parametrize(
    ("declared", "loss", "refused"),
    [
        ("mean", lambda out, y: F.cross_entropy(out, y, reduction="none").sum(), "sum"),
        ("mean", lambda out, y: F.mse_loss(out, F.one_hot(y, 3).double(), reduction="sum"), "sum"),
        ("sum", lambda out, y: F.cross_entropy(out, y), "mean"),
        ("sum", lambda out, y: F.cross_entropy(out, y, reduction="none").mean(), "mean"),
        ("sum", lambda out, y: F.cross_entropy(out, y) / 2, "mean"),  # gradient accumulation keeps a mean a mean
    ],
    ids=["sum()-under-mean", "mse-sum-under-mean", "ce-mean-under-sum", "mean()-under-sum", "mean/2-under-sum"],
)
def test_contradicting_losses_are_refused(declared: str, loss: Loss, refused: str) -> None:
    with pytest.raises(ConfigurationError, match=f"is a {refused} over the batch"):
        watched_backward(mlp(), loss, declared)


@pytest.mark.parametrize(
    "loss",
    [
        lambda out, y: F.cross_entropy(out, y, reduction="sum") / 4,  # a sum over the batch of 4, divided by 4
        lambda out, y: F.cross_entropy(out, y, reduction="sum") / 7,  # e.g. a token count: not judged
        lambda out, y: F.cross_entropy(out, y, reduction="sum") * 1024.0,  # a loss scaler: not judged
        lambda out, y: F.cross_entropy(out, y) + 1e-3 * out.pow(2).sum(),  # a regulariser: not judged
    ],
    ids=["sum/B", "sum/7", "scaled", "regularised"],
)
def test_losses_that_agree_or_cannot_be_judged_pass(loss: Loss) -> None:
    case = mlp()
    with hookinf.watch(case.model, modules=case.modules) as w:
        loss(*logits_and_labels(case)).backward()
        assert w.last_step is not None


def test_autograd_grad_is_checked_too() -> None:
    with pytest.raises(ConfigurationError, match="is a sum over the batch"):
        watched_backward(mlp(), lambda out, y: F.cross_entropy(out, y, reduction="sum"), grad=True)


def test_a_batch_of_one_and_a_foreign_backward_are_not_judged() -> None:
    case = mlp()
    x, y = case.make_batch(1)
    twin = copy.deepcopy(case.model)
    with hookinf.watch(case.model, modules=case.modules) as w:
        out = case.model(x)  # a watched forward awaits its backward ...
        twin(x).sum().backward()  # ... while another model's summed loss is differentiated: not judged
        with pytest.raises(ConfigurationError, match="is a sum over the batch of 4"):
            F.cross_entropy(out, y, reduction="sum").backward()  # the watched model's is
    with hookinf.watch(case.model, modules=case.modules) as w:
        F.cross_entropy(case.model(x[:1]), y[:1], reduction="sum").backward()  # B = 1: mean and sum agree
        assert w.steps == 1
        assert len(_get_current_function_mode_stack()) == 1  # judged; it leaves at the next module call
    assert _get_current_function_mode_stack() == []  # or when the block ends


def test_only_the_first_step_is_probed_and_the_mode_leaves() -> None:
    case = mlp()
    with hookinf.watch(case.model, modules=case.modules) as w:
        out, y = logits_and_labels(case)
        assert len(_get_current_function_mode_stack()) == 1
        F.cross_entropy(out, y).backward()
        out, y = logits_and_labels(case)  # the next forward: the probe has left
        assert _get_current_function_mode_stack() == []
        F.cross_entropy(out, y).backward()
        assert w.steps == 2
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_reduction_of_reads_the_roots() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    assert reduction_of(F.cross_entropy(x, y), 4) == ("mean", "NllLossBackward0")
    assert reduction_of(F.cross_entropy(x, y, reduction="sum"), 4) == ("sum", "NllLossBackward0")
    assert reduction_of(x.sum(), 4) == ("sum", "SumBackward0")
    assert reduction_of(x.mean(dim=(0, 1)), 4) == ("mean", "MeanBackward1")
    assert reduction_of(x.sum() / 4, 4) == ("mean", "SumBackward0 / 4")
    assert reduction_of(x.sum() / 5, 4) is None
    assert reduction_of(x.sum() * 2, 4) is None
    assert reduction_of(x.sum() / torch.tensor(4.0, requires_grad=True), 4) is None  # not a constant
