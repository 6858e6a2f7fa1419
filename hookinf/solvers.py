"""What preconditions the query gradients of :func:`hookinf.influence` and :func:`hookinf.self_influence`.

:func:`solver` resolves ``method=`` against a :class:`~hookinf.runner.Runner`: a fitted :class:`Curvature` (checked
against the model's layers and the compressor), a fitted method (its curvature is fitted over ``train`` now), or a
query method (DataInf, LiSSA), which comes back as :class:`Streaming` — bound to the passes over ``train`` it will
stream over when :func:`precondition` is called with the queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.curvature import Curvature, statistics_dtype
from hookinf.damping import Damping, as_damping
from hookinf.errors import ConfigurationError
from hookinf.losses import Fisher, check_fisher
from hookinf.methods import EKFAC, KFAC, Method, Preconditioned, QueryMethod, RunPass, resolve_method
from hookinf.methods.base import check_basis_compressor
from hookinf.runner import Runner
from hookinf.store import GradientStore


@dataclass(frozen=True)
class Streaming:
    """A query method bound to the training passes it streams over."""

    method: QueryMethod
    run_pass: RunPass
    damping: Damping


Solver = Curvature | Streaming
"""What :func:`precondition` applies: a fitted curvature, or a query method bound to its passes."""


def solver(
    runner: Runner,
    method: str | Method | QueryMethod | Curvature,
    train: Iterable[Any] | GradientStore,
    damping: float | Damping | None,
    dtype: torch.dtype | None,
    fisher: Fisher,
) -> Solver:
    """A fitted curvature (checked), a fit of ``method`` over ``train``, or a query method bound to ``train``.

    Args:
        runner: runs the passes (its watch is active).
        method: as :func:`hookinf.influence`'s ``method=``.
        train: the training data (or a gradient store).
        damping: the damping rule; ``None`` keeps a fitted curvature's own, or 0.1.
        dtype: the dtype statistics accumulate in (``None``: from the model).
        fisher: ``"empirical"`` or ``"sampled"`` labels for the curvature's gradients.
    """
    check_fisher(fisher, runner.loss_fn)
    if isinstance(method, Curvature):
        method.check_compressor(runner.compress)
        method.check_compatible(runner.shapes)
        return method if damping is None else method.with_damping(as_damping(damping))
    resolved = resolve_method(method)
    check_basis_compressor(resolved, runner.compress, "the basis")
    damp = as_damping(0.1 if damping is None else damping)
    resolved.check(runner.shapes)
    if isinstance(train, GradientStore) and isinstance(resolved, KFAC | EKFAC):
        raise ConfigurationError(
            f"method={resolved.name!r} needs the projected activations and output gradients, which a gradient "
            f"store does not keep (only their products). Fit it on the data with the store's compressor — "
            f"hookinf.fit(model, train_data, loss_fn, method={resolved.name!r}, compress=<the store's "
            f"compressor>) — and pass that curvature as method=; or use 'exact', 'datainf', 'lissa' or 'identity'."
        )

    def run_pass(description: str) -> Iterator[Step]:
        # sampled Fisher: every pass draws the same labels (one seeded generator per pass), so a method's passes
        # all see one set of sampled gradients — EK-FAC's correction lives in the eigenbasis of those very
        # gradients, and replaying the first pass from memory (EKFAC(cache_bytes=...)) changes nothing
        generator = torch.Generator(device="cpu").manual_seed(0) if fisher == "sampled" else None
        return runner.steps(train, description, generator)

    if isinstance(resolved, QueryMethod):
        return Streaming(resolved, run_pass, damp)
    return resolved.fit(run_pass, runner.shapes, damp, statistics_dtype(runner.params, dtype), runner.compress)


def precondition(solver: Solver, queries: dict[str, Tensor], runner: Runner) -> Preconditioned:
    """``(G_l + λ_l I)⁻¹`` (or the method's approximation) applied to ``[n, O, I]`` gradients per layer."""
    if isinstance(solver, Curvature):
        return Preconditioned({n: solver.apply(n, q) for n, q in queries.items()}, solver.lambdas)
    return solver.method.precondition(queries, solver.run_pass, runner.shapes, solver.damping)


def solver_name(solver: Solver) -> str:
    """The method's name, as reports show it."""
    return solver.method.name if isinstance(solver, Streaming) else solver.method
