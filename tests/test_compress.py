"""Tests of the gradient compressors (``hookinf.compress``: LoGra, Dropout, Gaussian) and of ``compress=``.

Oracles share nothing with hookinf's compression code: per-example gradients from ``torch.func`` (conftest's
``func_per_example_grads``) laid out as the ``[O, I]`` matrix of the convention (bias as the last input column,
``vec`` = row-major flatten), the explicit ``[r', d]`` matrix ``P`` of :meth:`BoundCompressor.projection`, explicit
damped blocks in the compressed space and ``torch.linalg.solve``.

Conventions under test (``hookinf/compress/base.py``): LoGra's compressed gradient is ``P_out g P_inᵀ``
``[r_out, r_in]`` = ``(P_out ⊗ P_in) vec(g)``; Dropout's and Gaussian's is ``P vec(g)`` stored as an ``[r', 1]``
matrix (Dropout's ``P`` is ``r`` rows of the identity, the paper's ``Ĩ``, eq. (3) of the dropout-compression
paper). Compressed influence is ``−(P g_q)ᵀ (P G Pᵀ + λ' I)⁻¹ (P g)`` with ``λ' = damping × tr(P G Pᵀ)/r'``
(eq. (3) with damping); K-FAC/EK-FAC run on the projected factors ``a P_inᵀ`` and ``δ P_outᵀ``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_CASES, ModelCase, close, oracle_matrices
from torch import Tensor, nn

import hookinf
from hookinf.compress import BoundCompressor
from hookinf.compress.dropout import BoundDropout
from hookinf.compress.gaussian import BoundGaussian
from hookinf.compress.logra import BoundLoGra
from hookinf.errors import ConfigurationError, CurvatureError, HookinfError
from hookinf.pipeline import Collect

Batch = tuple[Tensor, ...]
F64 = torch.float64

# Compressed per-example gradients vs P @ vec(torch.func gradient): both float64; the sides differ only in the
# summation order of the contractions (Σ_s δ aᵀ then P, or (δ P_outᵀ)(a P_inᵀ)ᵀ, vs autograd then an explicit
# d-long dot product). With d ≤ ~1100 and O(1) projection entries the rounding is ~d·ε ≈ 1e-13 of the largest
# entry, so 1e-10 of the largest entry of the layer leaves a wide margin and still catches any wrong index/transpose.
GRAD_TOL = 1e-10
# Scores: explicit float64 solves of damped blocks (λ = 0.1 × mean eigenvalue ⇒ condition ≤ 10·r' + 1 ≲ 1e4) vs
# hookinf's Cholesky / Kronecker eigenbasis; rounding ≲ 1e-12 of the largest score, far below 1e-8.
SCORE_TOL = 1e-8
# The same float64 computation run two ways that differ only in summation order (per-token parts vs their sum).
SUM_TOL = 1e-12
# A float32 model compressed with the same float64-drawn projections, vs the float64 model: float32 rounding.
F32_TOL = 1e-5


# ---------------------------------------------------------------------------------------------------- helpers


def captured(case: ModelCase, batch: Batch | None = None, model: nn.Module | None = None) -> tuple[Any, dict]:
    """One step captured by ``hookinf.watch`` (no ``.grad`` touched) and the tracked layers' shapes."""
    model = case.model if model is None else model
    params = [p for p in model.parameters() if p.requires_grad]
    with hookinf.watch(model, modules=case.modules, loss_reduction="sum") as w:
        losses = case.loss_fn(model, case.batch if batch is None else batch)
        torch.autograd.grad(losses.sum(), params, allow_unused=True)
        step = w.last_step
        shapes = {name: hookinf.LayerShape.of(adapter) for name, adapter in w.adapters.items()}
    assert step is not None
    return step, shapes


def projections(bound: BoundCompressor) -> dict[str, Tensor]:
    return {layer: bound.projection(layer) for layer in bound.shapes}


def data(case: ModelCase) -> tuple[list[Batch], list[Batch]]:
    """Two training batches and one query batch of a case."""
    return [case.make_batch(1), case.make_batch(2)], [case.make_batch(3)]


def run(case: ModelCase, train: list[Batch], query: list[Batch], **kwargs: Any) -> hookinf.Scores:
    return hookinf.influence(case.model, train, query, case.loss_fn, modules=case.modules, progress=False, **kwargs)


