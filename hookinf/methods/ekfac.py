"""``ekfac``: K-FAC's eigenbasis with eigenvalues corrected by a second pass (George et al. 2018).

EK-FAC (Grosse et al. 2023, §2.2.3) keeps K-FAC's eigenbasis ``Q_A``, ``Q_S`` (:mod:`hookinf.methods.kfac`) and
replaces ``λ_S λ_Aᵀ`` by the exact second moments of the per-example gradients in that basis, measured in a second
pass over the data:

    Λ_{oi} = (1/n) Σ_i ((Q_Sᵀ g_i Q_A)_{oi})²,

the diagonal of the exact ``G_l`` in the Kronecker eigenbasis; ``λ_l = damping × mean(Λ) = damping × tr(G_l)/d_l``.

Index conventions: ``b`` examples, ``s`` positions, ``o`` output features, ``i`` input features.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Self

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.compress import Compressor
from hookinf.curvature import Curvature, LayerStatistics
from hookinf.damping import Damping
from hookinf.distributed import Ranks
from hookinf.errors import ConfigurationError, CurvatureError
from hookinf.linalg import einsum
from hookinf.methods.base import Accumulator, Method, RunPass, accumulate, fresh_draws, pass_ranks
from hookinf.methods.kfac import (
    Eigen,
    FactorAccumulator,
    KFACCurvature,
    KroneckerCurvature,
    check_positive,
    host_count,
)
from hookinf.shapes import LayerShape


@dataclass(frozen=True)
class EKFACStatistics(LayerStatistics):
    """K-FAC's factor sums, their eigenbasis and the corrected eigenvalue sums of one layer.

    Attributes:
        A: as :class:`KFACFactors`.
        S: as :class:`KFACFactors`.
        positions: as :class:`KFACFactors`.
        QA: eigenvectors of ``A_l`` ``[I, I]``.
        QS: eigenvectors of ``S_l`` ``[O, O]``.
        eigen: ``Σ_i ((Q_Sᵀ g_i Q_A)_{oi})²`` ``[O, I]``.
        corrected: the number of examples ``eigen`` sums over (a float64 scalar).
    """

    A: Tensor
    S: Tensor
    positions: Tensor
    QA: Tensor
    QS: Tensor
    eigen: Tensor
    corrected: Tensor

    def plus(self, other: EKFACStatistics) -> EKFACStatistics:
        """Adds the corrections of two fits in the same eigenbasis (factors and basis kept; see ``merge``)."""
        return replace(
            self,
            eigen=self.eigen + other.eigen.to(self.eigen.device),
            corrected=self.corrected + other.corrected.to(self.corrected.device),
        )


class EKFACCurvature(KroneckerCurvature):
    """K-FAC's statistics and eigenbasis plus the corrected eigenvalue sums: :class:`EKFACStatistics` per layer."""

    method = "ekfac"
    statistics_type = EKFACStatistics

    def _prepare(self, layer: str) -> Eigen:
        count = float(self.stat(layer, "corrected"))
        eigen = self.stat(layer, "eigen").to(torch.float64) / max(count, 1.0)
        if not bool(torch.isfinite(eigen).all()):
            raise CurvatureError(f"layer '{layer}': EK-FAC's corrected eigenvalues hold NaN or infinity.")
        lam = self.damping.value(float(eigen.mean()))
        check_positive(layer, eigen, lam, self.damping)
        q_a = self.stat(layer, "QA").to(torch.float64)
        q_s = self.stat(layer, "QS").to(torch.float64)
        return self._cast(layer, Eigen(q_a, q_s, eigen, lam))

    def merge(self, other: Curvature) -> Self:
        """Adds the eigenvalue corrections of two fits made on the same K-FAC basis (e.g. shards of the data).

        EK-FAC fits merge only when both ran their correction pass on the same factors and eigenbasis
        (``hookinf.EKFAC(basis=merged_kfac)``): the factors are kept, the corrections and their counts add.
        """
        if not isinstance(other, EKFACCurvature) or other.layers != self.layers:
            return super().merge(other)  # raises the generic error
        self._check_mergeable(other)
        for name in self.layers:
            for key in ("A", "S", "positions", "QA", "QS"):
                mine = self.stat(name, key)
                if not torch.equal(mine, other.stat(name, key).to(mine.device)):
                    raise CurvatureError(
                        f"cannot merge EK-FAC fits of layer '{name}': they were corrected in different eigenbases "
                        f"(each fit computed its own). Merge the K-FAC factors instead — fit(..., method='kfac') per "
                        f"shard, then merge — and run the correction pass of every shard on the merged basis: "
                        f"fit(..., method=hookinf.EKFAC(basis=merged_kfac)); those fits merge."
                    )
        state = {name: stats.plus(other.state[name]) for name, stats in self.state.items()}
        return type(self)(self.layers, self.damping, self.num_examples, state, self.compressor)


