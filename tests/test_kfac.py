"""Tests of the K-FAC / EK-FAC curvature (``hookinf.methods.kfac``) and of the ``Curvature`` object it produces.

Oracles share nothing with hookinf's factor code: activations ``a`` and output gradients ``δ`` of a small MLP
written out by hand (forward and backprop formulas), per-example gradients from ``torch.func`` (conftest's
``func_per_example_grads``), explicit ``d × d`` blocks ``torch.kron(S, A)`` / ``K diag(Λ) Kᵀ`` with
``K = torch.kron(Q_S, Q_A)``, and ``torch.linalg.solve``.

Conventions under test (see the module docstring of ``hookinf.methods.kfac``): a layer's per-example gradient is
the ``[O, I]`` matrix ``g = Σ_t δ_t a_tᵀ`` (bias as the last input column) flattened row-major, so
``vec(δ aᵀ) = δ ⊗ a``; ``A = Σ_i Σ_t a aᵀ / T`` (``T`` positions in all), ``S = Σ_i Σ_t δ δᵀ / n``,
``G ≈ torch.kron(S, A)``, K-FAC's ``λ = damping × tr(S) tr(A) / d``; EK-FAC's ``Λ = diag(Kᵀ G K)`` with the exact
``G = (1/n) Σ_i vec(g_i) vec(g_i)ᵀ`` and ``λ = damping × mean(Λ)``; score ``= −g_qᵀ (block + λ I)⁻¹ g``.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_CASES, ModelCase, assert_close, close, oracle_matrices, seeded
from torch import Tensor, nn

import hookinf
from hookinf.errors import ConfigurationError, CurvatureError, HookinfError
from hookinf.methods.kfac import _eigh

Batch = tuple[Tensor, ...]
LossFn = Callable[[Any, Batch], Tensor]
F64 = torch.float64

# Scores: hookinf preconditions in the Kronecker eigenbasis, the oracle solves the explicit damped d × d block with
# LU. Both are float64; with λ = 0.1 × mean eigenvalue the damped blocks have condition number ≤ 10·d + 1 (at most
# ~1.1e4 here, GPT-2's d = 1088), so rounding stays far below 1e-8 × max|score|.
SCORE_TOL = 1e-8
# Second moments / factor sums computed from the same float64 numbers in another summation order: a few ulps.
STAT_TOL = 1e-12
# EK-FAC's corrected eigenvalues: squared rotated gradients vs diag(Kᵀ G K) with a d × d G; the eigenbases agree to
# ~1e-13 (eigh of the same float64 matrices summed in another order; distinct eigenvalues with random data).
EIGEN_TOL = 1e-10


# ---------------------------------------------------------------------------------------------------- helpers


def rebatch(batches: Sequence[Batch], size: int) -> list[Batch]:
    """The same examples in the same order, cut into batches of ``size``."""
    columns = [torch.cat(parts) for parts in zip(*batches, strict=True)]
    n = columns[0].shape[0]
    return [tuple(c[i : i + size] for c in columns) for i in range(0, n, size)]


def ce_loss(model: Any, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def flat(matrices: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{layer: [n, O, I]}`` → ``{layer: [n, O·I]}`` (row-major: index ``o·I + i``)."""
    return {name: g.reshape(g.shape[0], -1) for name, g in matrices.items()}


def gram(grads: Tensor) -> Tensor:
    """The exact block ``G = (1/n) Σ_i vec(g_i) vec(g_i)ᵀ`` from ``[n, O, I]`` gradients."""
    g = grads.reshape(grads.shape[0], -1).double()
    return g.T @ g / g.shape[0]


def kfac_block(a_factor: Tensor, s_factor: Tensor, damping: float) -> tuple[Tensor, float]:
    """``torch.kron(S, A)`` and K-FAC's ``λ = damping × tr(S) tr(A) / d``."""
    block = torch.kron(s_factor, a_factor)
    lam = damping * float(torch.trace(s_factor)) * float(torch.trace(a_factor)) / block.shape[0]
    return block, lam


def corrected_eigenvalues(g_block: Tensor, q_a: Tensor, q_s: Tensor) -> Tensor:
    """``diag(Kᵀ G K)`` as ``[O, I]``, ``K = torch.kron(Q_S, Q_A)`` (column ``o·I + i``: ``q_S[:, o] ⊗ q_A[:, i]``)."""
    basis = torch.kron(q_s.double(), q_a.double())
    return ((basis.T @ g_block) * basis.T).sum(dim=1).reshape(q_s.shape[0], q_a.shape[0])


def ekfac_block(g_block: Tensor, q_a: Tensor, q_s: Tensor, damping: float) -> tuple[Tensor, float, Tensor]:
    """``K diag(Λ) Kᵀ``, EK-FAC's ``λ = damping × mean(Λ)`` and ``Λ`` ``[O, I]``, with ``Λ = diag(Kᵀ G K)``."""
    eigen = corrected_eigenvalues(g_block, q_a, q_s)
    basis = torch.kron(q_s.double(), q_a.double())
    block = (basis * eigen.flatten()) @ basis.T
    return block, damping * float(eigen.mean()), eigen


def explicit_scores(block: Tensor, lam: float, train: Tensor, query: Tensor) -> Tensor:
    """``[n_query, n_train]``: ``−g_qᵀ (block + λ I)⁻¹ g`` with an explicit solve; ``train`` / ``query`` flattened."""
    damped = block + lam * torch.eye(block.shape[0], dtype=F64)
    return -(torch.linalg.solve(damped, query.T.double()).T @ train.T.double())


def eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(matrix.double())
    return values, vectors


def align_signs(vectors: Tensor, reference: Tensor) -> Tensor:
    """Flips columns of ``vectors`` to point the way of ``reference``'s (eigenvectors are defined up to sign)."""
    signs = torch.sign((vectors * reference).sum(dim=0))
    signs[signs == 0] = 1.0
    return vectors * signs