def assert_scores(actual: hookinf.Scores, expected: Mapping[str, Tensor], what: str, tol: float = SCORE_TOL) -> None:
    """Per-layer parts against their references, and the total against the sum of the references."""
    __tracebackhide__ = True
    assert actual.layers == tuple(expected), f"{what}: layers {actual.layers} != {tuple(expected)}"
    for layer, part in expected.items():
        close(actual.per_layer[layer], part, tol, f"{what} layer {layer!r}")
    close(actual.total, sum(expected.values()), tol, f"{what} total")


def explicit_scores(block: Tensor, lam: float, train: Tensor, query: Tensor) -> Tensor:
    """``[n_query, n_train]``: ``−q̃ᵀ (block + λ I)⁻¹ g̃`` with an explicit solve (rows are compressed vectors)."""
    damped = block + lam * torch.eye(block.shape[0], dtype=F64)
    return -(torch.linalg.solve(damped, query.T).T @ train.T)


# ---------------------------------------------------------------------------------------------------- 1. oracle
#: ranks below every layer's dims, and far above them (clipped to full rank); both LoGra inits; both Dropout forms.
COMPRESSORS: tuple[hookinf.Compressor, ...] = (
    hookinf.LoGra(2, 3),
    hookinf.LoGra(3, 2, init="orthogonal", seed=5),
    hookinf.LoGra(10_000, 10_000),
    hookinf.LoGra(10_000, 10_000, init="orthogonal"),
    hookinf.LoGra(1, 10_000, init="orthogonal", seed=2),
    hookinf.Dropout(r=5),
    hookinf.Dropout(r=10**9, seed=4),
    hookinf.Dropout(keep=0.3, seed=1),
    hookinf.Dropout(keep=1.0),
    hookinf.Gaussian(7),
    hookinf.Gaussian(10**6, seed=3),
)


def expected_shape(compressor: hookinf.Compressor, shape: hookinf.LayerShape) -> tuple[int, int]:
    """The compressed gradient matrix ``(O', I')`` of a layer: ranks clipped to the layer's dims."""
    if isinstance(compressor, hookinf.LoGra):
        return min(compressor.r_out, shape.out_features), min(compressor.r_in, shape.in_features)
    if isinstance(compressor, hookinf.Gaussian):
        return min(compressor.r, shape.dim), 1
    assert isinstance(compressor, hookinf.Dropout)
    if compressor.r is not None:
        return min(compressor.r, shape.dim), 1
    assert compressor.keep is not None
    return max(1, min(shape.dim, math.ceil(compressor.keep * shape.dim))), 1


def check_against_oracle(case: ModelCase, compressors: Sequence[hookinf.Compressor]) -> None:
    step, shapes = captured(case)
    oracle = oracle_matrices(case.model, case.loss_fn, [case.batch], list(shapes))
    assert all(bool(g.abs().max() > 0) for g in oracle.values()), "vacuous comparison: a zero gradient"
    for compressor in compressors:
        bound = compressor.bind(shapes)
        compressed = bound.compress(step)
        assert list(compressed.layers) == list(step.layers)
        assert compressed.batch_size == step.batch_size
        for layer, shape in shapes.items():
            what = f"{case.id}/{compressor} layer {layer!r}"
            out_dim, in_dim = expected_shape(compressor, shape)
            assert (bound.shapes[layer].out_features, bound.shapes[layer].in_features) == (out_dim, in_dim), what
            proj = bound.projection(layer)
            assert proj.dtype == F64, what
            assert tuple(proj.shape) == (out_dim * in_dim, shape.dim), what
            got = compressed.layers[layer].gradients()
            assert tuple(got.shape) == (case.batch_size, out_dim, in_dim), what
            expected = oracle[layer].flatten(1) @ proj.T  # [B, r'] = (P vec(g_b))_b
            close(got.flatten(1), expected, GRAD_TOL, what)


@pytest.mark.parametrize("case_id", list(MODEL_CASES))
def test_compressed_gradients_equal_projection_of_func_gradients(case_id: str) -> None:
    check_against_oracle(MODEL_CASES[case_id](), COMPRESSORS)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft calling transformers
def test_lora_minilm_compressed_gradients_equal_projection_of_func_gradients(lora_minilm: ModelCase) -> None:
    # 24 LoRA layers: lora_A [2, 384] and lora_B [384, 2] (d = 768); LoGra(8, 8) is clipped on one side of each.
    compressors = (
        hookinf.LoGra(8, 8),
        hookinf.LoGra(8, 8, init="orthogonal"),
        hookinf.LoGra(10_000, 10_000, init="orthogonal"),
        hookinf.Dropout(r=16),
        hookinf.Dropout(keep=0.1),
        hookinf.Gaussian(16),
    )
    check_against_oracle(lora_minilm, compressors)


