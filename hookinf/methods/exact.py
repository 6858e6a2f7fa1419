"""``exact``: each layer's damped Gauss-Newton block built explicitly and inverted (Cholesky).

``G_l = (1/n) Σ_i vec(g_l(z_i)) vec(g_l(z_i))ᵀ`` over the training set (the empirical Fisher / Gauss-Newton
block of Kwon et al. 2023, eq. (2) with the block-diagonal approximation of §3), damped with ``λ_l`` from
:mod:`hookinf.damping`. The fit streams over training steps holding only the ``d_l × d_l`` blocks (float64), so its
memory is ``8 Σ_l d_l²`` bytes whatever the number of examples; layers with ``d_l > max_dim`` are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.damping import Damping
from hookinf.errors import ConfigurationError, CurvatureError, DataError
from hookinf.layers.base import LayerAdapter
from hookinf.methods.base import Method, Preconditioner


class ExactPreconditioner(Preconditioner):
    """``(G_l + λ_l I)⁻¹`` through the Cholesky factor of each damped block.

    Args:
        factors: layer → lower Cholesky factor ``[d, d]`` of ``G_l + λ_l I`` (float64).
        damping: layer → ``λ_l``.
        num_examples: ``n``.
    """

    def __init__(self, factors: dict[str, Tensor], damping: dict[str, float], num_examples: int) -> None:
        self._factors = factors
        self.damping = damping
        self.num_examples = num_examples

    def apply(self, layer: str, grads: Tensor) -> Tensor:
        """Solves ``(G_l + λ_l I) x = vec(g)`` for each of the ``N`` gradients ``[N, O, I]``."""
        chol = self._factors[layer]
        flat = grads.reshape(grads.shape[0], -1).to(dtype=torch.float64, device=chol.device)
        return torch.cholesky_solve(flat.T, chol).T.reshape(grads.shape)


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

    def check(self, adapters: Mapping[str, LayerAdapter]) -> None:
        """Refuses layers with more than ``max_dim`` parameters before any data is read."""
        for name, adapter in adapters.items():
            if adapter.dim > self.max_dim:
                gib = 8 * adapter.dim**2 / 2**30
                raise CurvatureError(
                    f"layer '{name}' has d={adapter.dim} parameters ({adapter.shape[0]}×{adapter.shape[1]}); its "
                    f"exact Gauss-Newton block would take {gib:.1f} GiB and O(d³) time (limit: "
                    f"Exact(max_dim={self.max_dim})). Use method='identity' (or K-FAC/EK-FAC/DataInf once fitted "
                    f"curvature is available), exclude the layer with modules=[...], or raise max_dim."
                )

    def fit(self, steps: Iterable[Step], adapters: Mapping[str, LayerAdapter], damping: Damping) -> Preconditioner:
        """Accumulates ``Σ_i vec(g_i) vec(g_i)ᵀ`` per layer over the steps, then damps and factors each block."""
        self.check(adapters)
        grams: dict[str, Tensor] = {}
        count = 0
        for step in steps:
            count += step.batch_size
            for name, capture in step.layers.items():
                flat = capture.gradients().reshape(step.batch_size, -1).double()
                gram = flat.T @ flat
                grams[name] = grams[name] + gram if name in grams else gram
        if count == 0:
            raise DataError("train is empty: pass at least one batch of training examples.")
        factors: dict[str, Tensor] = {}
        lambdas: dict[str, float] = {}
        for name, gram in grams.items():
            block = gram / count
            dim = block.shape[0]
            lam = damping.value(float(torch.trace(block)) / dim)
            lambdas[name] = lam
            block.diagonal().add_(lam)
            chol, info = torch.linalg.cholesky_ex(block)
            # Cholesky can "succeed" on a singular block through a rounding-sized pivot, so also refuse pivots
            # below numpy.linalg.matrix_rank's tolerance, and λ ≈ 0 when rank(G_l) ≤ n < d_l is certain.
            tol = dim * torch.finfo(block.dtype).eps * float(block.diagonal().max())
            tiny_pivot = int(info) == 0 and float(chol.diagonal().min()) ** 2 <= tol
            if int(info) != 0 or tiny_pivot or (count < dim and lam <= tol):
                raise CurvatureError(
                    f"layer '{name}': the damped Gauss-Newton block G + λI (λ={lam:.3g}, {damping}) is not positive "
                    f"definite, so it cannot be inverted; its gradients are (nearly) zero or the damping is 0. "
                    f"Use a positive damping (e.g. damping=0.1 or hookinf.Damping(absolute=1e-3))."
                )
            factors[name] = chol
        return ExactPreconditioner(factors, lambdas, count)
