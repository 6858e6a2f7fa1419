"""``kfac`` and ``ekfac``: Kronecker-factored curvature and its eigenvalue correction.

K-FAC (Martens & Grosse 2015; for convolutions and shared positions, Grosse & Martens 2016, "KFC") approximates
each layer's block by a Kronecker product of two small matrices built from the captured factors:

    A_l = (1/T) Σ_i Σ_t a_{i,t} a_{i,t}ᵀ    [I, I]      (T: total positions t over all examples)
    S_l = (1/n) Σ_i Σ_t δ_{i,t} δ_{i,t}ᵀ    [O, O]      (n: examples)
    G_l ≈ S_l ⊗ A_l

so for a layer without shared positions (``S = 1``) ``G_l ≈ E[δδᵀ] ⊗ E[aaᵀ]``, and for ``T/n`` positions per
example the product carries the KFC factor ``1/(T/n)`` of spatially uncorrelated derivatives (the same
normalisation as kronfluence: activations averaged over positions, output gradients over examples). With the
eigendecompositions ``A = Q_A Λ_A Q_Aᵀ`` and ``S = Q_S Λ_S Q_Sᵀ`` (float64), a gradient matrix ``g`` ``[O, I]`` is
preconditioned without forming any ``d × d`` matrix:

    (G_l + λ_l I)⁻¹ vec(g) = vec( Q_S [ (Q_Sᵀ g Q_A) ⊘ (λ_S λ_Aᵀ + λ_l) ] Q_Aᵀ ).

EK-FAC (George et al. 2018; Grosse et al. 2023, §2.2.3) keeps the eigenbasis and replaces ``λ_S λ_Aᵀ`` by the
exact second moments of the per-example gradients in that basis, measured in a second pass:

    Λ_{oi} = (1/n) Σ_i ((Q_Sᵀ g_i Q_A)_{oi})²,

which are the diagonal of the exact ``G_l`` in the Kronecker eigenbasis. Damping (:mod:`hookinf.damping`): K-FAC
uses ``λ_l = damping × mean(λ_S ⊗ λ_A) = damping × tr(S_l) tr(A_l)/d_l``; EK-FAC ``damping × mean(Λ)``, which
equals ``damping × tr(G_l)/d_l`` — the same ``λ_l`` as ``exact``.

Index conventions: ``b`` examples, ``s`` positions, ``o``/``p`` output features, ``i``/``j`` input features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Self

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.curvature import Curvature, LayerShape
from hookinf.damping import Damping
from hookinf.errors import ConfigurationError, CurvatureError
from hookinf.linalg import einsum
from hookinf.methods.base import Accumulator, Method, Passes


@dataclass(frozen=True)
class _Eigen:
    q_a: Tensor  # [I, I]
    q_s: Tensor  # [O, O]
    eigen: Tensor  # [O, I] (K-FAC: λ_S λ_Aᵀ; EK-FAC: corrected)
    lam: float


def _eigh(matrix: Tensor, layer: str, what: str) -> tuple[Tensor, Tensor]:
    matrix = matrix.to(torch.float64)
    if not bool(torch.isfinite(matrix).all()):
        raise CurvatureError(
            f"layer '{layer}': the {what} factor holds NaN or infinity (non-finite activations or gradients in the "
            f"fit pass); check the data and the loss."
        )
    try:
        values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    except RuntimeError as err:  # LAPACK failed to converge
        raise CurvatureError(f"layer '{layer}': eigendecomposition of the {what} factor failed ({err}).") from err
    return values.clamp_min(0.0), vectors


def _precondition(prepared: _Eigen, grads: Tensor) -> Tensor:
    rotated = prepared.q_s.T @ grads @ prepared.q_a  # [N, O, I] in the eigenbasis
    rotated = rotated / (prepared.eigen + prepared.lam)
    return prepared.q_s @ rotated @ prepared.q_a.T


def _check_positive(layer: str, eigen: Tensor, lam: float, damping: Damping) -> None:
    # Rounding turns an exact zero direction (e.g. the last layer under cross-entropy, whose output gradients sum to
    # zero over classes) into ±1e-20, so refuse damped eigenvalues below numpy.linalg.matrix_rank's tolerance.
    damped = eigen + lam
    tol = eigen.numel() * torch.finfo(torch.float64).eps * float(damped.max())
    if float(damped.min()) <= tol:
        raise CurvatureError(
            f"layer '{layer}': the damped curvature has a zero eigenvalue (λ={lam:.3g}, {damping}), so it cannot be "
            f"inverted. Use a positive damping (e.g. damping=0.1 or hookinf.Damping(absolute=1e-3))."
        )


class _KroneckerCurvature(Curvature):
    """Shared by K-FAC and EK-FAC: a Kronecker eigenbasis with one eigenvalue per ``(o, i)`` direction.

    Eigendecompositions are float64; applying the preconditioner (two GEMMs per query and layer) runs in the
    statistics' dtype — float32 for a float32 model, as its gradients carry no more precision — which halves the
    cost of scoring large layers.
    """

    def compute_dtype(self, layer: str) -> torch.dtype:
        """float64 for float64 statistics, float32 for float32 ones."""
        return self.stat(layer, "A").dtype

    def _cast(self, layer: str, prepared: _Eigen) -> _Eigen:
        dtype = self.compute_dtype(layer)
        return _Eigen(prepared.q_a.to(dtype), prepared.q_s.to(dtype), prepared.eigen.to(dtype), prepared.lam)

    def _apply(self, prepared: _Eigen, grads: Tensor) -> Tensor:
        return _precondition(prepared, grads)

    def _lambda(self, prepared: _Eigen) -> float:
        return prepared.lam

    def _eigen_range(self, layer: str) -> tuple[float, float]:
        eigen = self._prepared(layer).eigen
        return float(eigen.min()), float(eigen.max())


class KFACCurvature(_KroneckerCurvature):
    """Statistics per layer: ``A`` (Σ a aᵀ) ``[I, I]``, ``S`` (Σ δ δᵀ) ``[O, O]``, ``positions`` (T, a scalar)."""

    method = "kfac"
    statistics = ("A", "S", "positions")

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(A_l, S_l)`` as defined in the module docstring, float64."""
        positions = float(self.stat(layer, "positions"))
        a = self.stat(layer, "A").to(torch.float64) / max(positions, 1.0)
        s = self.stat(layer, "S").to(torch.float64) / max(self.num_examples, 1)
        return a, s

    def eigenbasis(self, layer: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(λ_A, Q_A, λ_S, Q_S)`` of the layer's factors (float64)."""
        a, s = self.factors(layer)
        lam_a, q_a = _eigh(a, layer, "activation (A)")
        lam_s, q_s = _eigh(s, layer, "output-gradient (S)")
        return lam_a, q_a, lam_s, q_s

    def _prepare(self, layer: str) -> _Eigen:
        lam_a, q_a, lam_s, q_s = self.eigenbasis(layer)
        eigen = lam_s[:, None] * lam_a[None, :]
        lam = self.damping.value(float(lam_s.mean()) * float(lam_a.mean()))
        _check_positive(layer, eigen, lam, self.damping)
        return self._cast(layer, _Eigen(q_a, q_s, eigen, lam))


class EKFACCurvature(_KroneckerCurvature):
    """K-FAC's statistics and eigenbasis plus the corrected eigenvalue sums.

    Statistics per layer: ``A``, ``S``, ``positions`` (as K-FAC), ``QA`` ``[I, I]`` and ``QS`` ``[O, O]`` (the
    eigenbasis), ``eigen`` ``[O, I]`` (Σ over examples of squared rotated gradients) and ``corrected`` (the number
    of examples ``eigen`` sums over).
    """

    method = "ekfac"
    statistics = ("A", "S", "positions", "QA", "QS", "eigen", "corrected")

    def _prepare(self, layer: str) -> _Eigen:
        count = float(self.stat(layer, "corrected"))
        eigen = self.stat(layer, "eigen").to(torch.float64) / max(count, 1.0)
        if not bool(torch.isfinite(eigen).all()):
            raise CurvatureError(f"layer '{layer}': EK-FAC's corrected eigenvalues hold NaN or infinity.")
        lam = self.damping.value(float(eigen.mean()))
        _check_positive(layer, eigen, lam, self.damping)
        q_a = self.stat(layer, "QA").to(torch.float64)
        q_s = self.stat(layer, "QS").to(torch.float64)
        return self._cast(layer, _Eigen(q_a, q_s, eigen, lam))

    def merge(self, other: Curvature) -> Self:
        """Adds the eigenvalue corrections of two fits made on the same K-FAC basis (e.g. shards of the data).

        EK-FAC fits merge only when both ran their correction pass on the same factors and eigenbasis
        (``hookinf.EKFAC(basis=merged_kfac)``): the factors are kept, the corrections and their counts add.
        """
        if not isinstance(other, EKFACCurvature) or other.layers != self.layers:
            return super().merge(other)  # raises the generic error
        if other.damping != self.damping:
            raise CurvatureError(f"cannot merge curvatures with different damping ({self.damping} vs {other.damping}).")
        for name in self.layers:
            for key in ("A", "S", "positions", "QA", "QS"):
                if not torch.equal(self.stat(name, key), other.stat(name, key)):
                    raise CurvatureError(
                        f"cannot merge EK-FAC fits of layer '{name}': they were corrected in different eigenbases "
                        f"(each fit computed its own). Merge the K-FAC factors instead — fit(..., method='kfac') per "
                        f"shard, then merge — and run the correction pass of every shard on the merged basis: "
                        f"fit(..., method=hookinf.EKFAC(basis=merged_kfac)); those fits merge."
                    )
        tensors = dict(self.tensors)
        for name in self.layers:
            for key in ("eigen", "corrected"):
                tensors[f"{name}/{key}"] = self.stat(name, key) + other.stat(name, key)
        return type(self)(self.layers, self.damping, self.num_examples, tensors, self.extra)


class _FactorAccumulator(Accumulator):
    """Sums ``Σ a aᵀ``, ``Σ δ δᵀ`` and position counts per layer."""

    def __init__(self, shapes: Mapping[str, LayerShape], dtype: torch.dtype) -> None:
        super().__init__()
        self.shapes = dict(shapes)
        self.tensors: dict[str, Tensor] = {}
        for name, shape in shapes.items():
            self.tensors[f"{name}/A"] = torch.zeros(shape.in_features, shape.in_features, dtype=dtype)
            self.tensors[f"{name}/S"] = torch.zeros(shape.out_features, shape.out_features, dtype=dtype)
            self.tensors[f"{name}/positions"] = torch.zeros((), dtype=torch.float64)

    def _update(self, step: Step) -> None:
        for name, capture in step.layers.items():
            a_sum = self.tensors[f"{name}/A"]
            a = capture.a.reshape(-1, capture.a.shape[-1]).to(a_sum.dtype)  # [B·S, I]
            d = capture.delta.reshape(-1, capture.delta.shape[-1]).to(a_sum.dtype)  # [B·S, O]
            _add_lower_gram(a_sum, a)
            _add_lower_gram(self.tensors[f"{name}/S"], d)
            self.tensors[f"{name}/positions"] += a.shape[0]

    def finish(self, damping: Damping) -> KFACCurvature:
        self._require_data()
        tensors = {
            key: _mirror_lower(value) if key.endswith(("/A", "/S")) else value.clone()
            for key, value in self.tensors.items()
        }
        return KFACCurvature(self.shapes, damping, self.count, tensors)


_BLOCKED_GRAM_MIN = 256  # below this many features one full product is as fast


def _add_lower_gram(total: Tensor, x: Tensor) -> None:
    """``total += xᵀx`` for ``x [N, D]``, on and below the diagonal only (:func:`_mirror_lower` completes it).

    A symmetric product needs only one triangle: splitting the features in halves, the three blocks on and below
    the diagonal cost three quarters of one full GEMM (torch has no ``syrk``). The block above stays untouched.
    """
    d = x.shape[1]
    if d < _BLOCKED_GRAM_MIN:
        total.addmm_(x.T, x)
        return
    h = d // 2
    low, high = x[:, :h], x[:, h:]
    total[:h, :h].addmm_(low.T, low)
    total[h:, :h].addmm_(high.T, low)
    total[h:, h:].addmm_(high.T, high)


def _mirror_lower(total: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is ``total``'s (a new tensor)."""
    return torch.tril(total) + torch.tril(total, diagonal=-1).T


class _CorrectionAccumulator(Accumulator):
    """Sums ``(Q_Sᵀ g_b Q_A)²`` per layer in a fixed eigenbasis (EK-FAC's second pass)."""

    def __init__(self, basis: KFACCurvature | EKFACCurvature, dtype: torch.dtype) -> None:
        super().__init__()
        self.basis = basis
        self.shapes = dict(basis.layers)
        self.tensors = {key: value for key, value in basis.tensors.items() if key.rsplit("/", 1)[1] in _KFAC_STATS}
        self.rotations: dict[str, tuple[Tensor, Tensor]] = {}
        for name, shape in self.shapes.items():
            if isinstance(basis, EKFACCurvature):
                q_a, q_s = basis.stat(name, "QA"), basis.stat(name, "QS")
            else:
                _, q_a, _, q_s = basis.eigenbasis(name)
            # contiguous, as they will be when loaded from disk: the same layout gives bit-identical products
            self.rotations[name] = (q_a.to(dtype).contiguous(), q_s.to(dtype).contiguous())
            self.tensors[f"{name}/QA"], self.tensors[f"{name}/QS"] = self.rotations[name]
            self.tensors[f"{name}/eigen"] = torch.zeros(shape.out_features, shape.in_features, dtype=dtype)
            self.tensors[f"{name}/corrected"] = torch.zeros((), dtype=torch.float64)

    def _update(self, step: Step) -> None:
        for name, capture in step.layers.items():
            q_a, q_s = self.rotations[name]
            a = capture.a.to(q_a.dtype) @ q_a  # [B, S, I] in A's eigenbasis
            d = capture.delta.to(q_s.dtype) @ q_s  # [B, S, O] in S's eigenbasis
            squared_gradient_sum(a, d, out=self.tensors[f"{name}/eigen"])
            self.tensors[f"{name}/corrected"] += capture.batch_size

    def finish(self, damping: Damping) -> EKFACCurvature:
        self._require_data()
        tensors = {key: value.clone() for key, value in self.tensors.items()}
        return EKFACCurvature(self.shapes, damping, self.basis.num_examples, tensors)


_KFAC_STATS = frozenset(KFACCurvature.statistics)
_CHUNK_ELEMENTS = 2**24  # per-example gradients formed at once when S > 1 (64 MiB in float32)


def squared_gradient_sum(a: Tensor, d: Tensor, out: Tensor | None = None) -> Tensor:
    """``Σ_b (Σ_s d_{b,s} a_{b,s}ᵀ)²`` (elementwise square) as ``[O, I]``; no ``[B, O, I]`` tensor when ``S = 1``.

    With one position, each example's gradient is the outer product ``d_b a_bᵀ``, whose elementwise square is
    ``(d_b ∘ d_b)(a_b ∘ a_b)ᵀ``, so the sum over the batch is one matrix product ``(d ∘ d)ᵀ (a ∘ a)``: the cost of a
    GEMM and ``O(B (O + I))`` memory. With several positions the per-example gradients are formed in chunks of
    examples bounded to ``_CHUNK_ELEMENTS`` numbers.

    Args:
        a: ``[B, S, I]``.
        d: ``[B, S, O]``.
        out: ``[O, I]`` to add the sum into (and return); a new tensor when ``None``.
    """
    total = a.new_zeros(d.shape[2], a.shape[2]) if out is None else out
    if a.shape[1] == 1:
        return total.addmm_(d[:, 0].square().T, a[:, 0].square())
    per_chunk = max(1, _CHUNK_ELEMENTS // (d.shape[2] * a.shape[2]))
    for start in range(0, a.shape[0], per_chunk):
        grads = einsum("bso,bsi->boi", d[start : start + per_chunk], a[start : start + per_chunk])
        total += grads.square().sum(dim=0)
    return total


@dataclass(frozen=True)
class KFAC(Method):
    """K-FAC: one pass accumulating the Kronecker factors ``A_l`` and ``S_l``."""

    name = "kfac"

    def accumulator(self, shapes: Mapping[str, LayerShape], dtype: torch.dtype) -> Accumulator:
        """Accumulates the factors."""
        return _FactorAccumulator(shapes, dtype)


@dataclass(frozen=True)
class EKFAC(Method):
    """EK-FAC: K-FAC's factors (pass 1, or ``basis``), their eigenbasis, then the eigenvalue correction (pass 2).

    Attributes:
        basis: an already fitted ``kfac`` (or ``ekfac``) curvature whose factors and eigenbasis to use; the fit
            then runs only the correction pass (so it also works from one loop of the user's, see
            :func:`hookinf.watch`). Fits that share a basis merge (distributed fitting).
        cache_bytes: memory budget for keeping the first pass's captured ``(a, δ)`` so that the correction pass
            reads them instead of running the model over the data again (the weights are fixed, so they are the
            same numbers). When the captures outgrow the budget they are dropped at once and the correction pass
            runs the model, so peak memory stays bounded whatever the number of examples. ``0`` always runs two
            passes. Results are identical either way.
    """

    basis: Curvature | None = None
    cache_bytes: int = 2**28
    name = "ekfac"

    def __post_init__(self) -> None:
        if self.basis is not None and not isinstance(self.basis, KFACCurvature | EKFACCurvature):
            raise ConfigurationError(
                f"EKFAC(basis=...) takes a fitted kfac or ekfac curvature, not {type(self.basis).__name__}."
            )
        if isinstance(self.cache_bytes, bool) or not isinstance(self.cache_bytes, int) or self.cache_bytes < 0:
            raise ConfigurationError(
                f"EKFAC(cache_bytes={self.cache_bytes!r}): give a memory budget in bytes, an integer ≥ 0 (0 disables "
                f"the cache)."
            )

    def check(self, shapes: Mapping[str, LayerShape]) -> None:
        """With a ``basis``, the model's layers must be the basis's."""
        if self.basis is not None:
            self.basis.check_compatible(shapes)

    def accumulator(self, shapes: Mapping[str, LayerShape], dtype: torch.dtype) -> Accumulator:
        """The correction pass over a given ``basis`` (EK-FAC without a basis needs two passes)."""
        if not isinstance(self.basis, KFACCurvature | EKFACCurvature):
            raise ConfigurationError(
                "EK-FAC needs two passes over the data (factors, then the eigenvalue correction), which one loop "
                "cannot give: collect method='kfac' in a first loop, then hookinf.EKFAC(basis=that_curvature) in a "
                "second one — or call hookinf.fit(..., method='ekfac'), which runs both passes."
            )
        self.check(shapes)
        return _CorrectionAccumulator(self.basis, dtype)

    def fit(self, passes: Passes, shapes: Mapping[str, LayerShape], damping: Damping, dtype: torch.dtype) -> Curvature:
        """Runs the factor pass (unless ``basis`` is given) and the correction pass."""
        self.check(shapes)
        basis = self.basis
        cache = _StepCache(self.cache_bytes if basis is None else 0)
        if basis is None:
            factors = _FactorAccumulator(shapes, dtype)
            for step in passes("fit ekfac factors (pass 1/2)"):
                factors.update(step)
                cache.add(step)
            basis = factors.finish(damping)
        correction = EKFAC(basis=basis).accumulator(shapes, dtype)
        for step in cache.steps if cache.steps is not None else passes("fit ekfac correction (pass 2/2)"):
            correction.update(step)
        return correction.finish(damping)


class _StepCache:
    """The first pass's steps, kept while they fit in ``budget`` bytes (``steps`` is ``None`` once they do not)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.steps: list[Step] | None = [] if budget > 0 else None

    def add(self, step: Step) -> None:
        if self.steps is None:
            return
        self.used += sum(t.numel() * t.element_size() for c in step.layers.values() for t in (c.a, c.delta))
        if self.used > self.budget:
            self.steps = None  # over budget: free them now; the correction pass runs the model again
        else:
            self.steps.append(step)
