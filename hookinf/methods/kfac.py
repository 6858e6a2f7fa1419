"""``kfac``: Kronecker-factored curvature (its eigenvalue correction, EK-FAC, is :mod:`hookinf.methods.ekfac`).

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
from functools import cached_property

import torch
from torch import Tensor

from hookinf.capture import Step, shared_activations
from hookinf.compress import Compressor
from hookinf.curvature import Curvature, LayerStatistics
from hookinf.damping import Damping
from hookinf.errors import CurvatureError
from hookinf.methods.base import Accumulator, Method
from hookinf.shapes import LayerShape


@dataclass(frozen=True)
class Eigen:
    """A layer's Kronecker eigenbasis, its eigenvalues per ``(o, i)`` direction and ``λ_l``, ready to apply."""

    q_a: Tensor  # [I, I]
    q_s: Tensor  # [O, O]
    eigen: Tensor  # [O, I] (K-FAC: λ_S λ_Aᵀ; EK-FAC: corrected)
    lam: float


def _eigh(matrix: Tensor, layer: str, what: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at zero) and eigenvectors of a symmetric factor, in ``matrix``'s dtype and device.

    A float32 decomposition that does not converge is redone in float64 (and cast back).
    """
    if not bool(torch.isfinite(matrix).all()):
        raise CurvatureError(
            f"layer '{layer}': the {what} factor holds NaN or infinity (non-finite activations or gradients in the "
            f"fit pass); check the data and the loss."
        )
    symmetric = (matrix + matrix.T) / 2
    try:
        values, vectors = torch.linalg.eigh(symmetric)
    except RuntimeError as err:  # LAPACK failed to converge
        if matrix.dtype == torch.float64:
            raise CurvatureError(f"layer '{layer}': eigendecomposition of the {what} factor failed ({err}).") from err
        # float32's syevd can fail to converge on an ill-conditioned factor where float64's does not: retry there
        values, vectors = _eigh(matrix.to(torch.float64), layer, what)
        return values.to(matrix.dtype), vectors.to(matrix.dtype)
    return values.clamp_min(0.0), vectors


def _precondition(prepared: Eigen, grads: Tensor) -> Tensor:
    rotated = prepared.q_s.T @ grads @ prepared.q_a  # [N, O, I] in the eigenbasis
    rotated = rotated / (prepared.eigen + prepared.lam)
    return prepared.q_s @ rotated @ prepared.q_a.T


def check_positive(layer: str, eigen: Tensor, lam: float, damping: Damping) -> None:
    """Refuses a damped Kronecker eigenvalue at (rounding-)zero: the curvature could not be inverted."""
    # Rounding turns an exact zero direction (e.g. the last layer under cross-entropy, whose output gradients sum to
    # zero over classes) into ±1e-20, so refuse damped eigenvalues below numpy.linalg.matrix_rank's tolerance.
    damped = eigen + lam
    tol = eigen.numel() * torch.finfo(torch.float64).eps * float(damped.max())
    if float(damped.min()) <= tol:
        raise CurvatureError(
            f"layer '{layer}': the damped curvature has a zero eigenvalue (λ={lam:.3g}, {damping}), so it cannot be "
            f"inverted. Use a positive damping (e.g. damping=0.1 or hookinf.Damping(absolute=1e-3))."
        )


class KroneckerCurvature(Curvature):
    """Shared by K-FAC and EK-FAC: a Kronecker eigenbasis with one eigenvalue per ``(o, i)`` direction.

    Eigendecompositions and the preconditioner (two GEMMs per query and layer) run in the statistics' dtype —
    float32 for a float32 model, as its gradients carry no more precision — which halves the cost of fitting and of
    scoring large layers; float64 statistics keep float64 throughout.
    """

    def compute_dtype(self, layer: str) -> torch.dtype:
        """float64 for float64 statistics, float32 for float32 ones."""
        return self.stat(layer, "A").dtype

    def _cast(self, layer: str, prepared: Eigen) -> Eigen:
        dtype = self.compute_dtype(layer)
        return Eigen(prepared.q_a.to(dtype), prepared.q_s.to(dtype), prepared.eigen.to(dtype), prepared.lam)

    def _apply(self, prepared: Eigen, grads: Tensor) -> Tensor:
        return _precondition(prepared, grads)

    def _lambda(self, prepared: Eigen) -> float:
        return prepared.lam

    def _eigen_range(self, layer: str) -> tuple[float, float]:
        eigen = self._prepared(layer).eigen
        return float(eigen.min()), float(eigen.max())


@dataclass(frozen=True)
class KFACFactors(LayerStatistics):
    """One layer's Kronecker factor sums.

    Attributes:
        A: ``Σ_{i,t} a aᵀ`` ``[I, I]``.
        S: ``Σ_{i,t} δ δᵀ`` ``[O, O]``.
        positions: ``T``, the number of positions summed over (a float64 scalar).
    """

    A: Tensor
    S: Tensor
    positions: Tensor


class KFACCurvature(KroneckerCurvature):
    """Statistics per layer: :class:`KFACFactors`."""

    method = "kfac"
    statistics_type = KFACFactors

    @cached_property
    def _decomposed(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``(λ_A, Q_A)`` of each layer decomposed so far (see :meth:`eigenbasis`)."""
        return {}

    @cached_property
    def _fingerprints(self) -> dict[tuple[object, ...], list[str]]:
        """The decomposed layers by their activation factor's fingerprint (see :meth:`_activation_twin`)."""
        return {}

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(A_l, S_l)`` as defined in the module docstring, float64."""
        positions = float(self.stat(layer, "positions"))
        a = self.stat(layer, "A").to(torch.float64) / max(positions, 1.0)
        s = self.stat(layer, "S").to(torch.float64) / max(self.num_examples, 1)
        return a, s

    def eigenbasis(self, layer: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(λ_A, Q_A, λ_S, Q_S)`` of the layer's factors, on their device, in the statistics' dtype.

        Float64 statistics are decomposed in float64; float32 ones (a float32 model's) in float32, whose rounding
        (about ``10⁻⁷`` of the largest eigenvalue) is far below the damping that every preconditioner adds — and
        EK-FAC measures its eigenvalues in whatever basis this gives — at about half the cost of float64
        (``benchmarks/ekfac_breakdown.py``).
        """
        a, s = self.factors(layer)
        dtype = self.compute_dtype(layer)
        key, twin = self._activation_twin(layer)
        if twin is None:
            lam_a, q_a = _eigh(a.to(dtype), layer, "activation (A)")
            self._decomposed[layer] = (lam_a, q_a)
            self._fingerprints.setdefault(key, []).append(layer)
        else:  # this layer again, or one reading the same input (q, k, v): decomposed once, the same tensors
            lam_a, q_a = self._decomposed[twin]
        lam_s, q_s = _eigh(s.to(dtype), layer, "output-gradient (S)")
        return lam_a, q_a, lam_s, q_s

    def _activation_twin(self, layer: str) -> tuple[tuple[object, ...], str | None]:
        """The fingerprint of ``layer``'s activation factor, and a decomposed layer whose factor equals it, if any.

        That layer has the same factor sum and positions bit for bit (it may be ``layer`` itself): layers that read
        one input accumulate bit-identical sums (:class:`FactorAccumulator`). The fingerprint (shape, dtype, device,
        the factor's sum and positions: host reads at decomposition time only) narrows the candidates before the
        exact comparison.
        """
        mine, positions = self.stat(layer, "A"), self.stat(layer, "positions")
        key = (tuple(mine.shape), mine.dtype, mine.device, float(mine.sum()), float(positions))
        candidates = self._fingerprints.get(key, [])
        return key, next((other for other in candidates if torch.equal(self.stat(other, "A"), mine)), None)

    def _prepare(self, layer: str) -> Eigen:
        lam_a, q_a, lam_s, q_s = self.eigenbasis(layer)
        lam_a, lam_s = lam_a.to(torch.float64), lam_s.to(torch.float64)
        eigen = lam_s[:, None] * lam_a[None, :]
        lam = self.damping.value(float(lam_s.mean()) * float(lam_a.mean()))
        check_positive(layer, eigen, lam, self.damping)
        return self._cast(layer, Eigen(q_a, q_s, eigen, lam))