@dataclass
class Watched:
    """Sums over the watch's captures of one pass: ``Σ a aᵀ``, ``Σ δ δᵀ``, positions ``T``, examples ``n``."""

    a_sum: dict[str, Tensor]
    s_sum: dict[str, Tensor]
    positions: dict[str, int]
    examples: int
    grads: dict[str, Tensor]  # [n, O, I] from the captures (Σ_t δ_t a_tᵀ)

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(A, S)`` with the stated normalisation: ``A`` over all positions, ``S`` over examples."""
        return self.a_sum[layer] / self.positions[layer], self.s_sum[layer] / self.examples


def watched_sums(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], modules: Any) -> Watched:
    """Runs one pass inside ``hookinf.watch(loss_reduction="sum")`` and sums the captured ``a`` / ``δ`` by hand."""
    params = [p for p in model.parameters() if p.requires_grad]
    a_sum: dict[str, Tensor] = {}
    s_sum: dict[str, Tensor] = {}
    positions: dict[str, int] = {}
    grads: dict[str, list[Tensor]] = {}
    examples = 0
    with hookinf.watch(model, modules=modules, loss_reduction="sum") as w:
        for batch in batches:
            torch.autograd.grad(loss_fn(model, batch).sum(), params, allow_unused=True)  # no .grad on the model
            step = w.last_step
            assert step is not None
            examples += step.batch_size
            for name, capture in step.layers.items():
                a = capture.a.double()  # [B, S, I]
                d = capture.delta.double()  # [B, S, O]
                a_sum[name] = a_sum.get(name, 0) + torch.einsum("bsi,bsj->ij", a, a)
                s_sum[name] = s_sum.get(name, 0) + torch.einsum("bso,bsp->op", d, d)
                positions[name] = positions.get(name, 0) + a.shape[0] * a.shape[1]
                grads.setdefault(name, []).append(torch.einsum("bso,bsi->boi", d, a))
    return Watched(a_sum, s_sum, positions, examples, {k: torch.cat(v) for k, v in grads.items()})


def assert_scores(scores: hookinf.Scores, expected: Mapping[str, Tensor], what: str, tol: float = SCORE_TOL) -> None:
    __tracebackhide__ = True
    assert scores.layers == tuple(expected), f"{what}: layers {scores.layers} != {tuple(expected)}"
    for layer, part in expected.items():
        close(scores.per_layer[layer], part, tol, f"{what} layer {layer!r}")
    close(scores.total, sum(expected.values()), tol, f"{what} total")


def assert_parts_sum_to_total(scores: hookinf.Scores, what: str) -> None:
    __tracebackhide__ = True
    assert scores.total.dtype == F64
    close(scores.total, torch.stack(list(scores.per_layer.values())).sum(0), 1e-14, f"{what}: Σ_l per_layer vs total")


def stats_equal(
    actual: hookinf.Curvature, expected: hookinf.Curvature, tol: float, what: str, *, signs: bool = False
) -> None:
    """Every statistic within ``tol`` (max-norm relative); eigenvectors compared up to sign when ``signs``."""
    __tracebackhide__ = True
    assert actual.method == expected.method
    assert actual.layers == expected.layers
    assert set(actual.tensors) == set(expected.tensors), f"{what}: statistics differ"
    for key, value in expected.tensors.items():
        got = actual.tensors[key]
        if signs and key.rsplit("/", 1)[1] in ("QA", "QS"):
            got = align_signs(got.double(), value.double())
        close(got, value, tol, f"{what} [{key}]")


# ---------------------------------------------------------------------------------------------------- hand MLP
@dataclass
class HandMLP:
    """``fc1 (Linear 5→7) → tanh → fc2 (Linear 7→3) → cross-entropy``, float64, seeded, with or without biases."""

    model: nn.Sequential
    train: list[Batch]
    query: list[Batch]
    bias: bool

    @property
    def x(self) -> Tensor:
        return torch.cat([b[0] for b in self.train])

    @property
    def y(self) -> Tensor:
        return torch.cat([b[1] for b in self.train])


def hand_mlp(bias: bool = True, n_train: int = 12, n_query: int = 5, batch: int = 4, seed: int = 0) -> HandMLP:
    with seeded(10 + seed + int(bias)):
        model = nn.Sequential(
            OrderedDict(fc1=nn.Linear(5, 7, bias=bias), act=nn.Tanh(), fc2=nn.Linear(7, 3, bias=bias))
        )
        x = torch.randn(n_train + n_query, 5, dtype=F64)
        y = torch.randint(0, 3, (n_train + n_query,))
    model = model.to(F64).eval()
    train = rebatch([(x[:n_train], y[:n_train])], batch)
    query = rebatch([(x[n_train:], y[n_train:])], 3)
    return HandMLP(model, train, query, bias)


def hand_factors(mlp: HandMLP, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer: (a [n, I], δ [n, O])}`` of the summed cross-entropy, written out by hand.

    Forward: ``a1 = [x, 1]``, ``z1 = a1 W1ᵀ``, ``h = tanh(z1)``, ``a2 = [h, 1]``, ``z2 = a2 W2ᵀ`` (``Wl`` with the
    bias as its last column). Backprop of ``Σ_i CE(z2_i, y_i)``: ``δ2 = softmax(z2) − onehot(y)``,
    ``δ1 = (δ2 W2[:, :7]) ⊙ (1 − h²)``.
    """
    fc1, fc2 = mlp.model.fc1, mlp.model.fc2
    ones = torch.ones(x.shape[0], 1, dtype=F64)

    def augmented(layer: nn.Linear) -> Tensor:
        w = layer.weight.detach()
        return torch.cat([w, layer.bias.detach().unsqueeze(1)], dim=1) if mlp.bias else w

    a1 = torch.cat([x, ones], dim=1) if mlp.bias else x
    h = torch.tanh(a1 @ augmented(fc1).T)
    a2 = torch.cat([h, ones], dim=1) if mlp.bias else h
    z2 = a2 @ augmented(fc2).T
    delta2 = torch.softmax(z2, dim=1) - F.one_hot(y, 3).to(F64)
    delta1 = (delta2 @ fc2.weight.detach()) * (1 - h**2)
    return {"fc1": (a1, delta1), "fc2": (a2, delta2)}