class _CorrectionAccumulator(Accumulator):
    """Sums ``(Q_Sᵀ g_b Q_A)²`` per layer in a fixed eigenbasis (EK-FAC's second pass)."""

    def __init__(
        self,
        basis: KFACCurvature | EKFACCurvature,
        dtype: torch.dtype,
        rotations: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        super().__init__(basis.compressor)
        self.basis = basis
        self.shapes = dict(basis.layers)
        self.dtype = dtype
        self.rotations: dict[str, tuple[Tensor, Tensor]] = {}  # (Q_A, Q_S) where the basis is
        converted: dict[int, tuple[Tensor, Tensor]] = {}  # source → copy, once per basis layers share (q, k, v)
        for name in self.shapes:
            q_a, q_s = rotations[name] if rotations is not None else _rotation(basis, name)
            if id(q_a) not in converted:  # the source is kept alive with its copy, so its id stays its own
                # contiguous, as they will be when loaded from disk: the same layout gives bit-identical products
                converted[id(q_a)] = (q_a, q_a.to(dtype).contiguous())
            self.rotations[name] = (converted[id(q_a)][1], q_s.to(dtype).contiguous())
        self.placed: dict[str, tuple[Tensor, Tensor]] = {}  # the rotations on the device of the layer's captures
        self._moved: dict[tuple[int, torch.device], Tensor] = {}  # a shared Q_A moved to a device once
        self.eigen: dict[str, Tensor] = {}

    def _update(self, step: Step) -> None:
        rotated: dict[tuple[int, int], Tensor] = {}  # a Q_A per (activations, basis): once for layers sharing both
        for name, capture in step.layers.items():
            if name not in self.placed:  # the layer's first step: its device is known
                q_a, q_s = self.rotations[name]  # kept in self.rotations: their ids stay theirs
                device = capture.a.device
                if (id(q_a), device) not in self._moved:
                    self._moved[(id(q_a), device)] = q_a.to(device)
                self.placed[name] = (self._moved[(id(q_a), device)], q_s.to(device))
            q_a, q_s = self.placed[name]
            key = (id(capture.a), id(q_a))
            if key not in rotated:
                rotated[key] = capture.a.to(self.dtype) @ q_a  # [B, S, I] in A's eigenbasis
            a = rotated[key]
            d = capture.delta.to(self.dtype) @ q_s  # [B, S, O] in S's eigenbasis
            if name not in self.eigen:
                self.eigen[name] = a.new_zeros(d.shape[2], a.shape[2])
            squared_gradient_sum(a, d, out=self.eigen[name])

    def _sums(self, device: torch.device) -> list[Tensor]:
        for name, shape in self.shapes.items():
            if name not in self.eigen:  # a layer no step of this rank reached: its sum is zero
                self.eigen[name] = torch.zeros(shape.out_features, shape.in_features, dtype=self.dtype, device=device)
        return [self.eigen[name] for name in self.shapes]

    def finish(self, damping: Damping) -> EKFACCurvature:
        """The EK-FAC curvature: the basis's factors, the rotations and the corrected eigenvalue sums."""
        self._require_data()
        state = {
            name: EKFACStatistics(
                A=self.basis.stat(name, "A"),
                S=self.basis.stat(name, "S"),
                positions=self.basis.stat(name, "positions"),
                QA=self.placed.get(name, self.rotations[name])[0],
                QS=self.placed.get(name, self.rotations[name])[1],
                eigen=eigen.clone(),
                corrected=host_count(self.count),
            )
            for name, eigen in self.eigen.items()
        }
        return EKFACCurvature(self.shapes, damping, self.basis.num_examples, state, self.compressor)


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
            passes. Results are identical either way. With ``fisher="sampled"`` the cache is not used (the model
            runs twice): each pass draws fresh labels, and correcting the eigenvalues with the very draws that
            fitted the eigenbasis overfits the correction to them.
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

    def accumulator(
        self, shapes: Mapping[str, LayerShape], dtype: torch.dtype, compressor: Compressor | None = None
    ) -> Accumulator:
        """The correction pass over a given ``basis`` (EK-FAC without a basis needs two passes).

        The curvature records the basis's compressor; ``compressor`` must be that one.
        """
        if not isinstance(self.basis, KFACCurvature | EKFACCurvature):
            raise ConfigurationError(
                "EK-FAC needs two passes over the data (factors, then the eigenvalue correction), which one loop "
                "cannot give: collect method='kfac' in a first loop, then hookinf.EKFAC(basis=that_curvature) in a "
                "second one — or call hookinf.fit(..., method='ekfac'), which runs both passes."
            )
        self.check(shapes)
        self.basis.check_compressor(compressor, "the basis")
        return _CorrectionAccumulator(self.basis, dtype)

    def fit(
        self,
        run_pass: RunPass,
        shapes: Mapping[str, LayerShape],
        damping: Damping,
        dtype: torch.dtype,
        compressor: Compressor | None = None,
    ) -> Curvature:
        """Runs the factor pass (unless ``basis`` is given) and the correction pass.

        The first pass's steps are replayed for the correction within ``cache_bytes``, unless the passes draw fresh
        labels (:func:`~hookinf.methods.base.fresh_draws`): then the correction pass runs the model on new draws.
        """
        self.check(shapes)
        ranks = pass_ranks(run_pass)
        basis: KFACCurvature | EKFACCurvature | None = self.basis  # type: ignore[assignment]  # __post_init__ checked
        cache = _StepCache(self.cache_bytes if basis is None and not fresh_draws(run_pass) else 0)
        if basis is None:
            factors = FactorAccumulator(shapes, dtype, compressor)
            accumulate(factors, cache.keeping(run_pass("fit ekfac factors (pass 1/2)")), ranks, "the K-FAC factors")
            basis = factors.finish(damping)
        basis.check_compressor(compressor, "the basis")
        rotations = shared_rotations(basis, ranks) if ranks is not None else None
        correction = _CorrectionAccumulator(basis, dtype, rotations)
        steps = cache.steps if cache.steps is not None else run_pass("fit ekfac correction (pass 2/2)")
        accumulate(correction, steps, ranks, "EK-FAC's eigenvalue corrections")
        return correction.finish(damping)


def _rotation(basis: KFACCurvature | EKFACCurvature, name: str) -> tuple[Tensor, Tensor]:
    """``(Q_A, Q_S)`` of one layer: stored in an EK-FAC basis, from the factors' eigendecompositions in a K-FAC one."""
    stats = basis.state[name]
    if isinstance(stats, EKFACStatistics):
        return stats.QA, stats.QS
    _, q_a, _, q_s = basis.eigenbasis(name)  # type: ignore[union-attr]  # a KFACCurvature here
    return q_a, q_s


def shared_rotations(basis: KFACCurvature | EKFACCurvature, ranks: Ranks) -> dict[str, tuple[Tensor, Tensor]]:
    """Every layer's ``(Q_A, Q_S)``, bit-identical on every rank: each decomposed on one rank, then summed into place.

    The layers are dealt to the ranks in turn (layer ``k`` to rank ``k mod size``), so the eigendecompositions run
    in parallel; each rank fills the layers it owns and zeros elsewhere, and one all-reduce (sums with zeros are
    exact) gives every rank the owner's bits. A decomposition that fails is sent as NaN, so every rank raises the
    layer's :class:`~hookinf.errors.CurvatureError`. An EK-FAC basis already holds its rotations: no collective.
    """
    if isinstance(basis, EKFACCurvature):
        return {name: _rotation(basis, name) for name in basis.layers}
    rotations: dict[str, tuple[Tensor, Tensor]] = {}
    failures: dict[str, CurvatureError] = {}
    for k, (name, shape) in enumerate(basis.layers.items()):
        dtype, device = basis.compute_dtype(name), basis.stat(name, "A").device
        q_a = torch.zeros(shape.in_features, shape.in_features, dtype=dtype, device=device)
        q_s = torch.zeros(shape.out_features, shape.out_features, dtype=dtype, device=device)
        if k % ranks.size == ranks.rank:
            try:
                owned = _rotation(basis, name)
                q_a.copy_(owned[0])
                q_s.copy_(owned[1])
            except CurvatureError as err:
                failures[name] = err
                q_a.fill_(math.nan)
        rotations[name] = (q_a, q_s)
    ranks.all_reduce([q for pair in rotations.values() for q in pair], [], failed=False, what="sharing the eigenbases")
    for name, (q_a, _) in rotations.items():
        if name in failures:
            raise failures[name]
        if not bool(torch.isfinite(q_a).all()):
            owner = list(basis.layers).index(name) % ranks.size
            raise CurvatureError(f"layer '{name}': its eigendecomposition failed on rank {owner} (see its error).")
    return rotations


class _StepCache:
    """The first pass's steps, kept while they fit in ``budget`` bytes (``steps`` is ``None`` once they do not)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.steps: list[Step] | None = [] if budget > 0 else None

    def keeping(self, steps: Iterable[Step]) -> Iterator[Step]:
        """Yields ``steps``, keeping each (within the budget)."""
        for step in steps:
            self.add(step)
            yield step

    def add(self, step: Step) -> None:
        if self.steps is None:
            return
        held = {id(t): t for c in step.layers.values() for t in (c.a, c.delta)}  # activations shared by layers once
        self.used += sum(t.numel() * t.element_size() for t in held.values())
        if self.used > self.budget:
            self.steps = None  # over budget: free them now; the correction pass runs the model again
        else:
            self.steps.append(step)