class FactorAccumulator(Accumulator):
    """Sums ``Σ a aᵀ`` and ``Σ δ δᵀ`` per layer on the layer's own device (lower triangles, mirrored by ``finish``).

    The sums are allocated at a layer's first step, on the device its captures come from; position counts are kept
    on the host (python integers), so an update makes no device-to-host read.
    """

    def __init__(self, shapes: Mapping[str, LayerShape], dtype: torch.dtype, compressor: Compressor | None) -> None:
        super().__init__(compressor)
        self.shapes = dict(shapes)
        self.dtype = dtype
        self.sums: dict[str, tuple[Tensor, Tensor]] = {}
        self.positions = dict.fromkeys(shapes, 0)

    def _update(self, step: Step) -> None:
        readers = shared_activations(step)
        grams: dict[int, Tensor] = {}  # this step's Σ aᵀa of activations several layers share, formed once
        for name, capture in step.layers.items():
            a = capture.a.reshape(-1, capture.a.shape[-1]).to(self.dtype)  # [B·S, I]
            d = capture.delta.reshape(-1, capture.delta.shape[-1]).to(self.dtype)  # [B·S, O]
            if name not in self.sums:
                self.sums[name] = (a.new_zeros(a.shape[1], a.shape[1]), d.new_zeros(d.shape[1], d.shape[1]))
            a_sum, s_sum = self.sums[name]
            if readers[id(capture.a)] > 1:
                if id(capture.a) not in grams:
                    grams[id(capture.a)] = a.new_zeros(a.shape[1], a.shape[1])
                    _add_lower_gram(grams[id(capture.a)], a)
                a_sum += grams[id(capture.a)]  # the same additions for every reader: bit-identical sums
            else:
                _add_lower_gram(a_sum, a)
            _add_lower_gram(s_sum, d)
            self.positions[name] += a.shape[0]

    def _sums(self, device: torch.device) -> list[Tensor]:
        for name, shape in self.shapes.items():
            if name not in self.sums:
                zeros = torch.zeros  # a layer no step of this rank reached: its sums are zero
                i, o = shape.in_features, shape.out_features
                self.sums[name] = (
                    zeros(i, i, dtype=self.dtype, device=device),
                    zeros(o, o, dtype=self.dtype, device=device),
                )
        return [tensor for name in self.shapes for tensor in self.sums[name]]

    def _counts(self) -> list[int]:
        return [self.count, *self.positions.values()]

    def _set_counts(self, counts: list[int]) -> None:
        self.count = counts[0]
        self.positions = dict(zip(self.positions, counts[1:], strict=True))

    def finish(self, damping: Damping) -> KFACCurvature:
        """The K-FAC curvature of the factor sums so far."""
        self._require_data()
        state = {
            name: KFACFactors(_mirror_lower(a_sum), _mirror_lower(s_sum), host_count(self.positions[name]))
            for name, (a_sum, s_sum) in self.sums.items()
        }
        return KFACCurvature(self.shapes, damping, self.count, state, self.compressor)


