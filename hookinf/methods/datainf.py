"""``datainf``: the closed-form inverse of Kwon et al. 2023 (DataInf), eq. (5) / Algorithm 1.

DataInf swaps the order of averaging and inversion in each layer's damped block — the inverse of the average of
rank-one matrices is replaced by the average of their inverses, each given by Sherman–Morrison:

    (G_l + λ_l I)⁻¹ ≈ (1/n) Σ_i (g_i g_iᵀ + λ_l I)⁻¹ = (1/(n λ_l)) Σ_i (I − g_i g_iᵀ / (λ_l + ‖g_i‖²)),

so a query gradient ``v`` becomes

    r_l = (1/(n λ_l)) Σ_i ( v − (vᵀ g_i)/(λ_l + ‖g_i‖²) g_i )      (Kwon et al. 2023, eq. (5))

in ``O(n d_l)`` time and ``O(d_l)`` memory per query, streaming over the training data. The approximation error
grows with ``d_l`` (their Theorem 1), so it suits small layers such as LoRA adapters. ``λ_l`` follows the relative
rule of :mod:`hookinf.damping` (their choice is ``0.1 × mean ‖g_i‖²/d_l``), which needs one extra pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hookinf.damping import Damping
from hookinf.errors import CurvatureError
from hookinf.methods.base import Preconditioned, QueryMethod, RunPass, empty_train, gradient_norms
from hookinf.shapes import LayerShape


@dataclass(frozen=True)
class DataInf(QueryMethod):
    """DataInf's closed form; no fitted state (each call streams over the training data)."""

    name = "datainf"

    def precondition(
        self,
        queries: Mapping[str, Tensor],
        run_pass: RunPass,
        shapes: Mapping[str, LayerShape],
        damping: Damping,
    ) -> Preconditioned:
        """``r_l`` of eq. (5) for every query gradient (float64): two passes (norms for ``λ_l``, then the sum)."""
        if damping.absolute is None:
            lambdas = gradient_norms(run_pass, shapes, "datainf damping (pass 1/2)").lambdas(shapes, damping)
        else:
            lambdas = dict.fromkeys(shapes, float(damping.absolute))
        for name, lam in lambdas.items():
            if not lam > 0:
                raise CurvatureError(
                    f"layer '{name}': DataInf divides by λ_l, which is {lam:.3g} ({damping}); its gradients are zero "
                    f"or the damping is 0. Use a positive damping."
                )
        flat = {name: q.double().flatten(1) for name, q in queries.items()}  # [n_query, d_l]
        sums = {name: torch.zeros_like(q) for name, q in flat.items()}
        count = 0
        for step in run_pass("datainf (pass 2/2)"):
            count += step.batch_size
            for name, capture in step.layers.items():
                grads = capture.gradients().double().flatten(1)  # [B, d_l]
                coef = (flat[name] @ grads.T) / (lambdas[name] + grads.square().sum(dim=1))  # [n_query, B]
                sums[name] += coef @ grads
        if count == 0:
            raise empty_train()
        out = {name: ((flat[name] - sums[name] / count) / lambdas[name]).reshape(queries[name].shape) for name in flat}
        return Preconditioned(out, lambdas)
