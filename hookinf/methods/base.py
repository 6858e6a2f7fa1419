"""What every influence method provides: statistics accumulated from captured steps into a :class:`Curvature`.

The statistics of one pass are accumulated by an :class:`Accumulator`, fed one :class:`~hookinf.capture.Step` at a
time (per-example factors ``a`` ``[B, S, I]`` and ``δ`` ``[B, S, O]`` of every layer). An accumulator is a
:class:`~hookinf.pipeline.Consumer`, so the same code serves :func:`hookinf.fit` (which runs the passes itself
through ``run_pass(description)``), a :func:`hookinf.watch` around the user's own loop and the Trainer callback
(which feed it the steps of that loop). Multi-pass methods (EK-FAC) override :meth:`Method.fit`; the data is
iterated in the same order on each pass. With a sampled Fisher each pass draws fresh labels, so a pass may not be
replayed from memory in place of running the next one (:func:`fresh_draws`).

Distributed (:mod:`hookinf.distributed`): a ``run_pass`` with ``ranks`` runs this rank's shard, and each pass ends
with :func:`accumulate` summing the accumulator's sums and counts over the ranks (one all-reduce), so every rank
finishes the same statistics — those of one process over all the shards.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hookinf.capture import Step
from hookinf.compress import Compressor
from hookinf.curvature import Curvature
from hookinf.damping import Damping
from hookinf.distributed import Ranks
from hookinf.errors import DataError, DistributedError
from hookinf.shapes import LayerShape

RunPass = Callable[[str], Iterable[Step]]
"""``run_pass(description)`` runs one pass over the training data and yields its steps."""


def fresh_draws(run_pass: RunPass) -> bool:
    """Whether each pass of ``run_pass`` draws new random labels (``fisher="sampled"``), so that no two agree.

    A ``run_pass`` says so with a ``fresh_draws`` attribute that is ``True`` (:class:`hookinf.solvers.TrainPasses`);
    any other callable runs the same numbers on every pass, which a method may then replay from memory.
    """
    return getattr(run_pass, "fresh_draws", False) is True


def pass_ranks(run_pass: RunPass) -> Ranks | None:
    """The ranks whose shards the passes of ``run_pass`` are parts of (its ``ranks`` attribute), or ``None``."""
    ranks = getattr(run_pass, "ranks", None)
    return ranks if isinstance(ranks, Ranks) else None


class Accumulator(ABC):
    """Additive statistics of one pass, updated step by step (a :class:`~hookinf.pipeline.Consumer`).

    Args:
        compressor: the compressor whose space the steps are in (``None``: uncompressed); the curvature it
            finishes records it.
    """

    def __init__(self, compressor: Compressor | None = None) -> None:
        self.count = 0
        self.compressor = compressor

    def update(self, step: Step) -> None:
        """Adds one step's examples."""
        self.count += step.batch_size
        self._update(step)

    def consume(self, step: Step) -> None:
        """Adds one step's examples (the :class:`~hookinf.pipeline.Consumer` protocol)."""
        self.update(step)

    def close(self) -> None:  # noqa: B027 - a consumer may need no flush
        """Nothing to flush: the statistics stay available to :meth:`finish`."""

    @abstractmethod
    def _update(self, step: Step) -> None:
        """Adds one step's examples to the sums."""

    @abstractmethod
    def finish(self, damping: Damping) -> Curvature:
        """The curvature of everything accumulated so far."""

    def _require_data(self) -> None:
        if self.count == 0:
            raise empty_train()

    def all_reduce(self, ranks: Ranks, *, failed: bool = False, what: str = "the statistics") -> None:
        """Sums the statistics over ``ranks`` in place: every rank calls it once at the end of each pass.

        Args:
            ranks: the ranks of the pass.
            failed: this rank's pass raised; it joins only so that the others stop (see :meth:`Ranks.all_reduce`).
            what: the statistics' name, for error messages.
        """
        sums, counts = self._sums(ranks.device), self._counts()
        self._set_counts(ranks.all_reduce(sums, counts, failed=failed, what=f"summing {what}"))

    def _sums(self, device: torch.device) -> list[Tensor]:
        """Every additive statistic of every layer, in model order (zeros on ``device`` where no step reached one)."""
        return []

    def _counts(self) -> list[int]:
        """The counts (host integers) the statistics go with."""
        return [self.count]

    def _set_counts(self, counts: list[int]) -> None:
        self.count = counts[0]


def accumulate(accumulator: Accumulator, steps: Iterable[Step], ranks: Ranks | None, what: str) -> None:
    """Feeds a pass's steps to ``accumulator``; with ``ranks``, sums its statistics over them at the end.

    A step that raises on this rank is announced to the other ranks in that all-reduce (they raise
    :class:`~hookinf.errors.DistributedError` at once instead of waiting), then raised here.
    """
    if ranks is None:
        for step in steps:
            accumulator.update(step)
        return
    try:
        for step in steps:
            accumulator.update(step)
    except BaseException:
        with contextlib.suppress(DistributedError):
            accumulator.all_reduce(ranks, failed=True, what=what)
        raise
    accumulator.all_reduce(ranks, what=what)