def host_count(count: int) -> Tensor:
    """A count as the float64 scalar tensor statistics files hold, on the host."""
    return torch.tensor(float(count), dtype=torch.float64, device="cpu")


_BLOCKED_GRAM_MIN = 256  # below this many features one full product is as fast


def _add_lower_gram(total: Tensor, x: Tensor) -> None:
    """``total += xᵀx`` for ``x [N, D]``, on and below the diagonal only (:func:`_mirror_lower` completes it).

    A symmetric product needs only one triangle (torch has no ``syrk``): splitting the features in halves, the block
    below the diagonal is one GEMM and the two diagonal blocks are the same problem at half the size, so recursing
    down to blocks of fewer than :data:`_BLOCKED_GRAM_MIN` features costs ``(1 + 2⁻ᵏ)/2`` of one full GEMM after
    ``k`` halvings (0.56 for ``D = 1024``; measured 5.7 ms against 12.3 ms for the full product and 8.2 ms for one
    halving, ``N = 256``, 2 threads). The blocks above the diagonal stay untouched.
    """
    d = x.shape[1]
    if d < _BLOCKED_GRAM_MIN:
        total.addmm_(x.T, x)
        return
    h = d // 2
    low, high = x[:, :h], x[:, h:]
    _add_lower_gram(total[:h, :h], low)
    total[h:, :h].addmm_(high.T, low)
    _add_lower_gram(total[h:, h:], high)


def _mirror_lower(total: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is ``total``'s (a new tensor)."""
    return torch.tril(total) + torch.tril(total, diagonal=-1).T


@dataclass(frozen=True)
class KFAC(Method):
    """K-FAC: one pass accumulating the Kronecker factors ``A_l`` and ``S_l``."""

    name = "kfac"

    def accumulator(
        self, shapes: Mapping[str, LayerShape], dtype: torch.dtype, compressor: Compressor | None = None
    ) -> Accumulator:
        """Accumulates the factors."""
        return FactorAccumulator(shapes, dtype, compressor)