# In-hook compression (a watch with the bound compressor as its factor map) vs compressing the raw step afterwards:
# the same float64 numbers up to summation order — LoGra's convolution or affine map vs unfold, ones column and
# matmul; Dropout's gather of distinct rows/columns then entries vs entries directly (exact); Gaussian the same code.
IN_HOOK_TOL = 1e-12


@pytest.mark.parametrize("case_id", list(MODEL_CASES))
@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
def test_compressing_in_the_hooks_equals_compressing_the_captured_step(case_id: str, loss_reduction: str) -> None:
    case = MODEL_CASES[case_id]()
    params = [p for p in case.model.parameters() if p.requires_grad]
    with hookinf.watch(case.model, modules=case.modules, loss_reduction=loss_reduction) as w:
        losses = case.loss_fn(case.model, case.batch)
        torch.autograd.grad(losses.sum() if loss_reduction == "sum" else losses.mean(), params, allow_unused=True)
        raw = w.last_step
        shapes = {name: hookinf.LayerShape.of(adapter) for name, adapter in w.adapters.items()}
    assert raw is not None
    for compressor in (hookinf.LoGra(3, 2), hookinf.LoGra(10_000, 10_000, init="orthogonal"), *COMPRESSORS[-4:]):
        bound = compressor.bind(shapes)
        expected = bound.compress(raw)
        collected = Collect()
        watch = hookinf.Watch(
            case.model, modules=case.modules, loss_reduction=loss_reduction, consumers=[collected], factor_map=bound
        )
        with watch:
            losses = case.loss_fn(case.model, case.batch)
            torch.autograd.grad(losses.sum() if loss_reduction == "sum" else losses.mean(), params, allow_unused=True)
            assert watch.steps == 1
            step = collected.take()
        for layer, capture in expected.layers.items():
            what = f"{case_id}/{compressor}/{layer}"
            got = step.layers[layer]
            assert got.adapter is None, what
            assert got.a.shape == capture.a.shape, what
            assert got.delta.shape == capture.delta.shape, what
            close(got.gradients(), capture.gradients(), IN_HOOK_TOL, what)