def hand_grads(factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``g_i = δ_i a_iᵀ`` ``[n, O, I]``."""
    return {name: delta[:, :, None] * a[:, None, :] for name, (a, delta) in factors.items()}


def mlp_influence(mlp: HandMLP, method: Any, **kwargs: Any) -> hookinf.Scores:
    kwargs.setdefault("progress", False)
    train = kwargs.pop("train", mlp.train)
    query = kwargs.pop("query", mlp.query)
    return hookinf.influence(mlp.model, train, query, ce_loss, method=method, **kwargs)


def mlp_fit(mlp: HandMLP, method: Any, **kwargs: Any) -> hookinf.Curvature:
    kwargs.setdefault("progress", False)
    train = kwargs.pop("train", mlp.train)
    return hookinf.fit(mlp.model, train, ce_loss, method=method, **kwargs)


# ---------------------------------------------------------------------------------------------------- 1. explicit
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_hand_written_factors_give_the_oracle_gradients(bias: bool) -> None:
    mlp = hand_mlp(bias)
    grads = hand_grads(hand_factors(mlp, mlp.x, mlp.y))
    oracle = oracle_matrices(mlp.model, ce_loss, mlp.train, ["fc1", "fc2"])
    for layer in ("fc1", "fc2"):
        assert grads[layer].shape == {"fc1": (12, 7, 5 + bias), "fc2": (12, 3, 7 + bias)}[layer]
        close(grads[layer], oracle[layer], STAT_TOL, f"hand g = δ aᵀ vs torch.func, {layer}")


@dataclass
class Explicit:
    """The hand MLP's explicit quantities per layer: gradients, factors, exact G and the eigenbases."""

    train: dict[str, Tensor]  # [n, O·I]
    query: dict[str, Tensor]  # [m, O·I]
    a_factor: dict[str, Tensor]  # A = Σ a aᵀ / n   [I, I]
    s_factor: dict[str, Tensor]  # S = Σ δ δᵀ / n   [O, O]
    g_block: dict[str, Tensor]  # exact G  [d, d]


def explicit(mlp: HandMLP) -> Explicit:
    factors = hand_factors(mlp, mlp.x, mlp.y)
    qx = torch.cat([b[0] for b in mlp.query])
    qy = torch.cat([b[1] for b in mlp.query])
    train = hand_grads(factors)
    n = mlp.x.shape[0]
    return Explicit(
        train=flat(train),
        query=flat(hand_grads(hand_factors(mlp, qx, qy))),
        a_factor={name: a.T @ a / n for name, (a, _) in factors.items()},
        s_factor={name: d.T @ d / n for name, (_, d) in factors.items()},
        g_block={name: gram(g) for name, g in train.items()},
    )


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_kfac_equals_explicit_kronecker_block(bias: bool) -> None:
    mlp = hand_mlp(bias)
    ref = explicit(mlp)
    curv = mlp_fit(mlp, "kfac")
    assert isinstance(curv, hookinf.Curvature)
    assert curv.method == "kfac"
    assert curv.num_examples == 12
    expected, lambdas = {}, {}
    for layer in ("fc1", "fc2"):
        a_factor, s_factor = curv.factors(layer)
        close(a_factor, ref.a_factor[layer], STAT_TOL, f"A of {layer}")
        close(s_factor, ref.s_factor[layer], STAT_TOL, f"S of {layer}")
        assert float(curv.stat(layer, "positions")) == 12  # no sequence dims: T = n
        block, lambdas[layer] = kfac_block(ref.a_factor[layer], ref.s_factor[layer], 0.1)
        expected[layer] = explicit_scores(block, lambdas[layer], ref.train[layer], ref.query[layer])
    assert curv.lambdas == pytest.approx(lambdas, rel=1e-12)
    for method in (curv, "kfac"):  # a fitted curvature and a fit in place
        scores = mlp_influence(mlp, method)
        assert scores.method == "kfac"
        assert scores.damping == pytest.approx(lambdas, rel=1e-12)
        assert_scores(scores, expected, f"kfac bias={bias}")
    # Self-influence is the diagonal g ᵀ(block + λI)⁻¹ g of the train × train scores (with the opposite sign).
    self_expected = -sum(
        explicit_scores(kfac_block(ref.a_factor[k], ref.s_factor[k], 0.1)[0], lambdas[k], ref.train[k], ref.train[k])
        for k in ("fc1", "fc2")
    )
    values = hookinf.self_influence(mlp.model, mlp.train, ce_loss, method=curv, progress=False)
    close(values.total, self_expected.diagonal(), SCORE_TOL, "kfac self-influence")
    # each layer's part is g_lᵀ (A_l ⊗ S_l + λ_l I)⁻¹ g_l with that layer's explicit Kronecker block
    assert values.method == "kfac"
    assert values.damping == pytest.approx(lambdas, rel=1e-12)
    for k in ("fc1", "fc2"):
        block = kfac_block(ref.a_factor[k], ref.s_factor[k], 0.1)[0]
        part = -explicit_scores(block, lambdas[k], ref.train[k], ref.train[k]).diagonal()
        close(values.per_layer[k], part, SCORE_TOL, f"kfac self-influence of {k}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_ekfac_equals_explicit_eigenvalue_corrected_block(bias: bool) -> None:
    mlp = hand_mlp(bias)
    ref = explicit(mlp)
    curv = mlp_fit(mlp, "ekfac")
    assert curv.method == "ekfac"
    assert curv.num_examples == 12
    expected, lambdas = {}, {}
    for layer in ("fc1", "fc2"):
        q_a, q_s = curv.stat(layer, "QA"), curv.stat(layer, "QS")
        # The basis is the eigenbasis of the hand-built A and S (up to each column's sign; random data, so the
        # eigenvalues are distinct — fc2's S has one zero eigenvalue, δ2 summing to zero over classes).
        for got, factor, what in ((q_a, ref.a_factor[layer], "QA"), (q_s, ref.s_factor[layer], "QS")):
            values, vectors = eigh(factor)
            assert bool((values[1:] - values[:-1] > 1e-6 * values[-1]).all()), f"{layer} {what}: repeated eigenvalues"
            close(align_signs(got.double(), vectors), vectors, 1e-10, f"{what} of {layer} vs eigh of the hand factor")
        eigen = curv.stat(layer, "eigen") / curv.stat(layer, "corrected")
        assert float(curv.stat(layer, "corrected")) == 12
        # Λ = diag(Kᵀ G K), in the curvature's basis and in the hand-built one (squares: signs do not matter).
        close(eigen, corrected_eigenvalues(ref.g_block[layer], q_a, q_s), EIGEN_TOL, f"Λ of {layer} (its basis)")
        _, own_qa = eigh(ref.a_factor[layer])
        _, own_qs = eigh(ref.s_factor[layer])
        block, lambdas[layer], own_eigen = ekfac_block(ref.g_block[layer], own_qa, own_qs, 0.1)
        close(eigen, own_eigen, EIGEN_TOL, f"Λ of {layer} (hand basis)")
        # λ = damping × mean(Λ) = damping × tr(G)/d, the same λ as exact.
        d = ref.g_block[layer].shape[0]
        assert lambdas[layer] == pytest.approx(0.1 * float(torch.trace(ref.g_block[layer])) / d, rel=1e-12)
        expected[layer] = explicit_scores(block, lambdas[layer], ref.train[layer], ref.query[layer])
    assert curv.lambdas == pytest.approx(lambdas, rel=1e-12)
    assert mlp_fit(mlp, "exact", damping=0.1).lambdas == pytest.approx(lambdas, rel=1e-12)
    for method in (curv, "ekfac"):
        scores = mlp_influence(mlp, method)
        assert scores.method == "ekfac"
        assert scores.damping == pytest.approx(lambdas, rel=1e-12)
        assert_scores(scores, expected, f"ekfac bias={bias}")
    self_expected = -sum(
        explicit_scores(
            ekfac_block(ref.g_block[k], *(eigh(f)[1] for f in (ref.a_factor[k], ref.s_factor[k])), 0.1)[0],
            lambdas[k],
            ref.train[k],
            ref.train[k],
        )
        for k in ("fc1", "fc2")
    )
    values = hookinf.self_influence(mlp.model, mlp.train, ce_loss, method=curv, progress=False)
    close(values.total, self_expected.diagonal(), SCORE_TOL, "ekfac self-influence")
    for k in ("fc1", "fc2"):  # each layer's part, with that layer's explicit eigenvalue-corrected block
        block = ekfac_block(ref.g_block[k], *(eigh(f)[1] for f in (ref.a_factor[k], ref.s_factor[k])), 0.1)[0]
        part = -explicit_scores(block, lambdas[k], ref.train[k], ref.train[k]).diagonal()
        close(values.per_layer[k], part, SCORE_TOL, f"ekfac self-influence of {k}")


def test_kfac_and_ekfac_are_not_exact_in_general() -> None:
    """Guards the exactness tests below against a vacuous pass: on 12 examples both differ from exact."""
    mlp = hand_mlp()
    exact = mlp_influence(mlp, "exact").total
    for method in ("kfac", "ekfac"):
        gap = float((mlp_influence(mlp, method).total - exact).abs().max()) / float(exact.abs().max())
        assert gap > 1e-3, f"{method} equals exact to {gap:.1e} on 12 examples"


# ---------------------------------------------------------------------------------------------------- 2. exact cases
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_single_example_kfac_and_ekfac_equal_exact(method: str, bias: bool) -> None:
    """n = 1 without shared positions: G = (δ⊗a)(δ⊗a)ᵀ = δδᵀ ⊗ aaᵀ = S ⊗ A exactly, and it is diagonal in the
    Kronecker eigenbasis; λ = damping·tr(S)tr(A)/d = damping·|δ|²|a|²/d = damping·tr(G)/d as well."""
    mlp = hand_mlp(bias, n_train=1, batch=1)
    exact = mlp_influence(mlp, "exact", damping=0.1)  # K-FAC's and EK-FAC's default damping (exact's is 1.0)
    scores = mlp_influence(mlp, method)
    assert scores.damping == pytest.approx(exact.damping, rel=1e-12)
    # S ⊗ A has rank one: most eigenvalues are 0 (to rounding, ~1e-17 × the largest), so the damped blocks have
    # condition ≈ 10·d; both sides are float64.
    assert_scores(scores, exact.per_layer, f"{method} n=1")


def _diagonal_case() -> tuple[nn.Module, list[Batch], list[Batch], LossFn]:
    """One bias-free Linear 3→2 under ½‖W x − t‖² where every example has x = c·e_k and δ = W x − t = s·e_m.

    Each g_i = s c e_m e_kᵀ is a single entry, so G, A and S are all diagonal and (with distinct diagonal entries)
    the Kronecker eigenbasis is the standard basis, in which G is diagonal: EK-FAC is exact. K-FAC is not, as G's
    diagonal Σ s²c² is not the product of S's Σ s² and A's Σ c².
    """
    with seeded(31):
        model = nn.Sequential(OrderedDict(lin=nn.Linear(3, 2, bias=False))).to(F64).eval()
        pairs = [(m, k) for m in range(2) for k in range(3)] * 2  # every (output, input) pair, twice
        c = 0.5 + torch.rand(len(pairs), dtype=F64)
        s = 0.5 + torch.rand(len(pairs), dtype=F64)
        qx = torch.randn(4, 3, dtype=F64)
        qt = torch.randn(4, 2, dtype=F64)
    x = torch.zeros(len(pairs), 3, dtype=F64)
    delta = torch.zeros(len(pairs), 2, dtype=F64)
    for i, (m, k) in enumerate(pairs):
        x[i, k], delta[i, m] = c[i], s[i]
    target = x @ model.lin.weight.detach().T - delta

    def loss_fn(model: Any, batch: Batch) -> Tensor:
        inputs, targets = batch
        return 0.5 * (model(inputs) - targets).pow(2).sum(-1)

    return model, rebatch([(x, target)], 5), [(qx, qt)], loss_fn


def test_ekfac_is_exact_when_g_is_diagonal_in_the_kronecker_basis() -> None:
    model, train, query, loss_fn = _diagonal_case()
    grads = oracle_matrices(model, loss_fn, train, ["lin"])["lin"]
    assert int((grads.flatten(1) != 0).sum(1).max()) == 1, "each example's gradient must be a single entry"
    g_block = gram(grads)
    assert torch.equal(g_block, torch.diag(g_block.diagonal())), "G must be diagonal"

    def run(method: str) -> hookinf.Scores:
        return hookinf.influence(model, train, query, loss_fn, method=method, damping=0.1, progress=False)

    exact, ekfac, kfac = run("exact"), run("ekfac"), run("kfac")
    assert ekfac.damping == pytest.approx(exact.damping, rel=1e-12)
    assert_scores(ekfac, exact.per_layer, "ekfac with diagonal G")
    gap = float((kfac.total - exact.total).abs().max()) / float(exact.total.abs().max())
    assert gap > 1e-3, f"K-FAC should not be exact here (gap {gap:.1e}); the case would not test the correction"


# ---------------------------------------------------------------------------------------------------- 3. model cases
ALL_METHODS = ("kfac", "ekfac", "exact", "identity")


def check_case(case: ModelCase, train: list[Batch], query: list[Batch]) -> None:
    """Runs ``case`` through every method and checks each against its explicit-matrix reference.

    * K-FAC's ``(A, S)`` equal sums over the watch's captured ``a`` / ``δ`` (``A`` over all ``T`` positions, ``S``
      over the ``n`` examples); its scores equal ``torch.kron(S, A)`` solved explicitly.
    * EK-FAC's corrected eigenvalues equal ``diag(Kᵀ G K)`` with ``G`` from ``torch.func`` per-example gradients and
      ``K`` from the curvature's own ``QA`` / ``QS``, which are orthonormal eigenvectors of K-FAC's ``A`` / ``S``;
      its scores equal ``K diag(Λ) Kᵀ`` solved explicitly.
    * exact and identity equal the oracle; every method's per-layer parts sum to its total.
    """
    model, loss_fn, modules = case.model, case.loss_fn, case.modules
    kfac = hookinf.fit(model, train, loss_fn, method="kfac", modules=modules, progress=False)
    ekfac = hookinf.fit(model, train, loss_fn, method="ekfac", modules=modules, progress=False)
    layers = tuple(kfac.layers)
    assert tuple(ekfac.layers) == layers
    n = sum(int(b[0].shape[0]) for b in train)
    assert kfac.num_examples == ekfac.num_examples == n
    watched = watched_sums(model, loss_fn, train, modules)
    oracle_train = oracle_matrices(model, loss_fn, train, layers)
    oracle_query = oracle_matrices(model, loss_fn, query, layers)
    expected: dict[str, dict[str, Tensor]] = {m: {} for m in ALL_METHODS}
    for layer in layers:
        # The captures the factors are built from give the oracle's gradients (Σ_t δ_t a_tᵀ).
        close(watched.grads[layer], oracle_train[layer], 1e-10, f"{case.id} captured gradients of {layer}")
        a_factor, s_factor = watched.factors(layer)
        got_a, got_s = kfac.factors(layer)
        close(got_a, a_factor, STAT_TOL, f"{case.id} K-FAC A of {layer}")
        close(got_s, s_factor, STAT_TOL, f"{case.id} K-FAC S of {layer}")
        assert float(kfac.stat(layer, "positions")) == watched.positions[layer]
        train_flat, query_flat = oracle_train[layer].flatten(1), oracle_query[layer].flatten(1)
        block, lam = kfac_block(a_factor, s_factor, 0.1)
        assert kfac.lambdas[layer] == pytest.approx(lam, rel=1e-10)
        expected["kfac"][layer] = explicit_scores(block, lam, train_flat, query_flat)

        q_a, q_s = ekfac.stat(layer, "QA").double(), ekfac.stat(layer, "QS").double()
        eye_a, eye_s = torch.eye(q_a.shape[0], dtype=F64), torch.eye(q_s.shape[0], dtype=F64)
        close(q_a.T @ q_a, eye_a, 1e-12, f"{case.id} QA orthonormal, {layer}")
        close(q_s.T @ q_s, eye_s, 1e-12, f"{case.id} QS orthonormal, {layer}")
        # Q diagonalises the factor: Qᵀ A Q is diagonal (off-diagonal ≤ 1e-12 × ‖A‖).
        for q, factor, what in ((q_a, a_factor, "A"), (q_s, s_factor, "S")):
            off_diagonal = (q.T @ factor @ q).fill_diagonal_(0.0)
            assert_close(
                off_diagonal,
                torch.zeros_like(off_diagonal),
                rtol=0.0,
                atol=1e-12 * float(factor.abs().max()),
                what=f"{case.id} off-diagonal of Qᵀ{what}Q, {layer}",
            )
        g_block = gram(oracle_train[layer])
        eigen = ekfac.stat(layer, "eigen") / ekfac.stat(layer, "corrected")
        assert float(ekfac.stat(layer, "corrected")) == n
        block, lam, oracle_eigen = ekfac_block(g_block, q_a, q_s, 0.1)
        close(eigen, oracle_eigen, EIGEN_TOL, f"{case.id} EK-FAC Λ = diag(Kᵀ G K) of {layer}")
        assert ekfac.lambdas[layer] == pytest.approx(lam, rel=1e-10)
        expected["ekfac"][layer] = explicit_scores(block, lam, train_flat, query_flat)

        lam = 1.0 * float(torch.trace(g_block)) / g_block.shape[0]  # exact's default damping, relative 1.0
        expected["exact"][layer] = explicit_scores(g_block, lam, train_flat, query_flat)
        expected["identity"][layer] = -(query_flat @ train_flat.T)
    for method, curvature in (("kfac", kfac), ("ekfac", ekfac), ("exact", "exact"), ("identity", "identity")):
        scores = hookinf.influence(model, train, query, loss_fn, method=curvature, modules=modules, progress=False)
        assert scores.method == method
        assert scores.shape == (sum(int(b[0].shape[0]) for b in query), n)
        assert_parts_sum_to_total(scores, f"{case.id}/{method}")
        assert_scores(scores, expected[method], f"{case.id}/{method}")


@pytest.mark.parametrize("case_id", ["seq-linear", "conv2d", "gpt2-conv1d"])
def test_shared_position_layers_match_explicit_references(case_id: str) -> None:
    case = MODEL_CASES[case_id]()
    check_case(case, [case.make_batch(1), case.make_batch(2)], [case.make_batch(3)])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft calling transformers
def test_lora_minilm_matches_explicit_references(lora_minilm: ModelCase) -> None:
    # 24 LoRA layers (r=2 on query/value of 6 blocks), d = 768 each; one batch of 3 padded sequences of 6 tokens
    # for training and one for the queries keeps the explicit 768 × 768 solves to a few seconds.
    check_case(lora_minilm, [lora_minilm.make_batch(1)], [lora_minilm.make_batch(2)])


# ---------------------------------------------------------------------------------------------------- 4. invariances
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_streaming_over_small_batches_equals_one_big_batch(method: str) -> None:
    mlp = hand_mlp()
    whole = mlp_fit(mlp, method, train=rebatch(mlp.train, 12))
    for size in (1, 5):  # 5: an uneven last batch
        streamed = mlp_fit(mlp, method, train=rebatch(mlp.train, size))
        assert streamed.num_examples == whole.num_examples == 12
        # Same float64 numbers summed in another order (and eigenvectors of factors that differ by rounding,
        # compared up to sign): a few ulps.
        stats_equal(streamed, whole, STAT_TOL, f"{method} batches of {size}", signs=True)
        assert streamed.lambdas == pytest.approx(whole.lambdas, rel=STAT_TOL)
        close(mlp_influence(mlp, streamed).total, mlp_influence(mlp, whole).total, 1e-10, f"{method} scores")


def halves(mlp: HandMLP) -> tuple[list[Batch], list[Batch]]:
    """The 12 training examples as two shards of 6 (batches of 4 and 2 each)."""
    first, second = rebatch(mlp.train, 6)
    return rebatch([first], 4), rebatch([second], 4)


def test_kfac_merge_of_halves_equals_fit_of_the_whole() -> None:
    mlp = hand_mlp()
    first, second = halves(mlp)
    whole = mlp_fit(mlp, "kfac")
    merged = mlp_fit(mlp, "kfac", train=first).merge(mlp_fit(mlp, "kfac", train=second))
    assert merged.method == "kfac"
    assert merged.num_examples == 12
    stats_equal(merged, whole, STAT_TOL, "merged K-FAC")
    assert merged.lambdas == pytest.approx(whole.lambdas, rel=STAT_TOL)
    for layer in merged.layers:
        for got, want, what in zip(merged.factors(layer), whole.factors(layer), "AS", strict=True):
            close(got, want, STAT_TOL, f"merged factor {what} of {layer}")
    close(mlp_influence(mlp, merged).total, mlp_influence(mlp, whole).total, 1e-10, "merged K-FAC scores")


def test_ekfac_merge_of_independent_fits_is_refused_with_the_refit_recipe() -> None:
    mlp = hand_mlp()
    first, second = halves(mlp)
    one, two = mlp_fit(mlp, "ekfac", train=first), mlp_fit(mlp, "ekfac", train=second)
    with pytest.raises(CurvatureError, match=r"basis") as info:
        one.merge(two)
    message = str(info.value)
    for needed in ("'fc1'", "method='kfac'", "EKFAC(basis="):  # the layer, and how to refit so that fits merge
        assert needed in message, message
    with pytest.raises(CurvatureError, match="cannot merge a kfac curvature into a ekfac"):
        one.merge(mlp_fit(mlp, "kfac", train=second))


def test_ekfac_fits_sharing_a_merged_basis_merge_to_the_fit_of_the_whole() -> None:
    mlp = hand_mlp()
    first, second = halves(mlp)
    basis = mlp_fit(mlp, "kfac", train=first).merge(mlp_fit(mlp, "kfac", train=second))
    whole = mlp_fit(mlp, hookinf.EKFAC(basis=basis))
    merged = mlp_fit(mlp, hookinf.EKFAC(basis=basis), train=first).merge(
        mlp_fit(mlp, hookinf.EKFAC(basis=basis), train=second)
    )
    assert merged.method == whole.method == "ekfac"
    for layer in whole.layers:
        for key in ("QA", "QS"):  # the shared basis, bit for bit
            assert torch.equal(merged.stat(layer, key), whole.stat(layer, key)), f"{key} of {layer}"
        assert float(merged.stat(layer, "corrected")) == float(whole.stat(layer, "corrected")) == 12
        close(merged.stat(layer, "eigen"), whole.stat(layer, "eigen"), STAT_TOL, f"merged Λ sums of {layer}")
    assert merged.lambdas == pytest.approx(whole.lambdas, rel=STAT_TOL)
    close(mlp_influence(mlp, merged).total, mlp_influence(mlp, whole).total, 1e-10, "merged EK-FAC scores")
    # The whole fit on the merged basis is the same curvature as a plain EK-FAC fit (same factors, same eigh).
    close(mlp_influence(mlp, whole).total, mlp_influence(mlp, "ekfac").total, 1e-10, "basis fit vs plain ekfac")
    # The merged curvature read 12 examples once and holds the basis's factors once: as the whole fit does.
    assert merged.num_examples == whole.num_examples == 12, (merged.num_examples, whole.num_examples)
    stats_equal(merged, whole, STAT_TOL, "merged EK-FAC on a shared basis")
    # An EK-FAC curvature is a basis too: its own QA / QS are reused as they are, so the refit is the same fit.
    refit = mlp_fit(mlp, hookinf.EKFAC(basis=whole))
    assert refit.num_examples == 12
    stats_equal(refit, whole, 0.0, "EK-FAC refitted on its own basis")
    # Fits stored with different damping rules do not merge.
    with pytest.raises(CurvatureError, match="different damping"):
        merged.merge(mlp_fit(mlp, hookinf.EKFAC(basis=basis), train=second, damping=0.5))


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_absolute_damping_reproduces_the_reference_with_that_lambda(method: str) -> None:
    mlp = hand_mlp()
    ref = explicit(mlp)
    damping = hookinf.Damping(absolute=0.05)
    curv = mlp_fit(mlp, method, damping=damping)
    assert curv.damping == damping
    assert curv.lambdas == {"fc1": 0.05, "fc2": 0.05}
    expected = {}
    for layer in ("fc1", "fc2"):
        if method == "kfac":
            block, _ = kfac_block(ref.a_factor[layer], ref.s_factor[layer], 0.1)
        else:
            qs = [eigh(ref.a_factor[layer])[1], eigh(ref.s_factor[layer])[1]]
            block, _, _ = ekfac_block(ref.g_block[layer], *qs, 0.1)
        expected[layer] = explicit_scores(block, 0.05, ref.train[layer], ref.query[layer])
    scores = mlp_influence(mlp, curv)
    assert scores.damping == {"fc1": 0.05, "fc2": 0.05}
    assert_scores(scores, expected, f"{method} absolute damping")
    assert_scores(mlp_influence(mlp, method, damping=damping), expected, f"{method} absolute damping in place")


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_with_damping_changes_lambda_and_not_the_statistics(method: str) -> None:
    mlp = hand_mlp()
    curv = mlp_fit(mlp, method)
    before = {k: v.clone() for k, v in curv.tensors.items()}
    lambdas = curv.lambdas
    stronger = curv.with_damping(hookinf.Damping(relative=0.5))
    assert type(stronger) is type(curv)
    assert stronger.num_examples == curv.num_examples
    assert stronger.damping == hookinf.Damping(relative=0.5)
    assert stronger.lambdas == pytest.approx({k: 5 * v for k, v in lambdas.items()}, rel=1e-12)
    assert set(stronger.tensors) == set(before)
    for key, value in before.items():
        assert torch.equal(stronger.tensors[key], value), key
        assert torch.equal(curv.tensors[key], value), key
    assert curv.lambdas == lambdas
    assert curv.damping == hookinf.Damping(relative=0.1)
    absolute = curv.with_damping(hookinf.Damping(absolute=0.3))
    assert absolute.lambdas == {"fc1": 0.3, "fc2": 0.3}
    # influence(damping=...) with a fitted curvature is with_damping, and equals a fit with that damping.
    via_argument = mlp_influence(mlp, curv, damping=0.5)
    close(via_argument.total, mlp_influence(mlp, stronger).total, 1e-14, "damping= vs with_damping")
    close(via_argument.total, mlp_influence(mlp, method, damping=0.5).total, 1e-10, "with_damping vs refit")
    assert via_argument.damping == pytest.approx(stronger.lambdas, rel=1e-12)


# ---------------------------------------------------------------------------------------------------- 5. persistence
def stored_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("method", ["kfac", "ekfac", "exact"])
def test_save_and_load_round_trip_bit_exactly(method: str, tmp_path: Path) -> None:
    mlp = hand_mlp()
    curv = mlp_fit(mlp, method, damping=hookinf.Damping(absolute=0.02) if method == "kfac" else 0.3)
    assert curv.save(tmp_path / "curv") == tmp_path / "curv"
    loaded = hookinf.load(tmp_path / "curv")
    assert type(loaded) is type(curv)
    assert loaded.method == method
    assert loaded.layers == curv.layers
    assert list(loaded.layers) == list(curv.layers)
    assert loaded.damping == curv.damping
    assert loaded.num_examples == curv.num_examples
    assert set(loaded.tensors) == set(curv.tensors)
    for key, value in curv.tensors.items():
        assert loaded.tensors[key].dtype == value.dtype, key
        assert torch.equal(loaded.tensors[key], value), key
    assert loaded.lambdas == curv.lambdas
    original, reloaded = mlp_influence(mlp, curv), mlp_influence(mlp, loaded)
    for layer in curv.layers:
        assert torch.equal(reloaded.per_layer[layer], original.per_layer[layer]), layer
    assert repr(loaded) == repr(curv)


def test_saving_twice_leaves_one_tensor_file_and_the_manifest(tmp_path: Path) -> None:
    mlp = hand_mlp()
    first, second = halves(mlp)
    one, two = mlp_fit(mlp, "ekfac", train=first), mlp_fit(mlp, "ekfac", train=second)
    one.save(tmp_path)
    listing = stored_files(tmp_path)
    one.save(tmp_path)  # the same curvature again
    assert stored_files(tmp_path) == listing
    assert len(listing) == 2, listing
    assert "manifest.json" in listing, listing
    two.save(tmp_path)  # another curvature over it: the old tensor file is gone, no temporary file is left
    files = stored_files(tmp_path)
    assert len(files) == 2, files
    assert "manifest.json" in files, files
    assert files != listing, files
    assert json.loads((tmp_path / "manifest.json").read_text())["tensors"] in files
    loaded = hookinf.load(tmp_path)
    for key, value in two.tensors.items():
        assert torch.equal(loaded.tensors[key], value), key


def test_loading_a_directory_without_a_curvature_names_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HookinfError, match=re.escape(str(empty))):
        hookinf.load(empty)
    with pytest.raises(HookinfError, match=re.escape(str(tmp_path / "missing"))):
        hookinf.load(tmp_path / "missing")


@pytest.mark.parametrize(
    "corruption",
    ["not json", "wrong format", "unknown method", "missing tensors", "truncated tensors"],
)
def test_loading_a_corrupt_curvature_names_the_path(corruption: str, tmp_path: Path) -> None:
    mlp = hand_mlp()
    directory = mlp_fit(mlp, "kfac").save(tmp_path / "curv")
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    tensor_file = directory / manifest["tensors"]
    if corruption == "not json":
        manifest_path.write_text("{ this is not json")
    elif corruption == "wrong format":
        manifest_path.write_text(json.dumps({**manifest, "format": "something else"}))
    elif corruption == "unknown method":
        manifest_path.write_text(json.dumps({**manifest, "method": "no-such-method"}))
    elif corruption == "missing tensors":
        tensor_file.unlink()
    else:
        tensor_file.write_bytes(tensor_file.read_bytes()[:40])
    with pytest.raises(HookinfError, match=re.escape(str(directory))):
        hookinf.load(directory)


def test_a_loaded_curvature_refuses_another_model_naming_the_first_mismatching_layer(tmp_path: Path) -> None:
    mlp = hand_mlp()
    loaded = hookinf.load(mlp_fit(mlp, "ekfac").save(tmp_path))
    with seeded(5):
        other = nn.Sequential(OrderedDict(fc1=nn.Linear(5, 8), act=nn.Tanh(), fc2=nn.Linear(8, 3))).to(F64)
    first_mismatch = r"layer 'fc1' has gradient shape 8×6 .* but 7×6"
    with pytest.raises(CurvatureError, match=first_mismatch) as info:
        hookinf.influence(other, mlp.train, mlp.query, ce_loss, method=loaded, progress=False)
    assert "'fc2'" not in str(info.value)
    with pytest.raises(CurvatureError, match=first_mismatch):
        hookinf.self_influence(other, mlp.train, ce_loss, method=loaded, progress=False)
    with pytest.raises(CurvatureError, match=first_mismatch):
        hookinf.fit(other, mlp.train, ce_loss, method=hookinf.EKFAC(basis=loaded), progress=False)
    # Only the last layer differs: that one is named.
    with seeded(6):
        wider = nn.Sequential(OrderedDict(fc1=nn.Linear(5, 7), act=nn.Tanh(), fc2=nn.Linear(7, 4))).to(F64)
    with pytest.raises(CurvatureError, match="layer 'fc2' has gradient shape 4×8"):
        hookinf.influence(wider, mlp.train, mlp.query, ce_loss, method=loaded, progress=False)
    # Tracking a subset of the fitted layers is refused too, naming the layer the model does not track.
    with pytest.raises(CurvatureError, match="'fc2'"):
        hookinf.influence(mlp.model, mlp.train, mlp.query, ce_loss, method=loaded, modules="fc1", progress=False)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_a_fitted_curvature_is_reused_without_refitting(method: str) -> None:
    mlp = hand_mlp()
    calls: list[int] = []

    def counting_loss(model: Any, batch: Batch) -> Tensor:
        calls.append(int(batch[0].shape[0]))
        return ce_loss(model, batch)

    curv = hookinf.fit(mlp.model, mlp.train, counting_loss, method=method, progress=False)
    fit_passes = 1  # K-FAC: one pass; EK-FAC: its correction replays the first pass from memory (cache_bytes)
    assert len(calls) == fit_passes * len(mlp.train)
    calls.clear()
    reused = hookinf.influence(mlp.model, mlp.train, mlp.query, counting_loss, method=curv, progress=False)
    assert len(calls) == len(mlp.query) + len(mlp.train), calls  # the query pass and one scoring pass over train
    calls.clear()
    in_place = hookinf.influence(mlp.model, mlp.train, mlp.query, counting_loss, method=method, progress=False)
    assert len(calls) == (fit_passes + 1) * len(mlp.train) + len(mlp.query), calls
    # The same passes over the same data in the same order: the same numbers.
    for layer in in_place.layers:
        close(reused.per_layer[layer], in_place.per_layer[layer], 1e-14, f"reused vs in place, {layer}")
    assert reused.damping == in_place.damping
    calls.clear()
    hookinf.self_influence(mlp.model, mlp.train, counting_loss, method=curv, progress=False)
    assert len(calls) == len(mlp.train)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_ekfac_cache_replays_the_first_pass_with_identical_results(fisher: str) -> None:
    """EKFAC(cache_bytes=...) keeps pass 1's captures for the correction; over budget, or 0, it runs two passes.

    All three fits accumulate the same float64 numbers in the same order, so they agree bit for bit. With a sampled
    Fisher the cache is not used: the correction pass draws fresh labels, so the model runs twice.
    """
    mlp = hand_mlp()
    calls: list[int] = []

    def counting_logits(model: Any, batch: Batch) -> Tensor:
        calls.append(int(batch[0].shape[0]))
        return model(batch[0])

    loss = hookinf.CrossEntropy(logits=counting_logits, target=lambda batch: batch[1])

    def fit(cache_bytes: int) -> hookinf.Curvature:
        calls.clear()
        method = hookinf.EKFAC(cache_bytes=cache_bytes)
        return hookinf.fit(mlp.model, mlp.train, loss, method=method, fisher=fisher, progress=False)  # type: ignore[arg-type]

    cached = fit(2**20)
    # empirical: one pass, the correction read the cached captures; sampled: two passes, the cache is not used
    assert len(calls) == (1 if fisher == "empirical" else 2) * len(mlp.train)
    two_passes = fit(0)
    assert len(calls) == 2 * len(mlp.train)
    with hookinf.watch(mlp.model, loss_reduction="sum") as w:
        ce_loss(mlp.model, mlp.train[0]).sum().backward()
        step = w.last_step
        assert step is not None
        first_batch = sum(t.numel() * t.element_size() for c in step.layers.values() for t in (c.a, c.delta))
    mlp.model.zero_grad(set_to_none=True)
    over_budget = fit(first_batch + 1)  # the second batch outgrows it: the cache is dropped, two passes run
    assert len(calls) == 2 * len(mlp.train)
    for other, label in ((two_passes, "cache_bytes=0"), (over_budget, "over budget")):
        assert cached.tensors.keys() == other.tensors.keys()
        for key, value in cached.tensors.items():
            assert torch.equal(value, other.tensors[key]), f"{fisher}, {label}: {key}"


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB"])
def test_ekfac_cache_bytes_must_be_a_non_negative_integer(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="cache_bytes"):
        hookinf.EKFAC(cache_bytes=bad)


# ---------------------------------------------------------------------------------------------------- 6. float32
COUNTS = ("positions", "corrected")  # example / position counts: exact float64 scalars whatever the dtype


def float32_mlp() -> HandMLP:
    mlp = hand_mlp()
    mlp.model.float()
    mlp.train = [(x.float(), y) for x, y in mlp.train]
    mlp.query = [(x.float(), y) for x, y in mlp.query]
    return mlp


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_float32_model_statistics_dtype_and_scores(method: str) -> None:
    reference = mlp_influence(hand_mlp(), method)  # the same seeded model and data in float64
    mlp = float32_mlp()
    for dtype, expected_dtype in ((None, torch.float32), (torch.float64, torch.float64)):
        curv = mlp_fit(mlp, method, dtype=dtype)
        for key, value in curv.tensors.items():
            if key.rsplit("/", 1)[1] not in COUNTS:
                assert value.dtype == expected_dtype, f"dtype={dtype}: {key} is {value.dtype}"
        scores = mlp_influence(mlp, curv)
        # Kronecker preconditioning and scoring run in the statistics' dtype (float32 halves the cost of scoring)
        assert scores.total.dtype == expected_dtype
        # float32 activations and gradients (relative error ~1e-7), float32 factor sums and their float32
        # eigendecomposition (rounding ~1e-7 of the largest eigenvalue), through damped blocks of condition
        # ≤ 10·d + 1 = 421: ≲ 1e-7 · 421 ≈ 4e-5, inside 1e-4.
        for layer in reference.layers:
            close(scores.per_layer[layer], reference.per_layer[layer], 1e-4, f"float32 {method} dtype={dtype} {layer}")
        assert scores.damping == pytest.approx(reference.damping, rel=1e-5)
    with pytest.raises(hookinf.ConfigurationError, match=re.escape("float32 or torch.float64")):
        mlp_fit(mlp, method, dtype=torch.float16)


# ---------------------------------------------------------------------------------------------------- 7. display
@pytest.mark.parametrize("method", ALL_METHODS)
def test_repr_is_a_table_naming_every_layer_and_lambda(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    mlp = hand_mlp()
    curv = mlp_fit(mlp, method)
    text = repr(curv)
    assert "λ" in text, text
    assert method in text, text
    if method != "identity":  # identity reads no data
        assert "over 12 examples" in text, text
    for layer in curv.layers:
        assert layer in text, text
    if method != "identity":
        for lam in curv.lambdas.values():
            assert f"{lam:.3g}" in text, text
    print(curv)
    from rich.console import Console

    Console(width=100).print(curv)
    assert "fc2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- zero damping
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_zero_damping_on_full_rank_factors_matches_the_undamped_reference(method: str) -> None:
    # A regression loss on 64 examples for layers of d = 35 and 21: A, S and G have full rank, so λ = 0 is well posed.
    case = MODEL_CASES["mlp-nobias"]()
    train, query = [case.make_batch(seed) for seed in range(1, 17)], [case.make_batch(20)]
    damping = hookinf.Damping(absolute=0.0)
    curv = hookinf.fit(case.model, train, case.loss_fn, method=method, damping=damping, progress=False)
    assert curv.lambdas == {"fc1": 0.0, "fc2": 0.0}
    watched = watched_sums(case.model, case.loss_fn, train, None)
    oracle_train = oracle_matrices(case.model, case.loss_fn, train, curv.layers)
    oracle_query = oracle_matrices(case.model, case.loss_fn, query, curv.layers)
    expected = {}
    for layer in curv.layers:
        if method == "kfac":
            block, _ = kfac_block(*watched.factors(layer), 0.0)
        else:
            block, _, _ = ekfac_block(gram(oracle_train[layer]), curv.stat(layer, "QA"), curv.stat(layer, "QS"), 0.0)
        eigenvalues = torch.linalg.eigvalsh(block)
        assert float(eigenvalues[-1] / eigenvalues[0]) < 1e3, "the undamped block should be well conditioned"
        expected[layer] = explicit_scores(block, 0.0, oracle_train[layer].flatten(1), oracle_query[layer].flatten(1))
    scores = hookinf.influence(case.model, train, query, case.loss_fn, method=curv, progress=False)
    # Undamped, but the blocks' condition numbers are below 1e3 (checked above): the usual tolerance holds.
    assert_scores(scores, expected, f"{method} λ = 0")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["kfac", "ekfac", "exact"])
def test_zero_damping_on_a_singular_block_is_refused(method: str, seed: int) -> None:
    """With cross-entropy, δ of the last layer sums to zero over the classes, so S (hence S ⊗ A, Λ and G) has an
    exact null direction. Rounding leaves its computed eigenvalue at ±1e-20 (K-FAC) or ~1e-35 (EK-FAC, a square),
    and dividing by it turns the rounding-sized components of the gradients along it into O(1) garbage scores; the
    undamped block must be refused whatever the sign the rounding took, as ``exact`` does."""
    mlp = hand_mlp(seed=seed)
    with pytest.raises(CurvatureError, match="damping"):
        mlp_influence(mlp, method, damping=0.0)


@pytest.mark.parametrize("features", [5, 255, 256, 301, 513, 1025])
def test_lower_blocked_gram_equals_the_full_product(features: int) -> None:
    """The factor sums are accumulated on and below the diagonal in blocks (halved recursively from 256 features:
    one, two and three levels here) and mirrored at the end; in float64 they equal Σ xᵀx up to summation order:
    1e-12 relative, plus 1e-13 of the largest entry for entries that are sums of cancelling products (their rounding
    is relative to the products, not the sum)."""
    from hookinf.methods.kfac import _add_lower_gram, _mirror_lower

    gen = torch.Generator().manual_seed(features)
    batches = [torch.randn(n, features, generator=gen, dtype=torch.float64) for n in (7, 3)]
    total = torch.zeros(features, features, dtype=torch.float64)
    for x in batches:
        _add_lower_gram(total, x)
    full = sum(x.T @ x for x in batches)
    got = _mirror_lower(total)
    assert torch.equal(got, got.T)
    assert_close(got, full, rtol=1e-12, atol=1e-13 * float(full.abs().max()), what=f"{features} features")


# ---------------------------------------------------------------------------------------------------- 8. eigh fallback
def _dead_unit_factor() -> Tensor:
    """A float32 activation factor of a layer whose inputs are mostly dead ReLU units (70 %), plus the bias column.

    Such a factor (found in a digits CNN's head at an early checkpoint) has a block of exact zero eigenvalues, on
    which LAPACK's float32 ``syevd`` fails to converge in the CPU build of torch used here.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.empty(0)
    for dead, n in ((0.3, 200), (0.3, 600), (0.3, 1200), (0.5, 200), (0.5, 600), (0.5, 1200), (0.7, 200)):
        a = torch.relu(torch.randn(n, 576, generator=gen))  # the same draws as when the case was found: the last
        a[:, torch.rand(576, generator=gen) < dead] = 0
    a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)
    return (a.T @ a / a.shape[0]).float()


def test_a_float32_eigendecomposition_that_fails_is_redone_in_float64() -> None:
    factor = _dead_unit_factor()
    try:
        torch.linalg.eigh(factor)
    except RuntimeError:
        pass
    else:
        pytest.skip("this LAPACK build decomposes the factor in float32: the fallback is not exercised here")
    values, vectors = _eigh(factor, "head", "activation (A)")
    assert values.dtype == vectors.dtype == torch.float32
    rebuilt = (vectors.double() * values.double()) @ vectors.double().T
    # float64 decomposition of a float32 matrix, cast back: rounding ~1e-7 of the largest eigenvalue
    close(rebuilt, factor.double(), 1e-6, "V diag(λ) Vᵀ after the float64 retry")
    assert bool((values >= 0).all())