class Method(ABC):
    """An influence method: how ``(G_l + λ_l I)⁻¹`` is approximated."""

    #: the name used by ``method=`` and in reports.
    name: str

    def check(self, shapes: Mapping[str, LayerShape]) -> None:  # noqa: B027 - optional hook
        """Refuses layers the method cannot handle before any data is read (default: accepts all)."""

    @abstractmethod
    def accumulator(
        self, shapes: Mapping[str, LayerShape], dtype: torch.dtype, compressor: Compressor | None = None
    ) -> Accumulator:
        """A fresh accumulator for one pass of this method over the data (single-pass statistics)."""

    def fit(
        self,
        run_pass: RunPass,
        shapes: Mapping[str, LayerShape],
        damping: Damping,
        dtype: torch.dtype,
        compressor: Compressor | None = None,
    ) -> Curvature:
        """Accumulates the method's statistics over the training data (one pass by default).

        Args:
            run_pass: runs a pass over the training data (see the module docstring).
            shapes: tracked layers and their gradient shapes, in model order.
            damping: the damping rule stored with the curvature.
            dtype: the dtype statistics accumulate in (float64 for float64 models, float32 at least otherwise).
            compressor: the compressor the steps are compressed with (recorded in the curvature).
        """
        self.check(shapes)
        accumulator = self.accumulator(shapes, dtype, compressor)
        accumulate(accumulator, run_pass(f"fit {self.name}"), pass_ranks(run_pass), f"the {self.name} statistics")
        return accumulator.finish(damping)


@dataclass(frozen=True)
class Preconditioned:
    """Query gradients after ``(G_l + λ_l I)⁻¹`` (or a method's approximation of it).

    Attributes:
        grads: layer → ``[n_query, O, I]`` float64.
        lambdas: layer → ``λ_l`` as used.
    """

    grads: dict[str, Tensor]
    lambdas: dict[str, float]


class QueryMethod(ABC):
    """A method that preconditions a given set of query gradients with passes over the training data.

    DataInf's closed form and LiSSA's recursion depend on the query vectors, so nothing is fitted in advance: each
    call of :meth:`precondition` streams over the training data (memory ``O(n_query × d_l)``, not ``O(n d_l)``).
    """

    #: the name used by ``method=`` and in reports.
    name: str

    def check(self, shapes: Mapping[str, LayerShape]) -> None:  # noqa: B027 - optional hook
        """Refuses layers the method cannot handle before any data is read (default: accepts all)."""

    @abstractmethod
    def precondition(
        self,
        queries: Mapping[str, Tensor],
        run_pass: RunPass,
        shapes: Mapping[str, LayerShape],
        damping: Damping,
    ) -> Preconditioned:
        """Applies the method's inverse curvature to query gradients.

        Args:
            queries: layer → ``[n_query, O, I]`` query gradients (float64).
            run_pass: runs a pass over the training data.
            shapes: tracked layers, in model order.
            damping: the damping rule.
        """


@dataclass(frozen=True)
class NormStatistics:
    """Per-layer sums over the training data of squared per-example gradient norms.

    Attributes:
        count: ``n``.
        sum_sq: layer → ``Σ_i ‖g_i‖²`` (``n · tr(G_l)``).
        max_sq: layer → ``max_i ‖g_i‖²``.
    """

    count: int
    sum_sq: dict[str, float]
    max_sq: dict[str, float]

    def lambdas(self, shapes: Mapping[str, LayerShape], damping: Damping) -> dict[str, float]:
        """``λ_l = damping × tr(G_l)/d_l`` per layer (or the absolute value)."""
        return {name: damping.value(self.sum_sq[name] / (self.count * shape.dim)) for name, shape in shapes.items()}


def gradient_norms(run_pass: RunPass, shapes: Mapping[str, LayerShape], description: str) -> NormStatistics:
    """One pass computing :class:`NormStatistics` (for the relative damping and LiSSA's scale)."""
    sum_sq = dict.fromkeys(shapes, 0.0)
    max_sq = dict.fromkeys(shapes, 0.0)
    count = 0
    for step in run_pass(description):
        count += step.batch_size
        for name, capture in step.layers.items():
            norms = capture.gradients().double().flatten(1).square().sum(dim=1)
            sum_sq[name] += float(norms.sum())
            max_sq[name] = max(max_sq[name], float(norms.max()))
    if count == 0:
        raise empty_train()
    return NormStatistics(count, sum_sq, max_sq)


def empty_train() -> DataError:
    """The one error for training data that yielded no example (every front door raises this one)."""
    return DataError("train is empty: pass at least one batch of training examples.")


def check_basis_compressor(method: Method | QueryMethod, compressor: Compressor | None, subject: str) -> None:
    """Refuses an ``EKFAC(basis=...)`` whose basis was fitted in another compressed space than ``compressor``."""
    basis = getattr(method, "basis", None)
    if isinstance(basis, Curvature):
        basis.check_compressor(compressor, subject)