def test_a_watch_that_compresses_holds_only_the_projected_factors_between_forward_and_backward() -> None:
    """Between the forward and the backward, what the watch keeps is the [B, S, r_in] projection, not the input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(4, 3, 6, 6)
    shapes = {name: hookinf.LayerShape.of(adapter) for name, adapter in hookinf.Watch(model).adapters.items()}
    bound = hookinf.LoGra(2, 2).bind(shapes)
    held: dict[bool, list[tuple[int, ...]]] = {}
    for in_hooks in (False, True):
        with hookinf.Watch(model, consumers=[Collect()], factor_map=bound if in_hooks else None) as w:
            out = model(x)
            held[in_hooks] = [tuple(call.a.shape) for call in w._pending.calls]  # what waits for the backward
            out.sum().backward()
    # uncompressed: the layers' inputs themselves (which autograd keeps for the backward anyway), not the unfolded
    # [4, 36, 3 · 9 + 1] patches nor a copy with a ones column: the activations are formed in the backward
    assert held[False] == [(4, 3, 6, 6), (4, 8 * 36)]
    assert held[True] == [(4, 36, 2), (4, 1, 2)]  # conv: 36 positions × r_in = 2, never the [4, 36, 27 + 1] patches


# ---------------------------------------------------------------------------------------------------- 2. determinism
def draws(bound: BoundCompressor) -> dict[str, Tensor]:
    """Everything a bound compressor drew, keyed ``"<layer>/<what>"``."""
    if isinstance(bound, BoundLoGra):
        return {**{f"{n}/p_in": p for n, p in bound.p_in.items()}, **{f"{n}/p_out": p for n, p in bound.p_out.items()}}
    if isinstance(bound, BoundDropout):
        return {**{f"{n}/rows": r for n, r in bound.rows.items()}, **{f"{n}/cols": c for n, c in bound.cols.items()}}
    assert isinstance(bound, BoundGaussian)
    return {f"{n}/matrix": m for n, m in bound.matrices.items()}


SEEDED = (
    hookinf.LoGra(3, 2),
    hookinf.LoGra(3, 2, init="orthogonal"),
    hookinf.Dropout(r=6),
    hookinf.Dropout(keep=0.5),
    hookinf.Gaussian(5),
)


@pytest.mark.parametrize("compressor", SEEDED, ids=str)
def test_same_seed_gives_identical_projections_across_binds_and_dtypes(compressor: hookinf.Compressor) -> None:
    case = MODEL_CASES["mlp-bias"]()
    step64, shapes64 = captured(case)
    model32 = copy.deepcopy(case.model).float()
    step32, shapes32 = captured(case, tuple(t.float() if t.is_floating_point() else t for t in case.batch), model32)
    assert shapes32 == shapes64

    rng = torch.random.get_rng_state()
    first = compressor.bind(shapes64)
    torch.manual_seed(12345)  # the global RNG plays no part in the draws
    second = compressor.bind(shapes32)
    torch.random.set_rng_state(rng)
    third = type(compressor)(**{k: v for k, v in compressor.config().items() if k != "kind"}).bind(shapes64)

    for other in (second, third):
        a, b = draws(first), draws(other)
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{compressor}: {key} differs between binds"
    for layer, proj in projections(first).items():
        assert proj.dtype == F64
        assert torch.equal(proj, second.projection(layer)), layer

    # The float32 capture is compressed with the same (float64-drawn) projections, in float32.
    c64, c32 = first.compress(step64), second.compress(step32)
    for layer in shapes64:
        got = c32.layers[layer].gradients()
        assert got.dtype == torch.float32, layer
        close(got, c64.layers[layer].gradients(), F32_TOL, f"{compressor} float32 vs float64, layer {layer!r}")


@pytest.mark.parametrize("compressor", SEEDED, ids=str)
def test_different_seed_or_layer_name_gives_different_projections(compressor: hookinf.Compressor) -> None:
    shape = hookinf.LayerShape(6, 7, ())
    bound = compressor.bind({"a": shape, "b": shape})
    reseeded = type(compressor)(**{**{k: v for k, v in compressor.config().items() if k != "kind"}, "seed": 1})
    other = reseeded.bind({"a": shape, "b": shape})
    assert not torch.equal(bound.projection("a"), bound.projection("b")), "same projection for two layer names"
    assert not torch.equal(bound.projection("a"), other.projection("a")), "same projection for two seeds"
    assert not torch.equal(bound.projection("b"), other.projection("b")), "same projection for two seeds"


@pytest.mark.parametrize("compressor", [hookinf.Dropout(r=17), hookinf.Dropout(keep=0.4), hookinf.Dropout(r=10**6)])
def test_dropout_indices_are_distinct_and_within_range(compressor: hookinf.Dropout) -> None:
    shapes = {"x": hookinf.LayerShape(5, 9, ()), "y": hookinf.LayerShape(3, 1, ()), "z": hookinf.LayerShape(1, 4, ())}
    bound = compressor.bind(shapes)
    for layer, shape in shapes.items():
        rows, cols = bound.rows[layer], bound.cols[layer]
        r = compressor.entries(shape.dim)
        assert rows.shape == cols.shape == (r,), layer
        assert int(rows.min()) >= 0, layer
        assert int(rows.max()) < shape.out_features, layer
        assert int(cols.min()) >= 0, layer
        assert int(cols.max()) < shape.in_features, layer
        flat = rows * shape.in_features + cols
        assert flat.unique().numel() == r, f"{layer}: an entry is kept twice (drawn with replacement)"
        # Ĩ: each row one 1, each column at most one 1 (the paper's §3.1).
        proj = bound.projection(layer)
        assert torch.equal(proj.sum(dim=1), torch.ones(r, dtype=F64)), layer
        assert bool((proj.sum(dim=0) <= 1).all()), layer


@pytest.mark.parametrize(
    ("keep", "dim", "entries"),
    [(0.4, 45, 18), (0.3, 42, 13), (0.5, 1, 1), (0.01, 5, 1), (1.0, 7, 7), (0.07, 100, 7), (0.14, 50, 7)],
)
def test_dropout_keep_is_the_rounded_up_fraction_of_the_entries(keep: float, dim: int, entries: int) -> None:
    # ceil(keep × d), at least 1; keep × d that is a whole number keeps exactly that many entries (0.07 × 100 is
    # 7.000000000000001 in floating point, which must not round up to 8).
    assert hookinf.Dropout(keep=keep).entries(dim) == entries
    assert hookinf.Dropout(keep=keep).bind({"x": hookinf.LayerShape(dim, 1, ())}).shapes["x"].out_features == entries


def test_dropout_keep_one_keeps_every_entry_exactly_once() -> None:
    shapes = {"x": hookinf.LayerShape(5, 9, ()), "y": hookinf.LayerShape(7, 3, ())}
    bound = hookinf.Dropout(keep=1.0).bind(shapes)
    for layer, shape in shapes.items():
        flat = bound.rows[layer] * shape.in_features + bound.cols[layer]
        assert torch.equal(flat.sort().values, torch.arange(shape.dim)), layer
        proj = bound.projection(layer)  # a permutation matrix
        assert torch.equal(proj @ proj.T, torch.eye(shape.dim, dtype=F64)), layer
        assert torch.equal(proj.T @ proj, torch.eye(shape.dim, dtype=F64)), layer


def test_logra_orthogonal_init_has_orthonormal_rows_and_is_orthogonal_at_full_rank() -> None:
    shapes = {"x": hookinf.LayerShape(6, 9, ())}
    small = hookinf.LoGra(4, 3, init="orthogonal").bind(shapes)
    for p in (small.p_in["x"], small.p_out["x"]):
        close(p @ p.T, torch.eye(p.shape[0], dtype=F64), 1e-14, "P Pᵀ = I")
    full = hookinf.LoGra(100, 100, init="orthogonal").bind(shapes)
    proj = full.projection("x")
    assert proj.shape == (54, 54)
    close(proj.T @ proj, torch.eye(54, dtype=F64), 1e-13, "full-rank (P_out ⊗ P_in)ᵀ (P_out ⊗ P_in) = I")


# ---------------------------------------------------------------------------------------------------- 3. exactness
FULL_ORTHOGONAL = hookinf.LoGra(10_000, 10_000, init="orthogonal", seed=7)


@pytest.mark.parametrize("method", ["exact", "identity", "kfac", "ekfac"])
@pytest.mark.parametrize("case_id", ["mlp-bias", "seq-linear", "conv2d"])
def test_full_rank_orthogonal_logra_leaves_influence_unchanged(case_id: str, method: str) -> None:
    # exact/identity: P is orthogonal, so (Pg_q)ᵀ(PGPᵀ + λI)⁻¹(Pg) = g_qᵀ(G + λI)⁻¹g with the same λ (tr and d kept).
    # kfac/ekfac: the projected factors are A' = P_in A P_inᵀ, S' = P_out S P_outᵀ, so S' ⊗ A' = P (S ⊗ A) Pᵀ with
    # P = P_out ⊗ P_in orthogonal; their eigenbases are the rotated ones (P_in Q_A, P_out Q_S) with the same
    # eigenvalues, and EK-FAC's corrected eigenvalues diag(Kᵀ G K) are unchanged since (PK)ᵀ(PGPᵀ)(PK) = KᵀGK.
    case = MODEL_CASES[case_id]()
    train, query = data(case)
    plain = run(case, train, query, method=method)
    rotated = run(case, train, query, method=method, compress=FULL_ORTHOGONAL)
    assert_scores(rotated, plain.per_layer, f"{case_id}/{method} LoGra full rank orthogonal")
    assert rotated.damping == pytest.approx(plain.damping, rel=1e-10)


@pytest.mark.parametrize("method", ["exact", "identity", "datainf"])
@pytest.mark.parametrize("case_id", ["mlp-bias", "seq-linear", "conv1d"])
def test_dropout_keep_one_reproduces_uncompressed_influence(case_id: str, method: str) -> None:
    # keep=1.0 is a permutation of the gradient's entries: norms, traces and every inner product are unchanged.
    case = MODEL_CASES[case_id]()
    train, query = data(case)
    plain = run(case, train, query, method=method)
    permuted = run(case, train, query, method=method, compress=hookinf.Dropout(keep=1.0, seed=3))
    assert_scores(permuted, plain.per_layer, f"{case_id}/{method} Dropout(keep=1)")
    assert permuted.damping == pytest.approx(plain.damping, rel=1e-10)


# ---------------------------------------------------------------------------------------------------- 4. brute force
BRUTE = (
    hookinf.LoGra(3, 2, seed=1),
    hookinf.LoGra(4, 2, init="orthogonal"),
    hookinf.Dropout(r=9),
    hookinf.Gaussian(11),
)


@pytest.mark.parametrize("compressor", BRUTE, ids=str)
@pytest.mark.parametrize("case_id", ["mlp-bias", "seq-linear", "conv1d"])
def test_compressed_exact_and_identity_equal_brute_force_in_the_subspace(
    case_id: str, compressor: hookinf.Compressor
) -> None:
    case = MODEL_CASES[case_id]()
    train, query = data(case)
    _, shapes = captured(case)
    bound = compressor.bind(shapes)
    g_train = oracle_matrices(case.model, case.loss_fn, train, list(shapes))
    g_query = oracle_matrices(case.model, case.loss_fn, query, list(shapes))
    exact: dict[str, Tensor] = {}
    identity: dict[str, Tensor] = {}
    lambdas: dict[str, float] = {}
    for layer in shapes:
        proj = bound.projection(layer)  # [r', d]
        pg = g_train[layer].flatten(1) @ proj.T  # [n, r']
        pq = g_query[layer].flatten(1) @ proj.T
        block = pg.T @ pg / pg.shape[0]  # P G Pᵀ
        # λ' = damping × tr(P G Pᵀ)/r', at exact's default damping, relative 1.0
        lambdas[layer] = 1.0 * float(torch.trace(block)) / proj.shape[0]
        exact[layer] = explicit_scores(block, lambdas[layer], pg, pq)
        identity[layer] = -(pq @ pg.T)
    got = run(case, train, query, method="exact", compress=compressor)
    assert_scores(got, exact, f"{case_id}/{compressor} exact")
    assert got.damping == pytest.approx(lambdas, rel=1e-10)
    assert_scores(run(case, train, query, method="identity", compress=compressor), identity, f"{compressor} identity")


def test_compressed_self_influence_is_minus_the_diagonal_of_influence() -> None:
    case = MODEL_CASES["seq-linear"]()
    train, _ = data(case)
    compressor = hookinf.LoGra(3, 2)
    scores = run(case, train, train, method="exact", compress=compressor)
    values = hookinf.self_influence(
        case.model, train, case.loss_fn, method="exact", compress=compressor, progress=False
    ).total
    close(values, -scores.total.diagonal(), SCORE_TOL, "self_influence vs −diag(influence)")


# ---------------------------------------------------------------------------------------------------- 5. K-FAC
def projected_factors(case: ModelCase, train: Sequence[Batch], bound: BoundLoGra) -> dict[str, tuple[Tensor, Tensor]]:
    """``(A', S')`` per layer: ``A = Σ a aᵀ / T``, ``S = Σ δ δᵀ / n`` from the watch's captures, then projected."""
    a_sum: dict[str, Tensor] = {}
    s_sum: dict[str, Tensor] = {}
    positions: dict[str, int] = {}
    n = 0
    for batch in train:
        step, _ = captured(case, batch)
        n += step.batch_size
        for name, capture in step.layers.items():
            a = capture.a.reshape(-1, capture.a.shape[-1]).double()
            d = capture.delta.reshape(-1, capture.delta.shape[-1]).double()
            a_sum[name] = a_sum.get(name, 0) + a.T @ a
            s_sum[name] = s_sum.get(name, 0) + d.T @ d
            positions[name] = positions.get(name, 0) + a.shape[0]
    out = {}
    for name in a_sum:
        p_in, p_out = bound.p_in[name], bound.p_out[name]
        out[name] = (p_in @ (a_sum[name] / positions[name]) @ p_in.T, p_out @ (s_sum[name] / n) @ p_out.T)
    return out


