"""What preconditions the query gradients of :func:`hookinf.influence` and :func:`hookinf.self_influence`.

:func:`solver` resolves ``method=`` against a :class:`~hookinf.runner.Runner`: a fitted :class:`Curvature` (checked
against the model's layers and the compressor), a fitted method (its curvature is fitted over ``train`` now), or a
query method (DataInf, LiSSA), which comes back as :class:`Streaming` — bound to the passes over ``train`` it will
stream over when :func:`precondition` is called with the queries.

The passes over ``train`` are run by :class:`TrainPasses`; with ``fisher="sampled"``, pass ``k`` draws its labels from
``Sampler.for_pass(seed, k)`` (:mod:`hookinf.losses`), so every pass draws fresh labels and a fit is reproducible
for its seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.curvature import Curvature, statistics_dtype
from hookinf.damping import Damping, as_damping, default_damping
from hookinf.distributed import Ranks
from hookinf.errors import ConfigurationError
from hookinf.losses import Fisher, Sampler, check_fisher
from hookinf.methods import EKFAC, KFAC, Method, Preconditioned, QueryMethod, resolve_method
from hookinf.methods.base import check_basis_compressor
from hookinf.runner import Runner
from hookinf.store import GradientStore


@dataclass
class TrainPasses:
    """``run_pass(description)`` over the training data (a :data:`~hookinf.methods.RunPass`), counting its passes.

    With ``sampled``, pass ``k`` (counted from 0 by this object) draws labels from ``Sampler.for_pass(seed, k)``:
    each pass draws fresh labels, and the same passes in the same order draw the same labels (on rank ``r`` of a
    distributed fit, from ``Sampler.for_pass(seed, k, r)``: each rank its own). ``fresh_draws`` tells
    a method that a pass must not be replayed from memory in place of running the next one
    (:func:`hookinf.methods.base.fresh_draws`).

    Attributes:
        runner: runs the passes (its watch is active).
        train: the training data (or a gradient store).
        sampled: whether the losses are taken at labels drawn from the model (``fisher="sampled"``).
        seed: the fit's seed.
        count: the passes run so far.
    """

    runner: Runner
    train: Iterable[Any] | GradientStore
    sampled: bool
    seed: int
    count: int = field(default=0, init=False)

    @property
    def fresh_draws(self) -> bool:
        """Whether each pass draws new labels (``fisher="sampled"``)."""
        return self.sampled

    @property
    def ranks(self) -> Ranks | None:
        """The ranks whose shards the passes are parts of (the runner's), or ``None``."""
        return self.runner.ranks

    def __call__(self, description: str) -> Iterator[Step]:
        """Runs the next pass over ``train``, labelled ``description`` in the progress bar."""
        rank = self.ranks.rank if self.ranks is not None else 0
        sampler = Sampler.for_pass(self.seed, self.count, rank) if self.sampled else None
        self.count += 1
        return self.runner.steps(self.train, description, sampler)

    def restarted(self) -> TrainPasses:
        """The same passes counted from 0 again (the same draws as this object's first passes)."""
        return replace(self)


@dataclass(frozen=True)
class Streaming:
    """A query method bound to the training passes it streams over.

    Every :func:`precondition` call restarts the passes, so each set of queries (e.g. each chunk of
    :func:`hookinf.self_influence`) is preconditioned with the same sampled labels.
    """

    method: QueryMethod
    run_pass: TrainPasses
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
    seed: int = 0,
) -> Solver:
    """A fitted curvature (checked), a fit of ``method`` over ``train``, or a query method bound to ``train``.

    Args:
        runner: runs the passes (its watch is active).
        method: as :func:`hookinf.influence`'s ``method=``.
        train: the training data (or a gradient store).
        damping: the damping rule; ``None`` keeps a fitted curvature's own, or the method's default
            (:func:`~hookinf.damping.default_damping`).
        dtype: the dtype statistics accumulate in (``None``: from the model).
        fisher: ``"empirical"`` or ``"sampled"`` labels for the curvature's gradients.
        seed: seeds the sampled labels: pass ``k`` of the fit draws from ``Sampler.for_pass(seed, k)``.

    Raises:
        ConfigurationError: an invalid ``fisher`` or ``seed`` (:func:`~hookinf.losses.check_fisher`), or a
            K-FAC/EK-FAC fit asked of a gradient store.
    """
    check_fisher(fisher, runner.loss_fn, seed)
    if isinstance(method, Curvature):
        method.check_compressor(runner.compress)
        method.check_compatible(runner.shapes)
        return method if damping is None else method.with_damping(as_damping(damping))
    resolved = resolve_method(method, runner.shapes)
    check_basis_compressor(resolved, runner.compress, "the basis")
    damp = default_damping(resolved.name) if damping is None else as_damping(damping)
    resolved.check(runner.shapes)
    if isinstance(train, GradientStore) and isinstance(resolved, KFAC | EKFAC):
        raise ConfigurationError(
            f"method={resolved.name!r} needs the projected activations and output gradients, which a gradient "
            f"store does not keep (only their products). Fit it on the data with the store's compressor — "
            f"hookinf.fit(model, train_data, loss_fn, method={resolved.name!r}, compress=<the store's "
            f"compressor>) — and pass that curvature as method=; or use 'exact', 'datainf', 'lissa' or 'identity'."
        )

    run_pass = TrainPasses(runner, train, fisher == "sampled", seed)
    if isinstance(resolved, QueryMethod):
        return Streaming(resolved, run_pass, damp)
    return resolved.fit(run_pass, runner.shapes, damp, statistics_dtype(runner.params, dtype), runner.compress)


def precondition(solver: Solver, queries: dict[str, Tensor], runner: Runner) -> Preconditioned:
    """``(G_l + λ_l I)⁻¹`` (or the method's approximation) applied to ``[n, O, I]`` gradients per layer."""
    if isinstance(solver, Curvature):
        return Preconditioned({n: solver.apply(n, q) for n, q in queries.items()}, solver.lambdas)
    return solver.method.precondition(queries, solver.run_pass.restarted(), runner.shapes, solver.damping)


def solver_name(solver: Solver) -> str:
    """The method's name, as reports show it."""
    return solver.method.name if isinstance(solver, Streaming) else solver.method
