"""``exact``: each layer's damped Gauss-Newton block built explicitly and inverted (Cholesky).

``G_l = (1/n) Σ_i vec(g_l(z_i)) vec(g_l(z_i))ᵀ`` over the training set (the empirical Fisher / Gauss-Newton
block of Kwon et al. 2023, eq. (2) with the block-diagonal approximation of §3), damped with ``λ_l`` from
:mod:`hookinf.damping`. The fit streams over training steps holding only the ``d_l × d_l`` sums, so its memory is
``Σ_l d_l²`` numbers whatever the number of examples; layers with ``d_l > max_dim`` are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.compress import Compressor
from hookinf.curvature import Curvature, LayerStatistics
from hookinf.damping import Damping
from hookinf.errors import ConfigurationError, CurvatureError
from hookinf.methods.base import Accumulator, Method
from hookinf.shapes import LayerShape


@dataclass(frozen=True)
class _Factored:
    chol: Tensor
    lam: float


@dataclass(frozen=True)
class ExactStatistics(LayerStatistics):
    """One layer's sum of gradient outer products.

    Attributes:
        gram: ``Σ_i vec(g_i) vec(g_i)ᵀ`` ``[d, d]``.
    """

    gram: Tensor


class ExactCurvature(Curvature):
    """Statistics per layer: :class:`ExactStatistics`."""

    method = "exact"
    statistics_type = ExactStatistics

    def _prepare(self, layer: str) -> _Factored:
        block = self.stat(layer, "gram").to(torch.float64) / max(self.num_examples, 1)
        if not bool(torch.isfinite(block).all()):
            raise CurvatureError(f"layer '{layer}': the exact Gauss-Newton block holds NaN or infinity.")
        dim = block.shape[0]
        lam = self.damping.value(float(torch.trace(block)) / dim)
        damped = block + lam * torch.eye(dim, dtype=torch.float64, device=block.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        # Cholesky can "succeed" on a singular block through a rounding-sized pivot, so also refuse pivots below
        # numpy.linalg.matrix_rank's tolerance, and λ ≈ 0 when rank(G_l) ≤ n < d_l is certain.
        tol = dim * torch.finfo(torch.float64).eps * float(damped.diagonal().max())
        tiny_pivot = int(info) == 0 and float(chol.diagonal().min()) ** 2 <= tol
        if int(info) != 0 or tiny_pivot or (self.num_examples < dim and lam <= tol):
            raise CurvatureError(
                f"layer '{layer}': the damped Gauss-Newton block G + λI (λ={lam:.3g}, {self.damping}) is not "
                f"positive definite, so it cannot be inverted; its gradients are (nearly) zero or the damping is 0. "
                f"Use a positive damping (e.g. damping=0.1 or hookinf.Damping(absolute=1e-3))."
            )
        return _Factored(chol, lam)

    def _apply(self, prepared: _Factored, grads: Tensor) -> Tensor:
        flat = grads.reshape(grads.shape[0], -1)
        return torch.cholesky_solve(flat.T, prepared.chol).T.reshape(grads.shape)

    def _lambda(self, prepared: _Factored) -> float:
        return prepared.lam

    def _eigen_range(self, layer: str) -> tuple[float, float]:
        eigen = torch.linalg.eigvalsh(self.stat(layer, "gram").to(torch.float64) / max(self.num_examples, 1))
        return float(eigen[0]), float(eigen[-1])


@dataclass(frozen=True)
class Exact(Method):
    """Explicit damped blocks; exact for the block-diagonal Gauss-Newton approximation.

    Attributes:
        max_dim: the largest layer (``d_l = O × I`` parameters) accepted; its block takes ``8 d_l²`` bytes
            (the default 8192 → 512 MiB) and ``O(d_l³)`` time to factor.
    """

    max_dim: int = 8192
    name = "exact"

    def __post_init__(self) -> None:
        if not isinstance(self.max_dim, int) or self.max_dim < 1:
            raise ConfigurationError(f"Exact(max_dim={self.max_dim!r}) must be a positive integer.")

    def check(self, shapes: Mapping[str, LayerShape]) -> None:
        """Refuses layers with more than ``max_dim`` parameters before any data is read."""
        for name, shape in shapes.items():
            if shape.dim > self.max_dim:
                gib = 8 * shape.dim**2 / 2**30
                raise CurvatureError(
                    f"layer '{name}' has d={shape.dim} parameters ({shape.out_features}×{shape.in_features}); its "
                    f"exact Gauss-Newton block would take {gib:.1f} GiB and O(d³) time (limit: "
                    f"Exact(max_dim={self.max_dim})). Use method='ekfac' or 'kfac' (or 'identity'), exclude the "
                    f"layer with modules=[...], or raise max_dim."
                )

    def accumulator(
        self, shapes: Mapping[str, LayerShape], dtype: torch.dtype, compressor: Compressor | None = None
    ) -> Accumulator:
        """Accumulates ``Σ_i vec(g_i) vec(g_i)ᵀ`` per layer."""
        self.check(shapes)
        return _GramAccumulator(shapes, dtype, compressor)


class _GramAccumulator(Accumulator):
    """Sums ``vec(g) vec(g)ᵀ`` per layer, on the layer's own device (allocated at its first step)."""

    def __init__(self, shapes: Mapping[str, LayerShape], dtype: torch.dtype, compressor: Compressor | None) -> None:
        super().__init__(compressor)
        self.shapes = dict(shapes)
        self.dtype = dtype
        self.grams: dict[str, Tensor] = {}

    def _update(self, step: Step) -> None:
        for name, capture in step.layers.items():
            flat = capture.gradients().reshape(step.batch_size, -1).to(self.dtype)
            gram = self.grams.get(name)
            if gram is None:
                gram = self.grams[name] = flat.new_zeros(flat.shape[1], flat.shape[1])
            gram.addmm_(flat.T, flat)

    def _sums(self, device: torch.device) -> list[Tensor]:
        for name, shape in self.shapes.items():
            if name not in self.grams:  # a layer no step of this rank reached: its sum is zero
                self.grams[name] = torch.zeros(shape.dim, shape.dim, dtype=self.dtype, device=device)
        return [self.grams[name] for name in self.shapes]

    def finish(self, damping: Damping) -> Curvature:
        self._require_data()
        state = {name: ExactStatistics(gram.clone()) for name, gram in self.grams.items()}
        return ExactCurvature(self.shapes, damping, self.count, state, self.compressor)