@pytest.mark.parametrize("compressor", [hookinf.LoGra(3, 2, seed=4), hookinf.LoGra(4, 2, init="orthogonal")], ids=str)
@pytest.mark.parametrize("case_id", ["mlp-bias", "seq-linear"])
def test_logra_kfac_and_ekfac_equal_brute_force_on_projected_factors(case_id: str, compressor: hookinf.LoGra) -> None:
    case = MODEL_CASES[case_id]()
    train, query = data(case)
    _, shapes = captured(case)
    bound = compressor.bind(shapes)
    assert isinstance(bound, BoundLoGra)
    factors = projected_factors(case, train, bound)
    g_train = oracle_matrices(case.model, case.loss_fn, train, list(shapes))
    g_query = oracle_matrices(case.model, case.loss_fn, query, list(shapes))
    kfac: dict[str, Tensor] = {}
    ekfac: dict[str, Tensor] = {}
    kfac_lambda: dict[str, float] = {}
    ekfac_lambda: dict[str, float] = {}
    for layer in shapes:
        a_proj, s_proj = factors[layer]
        proj = bound.projection(layer)  # P_out ⊗ P_in
        pg = g_train[layer].flatten(1) @ proj.T
        pq = g_query[layer].flatten(1) @ proj.T
        block = torch.kron(s_proj, a_proj)  # S' ⊗ A'
        kfac_lambda[layer] = 0.1 * float(torch.trace(s_proj) * torch.trace(a_proj)) / block.shape[0]
        kfac[layer] = explicit_scores(block, kfac_lambda[layer], pg, pq)
        _, q_a = torch.linalg.eigh(a_proj)
        _, q_s = torch.linalg.eigh(s_proj)
        basis = torch.kron(q_s, q_a)
        gram = pg.T @ pg / pg.shape[0]  # P G Pᵀ
        eigen = ((basis.T @ gram) * basis.T).sum(dim=1)  # diag(Kᵀ G' K)
        ekfac_lambda[layer] = 0.1 * float(eigen.mean())
        ekfac[layer] = explicit_scores((basis * eigen) @ basis.T, ekfac_lambda[layer], pg, pq)
    got_kfac = run(case, train, query, method="kfac", compress=compressor)
    assert_scores(got_kfac, kfac, f"{case_id}/{compressor} kfac")
    assert got_kfac.damping == pytest.approx(kfac_lambda, rel=1e-10)
    got_ekfac = run(case, train, query, method="ekfac", compress=compressor)
    assert_scores(got_ekfac, ekfac, f"{case_id}/{compressor} ekfac")
    assert got_ekfac.damping == pytest.approx(ekfac_lambda, rel=1e-10)


