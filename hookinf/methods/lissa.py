"""``lissa``: the stochastic Neumann-series recursion of Agarwal et al. 2017 (LiSSA), per layer.

For each layer and query gradient ``v`` it iterates, over mini-batches ``B_j`` of training gradients,

    r_0 = v,    r_j = v + (I − (G_{B_j} + λ_l I)/s) r_{j−1},    G_B r = (1/|B|) Σ_{i∈B} g_i (g_iᵀ r),

whose fixed point is ``s (G_l + λ_l I)⁻¹ v``; the result is ``r_J / s`` after ``J = depth`` steps (the LiSSA
baseline of Kwon et al. 2023, §4.1; Koh & Liang 2017). It converges when the scale ``s`` exceeds the largest
eigenvalue of every ``G_B + λ_l I``; the default ``s = max_i ‖g_i‖² + λ_l`` bounds it (``λ_max(G_B) ≤ max ‖g_i‖²``).
A recursion whose iterate grows without bound is reported as a :class:`~hookinf.CurvatureError`, never returned.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.damping import Damping
from hookinf.errors import ConfigurationError, CurvatureError
from hookinf.methods.base import Preconditioned, QueryMethod, RunPass, empty_train, gradient_norms
from hookinf.shapes import LayerShape

# While every step is a contraction (‖I − (G_B + λI)/s‖ ≤ 1), ‖r_j‖ ≤ (j + 1) ‖v‖; twice that proves a step that
# expands, i.e. a scale below the largest eigenvalue, and the iterate is about to blow up.
_SLACK = 2.0


@dataclass(frozen=True)
class LiSSA(QueryMethod):
    """LiSSA with explicit depth, scale and mini-batch size.

    Attributes:
        depth: recursion steps ``J`` (each reads ``batch_size`` training examples; passes repeat as needed).
        scale: ``s``; ``None`` uses the safe bound ``max_i ‖g_i‖² + λ_l`` per layer (slower to converge when the
            per-example norms vary a lot). A float applies to every layer.
        batch_size: training examples per step; ``None`` uses the data's own batches.
    """

    depth: int = 200
    scale: float | None = None
    batch_size: int | None = None
    name = "lissa"

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 1:
            raise ConfigurationError(f"LiSSA(depth={self.depth!r}) must be a positive integer.")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigurationError(f"LiSSA(scale={self.scale!r}) must be a positive number or None.")
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1
        ):
            raise ConfigurationError(f"LiSSA(batch_size={self.batch_size!r}) must be a positive integer or None.")

    def precondition(
        self,
        queries: Mapping[str, Tensor],
        run_pass: RunPass,
        shapes: Mapping[str, LayerShape],
        damping: Damping,
    ) -> Preconditioned:
        """Runs the recursion for every layer and query at once (one forward/backward per step for all layers)."""
        norms = gradient_norms(run_pass, shapes, "lissa damping and scale")
        lambdas = norms.lambdas(shapes, damping)
        scales = {name: self.scale or norms.max_sq[name] + lambdas[name] for name in shapes}
        for name, scale in scales.items():
            if not scale > 0:
                raise CurvatureError(f"layer '{name}': LiSSA's scale is {scale:.3g}; its gradients are all zero.")
        v = {name: q.double().flatten(1) for name, q in queries.items()}  # [n_query, d_l]
        r = {name: value.clone() for name, value in v.items()}
        v_norm = {name: float(value.norm()) or 1.0 for name, value in v.items()}
        for j, grads in enumerate(self._batches(run_pass), start=1):
            for name, g in grads.items():
                hvp = ((r[name] @ g.T) @ g) / g.shape[0] + lambdas[name] * r[name]  # (G_B + λI) r, [n_query, d_l]
                r[name] = v[name] + r[name] - hvp / scales[name]
                size = float(r[name].norm())
                if not math.isfinite(size) or size > _SLACK * (j + 1) * v_norm[name]:
                    raise CurvatureError(
                        f"LiSSA diverged in layer '{name}' at step {j} of {self.depth} (‖r‖ = {size:.3g}, ‖v‖ = "
                        f"{v_norm[name]:.3g}): the scale {scales[name]:.3g} is below the largest eigenvalue of the "
                        f"damped curvature. Raise LiSSA(scale=...), or leave scale=None for the safe bound."
                    )
            if j == self.depth:
                break
        out = {name: (r[name] / scales[name]).reshape(queries[name].shape) for name in r}
        return Preconditioned(out, lambdas)

    def _batches(self, run_pass: RunPass) -> Iterator[dict[str, Tensor]]:
        """Mini-batches of per-example training gradients ``{layer: [b, d_l]}``, cycling over passes."""
        buffer: dict[str, list[Tensor]] = {}
        held = 0
        round_ = 0
        while True:
            round_ += 1
            seen = 0
            for step in run_pass(f"lissa recursion (pass {round_})"):
                seen += step.batch_size
                if self.batch_size is None:
                    yield _flat(step)
                    continue
                for name, g in _flat(step).items():
                    buffer.setdefault(name, []).append(g)
                held += step.batch_size
                while held >= self.batch_size:
                    joined = {name: torch.cat(parts) for name, parts in buffer.items()}
                    yield {name: g[: self.batch_size] for name, g in joined.items()}
                    buffer = {name: [g[self.batch_size :]] for name, g in joined.items()}
                    held -= self.batch_size
            if seen == 0:
                raise empty_train()


def _flat(step: Step) -> dict[str, Tensor]:
    return {name: capture.gradients().double().flatten(1) for name, capture in step.layers.items()}