# ---------------------------------------------------------------------------------------------------- 6. errors
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: hookinf.LoGra(0, 2), r"r_in"),
        (lambda: hookinf.LoGra(2, -1), r"r_out"),
        (lambda: hookinf.LoGra(2.5, 2), r"r_in"),
        (lambda: hookinf.LoGra(2, 2, init="uniform"), r"gaussian.*orthogonal"),
        (lambda: hookinf.Dropout(), r"exactly one of r= .* or keep="),
        (lambda: hookinf.Dropout(r=3, keep=0.5), r"exactly one of r= .* or keep="),
        (lambda: hookinf.Dropout(r=0), r"positive integer"),
        (lambda: hookinf.Dropout(keep=1.5), r"fraction in \(0, 1\]"),
        (lambda: hookinf.Dropout(keep=0.0), r"fraction in \(0, 1\]"),
        (lambda: hookinf.Gaussian(0), r"positive integer"),
    ],
    ids=[
        "logra-r_in=0",
        "logra-r_out<0",
        "logra-float",
        "logra-init",
        "dropout-neither",
        "dropout-both",
        "dropout-r=0",
        "dropout-keep>1",
        "dropout-keep=0",
        "gaussian-r=0",
    ],
)
def test_invalid_compressor_configuration_is_refused(make: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        make()
    assert isinstance(info.value, HookinfError)


def test_gaussian_refuses_projections_above_max_bytes_and_suggests_logra_or_dropout() -> None:
    shapes = {"big": hookinf.LayerShape(100, 101, ()), "small": hookinf.LayerShape(2, 3, ())}
    # 8 bytes × min(r, d) × d: 8 × 64 × 10100 + 8 × 6 × 6 = 5,171,488 bytes.
    hookinf.Gaussian(64, max_bytes=5_171_488).bind(shapes)  # exactly at the limit: accepted
    with pytest.raises(ConfigurationError, match=r"GiB") as info:
        hookinf.Gaussian(64, max_bytes=5_171_487).bind(shapes)
    message = str(info.value)
    assert "LoGra" in message, message
    assert "Dropout" in message, message
    assert "'big'" in message, message  # names the largest layer
    case = MODEL_CASES["mlp-bias"]()
    train, query = data(case)
    with pytest.raises(ConfigurationError, match=r"GiB.*LoGra.*Dropout"):
        run(case, train, query, compress=hookinf.Gaussian(4, max_bytes=100))


@pytest.mark.parametrize("compress", ["logra", {"kind": "logra"}, hookinf.Exact()], ids=["str", "dict", "method"])
def test_compress_must_be_a_compressor(compress: Any, tmp_path: Path) -> None:
    case = MODEL_CASES["mlp-bias"]()
    train, query = data(case)
    with pytest.raises(ConfigurationError, match=r"hookinf compressor"):
        run(case, train, query, compress=compress)
    with pytest.raises(ConfigurationError, match=r"hookinf compressor"):
        hookinf.fit(case.model, train, case.loss_fn, method="kfac", compress=compress, progress=False)
    with pytest.raises(ConfigurationError, match=r"hookinf compressor"):
        hookinf.self_influence(case.model, train, case.loss_fn, compress=compress, progress=False)
    with pytest.raises(ConfigurationError, match=r"hookinf compressor"):
        hookinf.watch(case.model, fit="kfac", compress=compress)
    with pytest.raises(ConfigurationError, match=r"hookinf compressor"):
        hookinf.log(case.model, train, case.loss_fn, compress=compress, path=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("method", ["kfac", "ekfac", "exact"])
def test_curvature_remembers_its_compressor(method: str, tmp_path: Path) -> None:
    case = MODEL_CASES["mlp-bias"]()
    train, query = data(case)
    logra = hookinf.LoGra(3, 2)
    curvature = hookinf.fit(case.model, train, case.loss_fn, method=method, compress=logra, progress=False)
    assert curvature.extra["compressor"] == logra.config()
    reference = run(case, train, query, method=method, compress=logra)
    assert_scores(run(case, train, query, method=curvature, compress=logra), reference.per_layer, "reused", SUM_TOL)
    loaded = hookinf.load(curvature.save(tmp_path / "c"))
    assert_scores(run(case, train, query, method=loaded, compress=logra), reference.per_layer, "loaded", SUM_TOL)
    others = [None, hookinf.Dropout(r=6), hookinf.LoGra(3, 2, seed=1), hookinf.LoGra(3, 2, init="orthogonal")]
    for other in others:
        with pytest.raises(CurvatureError, match=r"compress="):
            run(case, train, query, method=curvature, compress=other)
        with pytest.raises(CurvatureError, match=r"compress="):
            run(case, train, query, method=loaded, compress=other)
    plain = hookinf.fit(case.model, train, case.loss_fn, method=method, progress=False)
    with pytest.raises(CurvatureError, match=r"compress="):
        run(case, train, query, method=plain, compress=logra)
    with pytest.raises(CurvatureError, match=r"compress="):
        hookinf.self_influence(case.model, train, case.loss_fn, method=plain, compress=logra, progress=False)


@pytest.mark.parametrize("other", [None, hookinf.LoGra(10_000, 10_000, init="orthogonal", seed=1)], ids=str)
def test_ekfac_basis_fitted_with_a_compressor_is_refused_with_another(other: hookinf.Compressor | None) -> None:
    # A full-rank LoGra keeps the layer shapes, so only the recorded compressor tells the rotated basis apart.
    case = MODEL_CASES["mlp-bias"]()
    train, _ = data(case)
    basis = hookinf.fit(case.model, train, case.loss_fn, method="kfac", compress=FULL_ORTHOGONAL, progress=False)
    with pytest.raises(CurvatureError, match=r"compress"):
        hookinf.fit(case.model, train, case.loss_fn, method=hookinf.EKFAC(basis=basis), compress=other, progress=False)


@pytest.mark.parametrize("compressor", [hookinf.Dropout(r=5), hookinf.Gaussian(5)], ids=str)
def test_per_token_with_a_whole_gradient_compressor_is_refused(compressor: hookinf.Compressor) -> None:
    case = MODEL_CASES["seq-linear"]()
    train, query = data(case)
    with pytest.raises(ConfigurationError, match=r"per_token.*LoGra"):
        run(case, train, query, compress=compressor, per_token=True)


@pytest.mark.parametrize("method", ["exact", "kfac"])
def test_per_token_with_logra_sums_to_the_example_scores(method: str) -> None:
    case = MODEL_CASES["seq-linear"]()
    train, query = data(case)
    logra = hookinf.LoGra(3, 2)
    split = run(case, train, query, method=method, compress=logra, per_token=True)
    whole = run(case, train, query, method=method, compress=logra)
    assert split.per_token is not None
    for layer, tokens in split.per_token.items():
        assert tokens.shape == (4, 8, 5), layer  # [n_query, n_train, T]
        close(tokens.sum(dim=2), split.per_layer[layer], SUM_TOL, f"{layer}: Σ_t per_token vs per_layer")
        assert bool((tokens.std(dim=2) > 0).any()), f"{layer}: per-token parts are all alike"
    assert_scores(split, whole.per_layer, f"{method} per_token vs per example", SUM_TOL)


# ---------------------------------------------------------------------------------------------------- 7. captures
@pytest.mark.parametrize("compressor", [hookinf.LoGra(3, 2), hookinf.Dropout(r=4), hookinf.Gaussian(4)], ids=str)
def test_compressed_capture_has_no_parameter_gradients(compressor: hookinf.Compressor) -> None:
    case = MODEL_CASES["mlp-bias"]()
    step, shapes = captured(case)
    compressed = compressor.bind(shapes).compress(step)
    assert step.param_gradients()  # the uncompressed capture has them
    for layer, capture in compressed.layers.items():
        assert capture.adapter is None
        with pytest.raises(ConfigurationError, match=rf"'{layer}'.*compressed"):
            capture.param_gradients()
    with pytest.raises(ConfigurationError, match=r"compressed"):
        compressed.param_gradients()
