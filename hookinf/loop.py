"""``hookinf.watch``: capture from the user's own loop, with the consumers ``fit=`` and ``log_to=`` ask for.

:func:`watch` resolves the tracked layers once, binds the compressor (which the watch applies inside its hooks, so
each step is compressed once and only its compressed factors are held) and builds the consumers — the method's
accumulator and the gradient logger — and returns a :class:`LoopWatch`: the hook-owning :class:`~hookinf.Watch`
given those, plus the accessors for what the consumers built (:meth:`LoopWatch.curvature`, :attr:`LoopWatch.store`).
On several ranks, the logger writes this rank's part of one shared store (:mod:`hookinf.distributed_log`): the watch
joins the store when built, and meets the other ranks when its block is entered and when it exits.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Sequence
from types import TracebackType

import torch
from torch import Tensor, nn

from hookinf.compress import BoundCompressor, Compressor, require_compressor
from hookinf.curvature import Curvature, statistics_dtype
from hookinf.damping import Damping, as_damping, default_damping
from hookinf.distributed import Group, Ranks, announcing, resolve_ranks, unwrap
from hookinf.distributed_log import LogTarget, join_store, leave_store
from hookinf.errors import ConfigurationError, DistributedError
from hookinf.hooks import LossReduction, Watch
from hookinf.logger import GradientLogger
from hookinf.methods import Method, check_basis_compressor, resolve_method
from hookinf.methods.base import Accumulator
from hookinf.pipeline import Consumer
from hookinf.reduction_probe import ReductionProbe
from hookinf.selection import ModuleSpec, Selection, select
from hookinf.store import GradientStore


def watch(
    model: nn.Module,
    *,
    modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
    loss_reduction: LossReduction = "mean",
    fit: str | Method | None = None,
    dtype: torch.dtype | None = None,
    log_to: str | os.PathLike[str] | None = None,
    compress: Compressor | None = None,
    flush_every: int = 4096,
    overwrite: bool = False,
    group: Group = "auto",
) -> LoopWatch:
    """Captures per-example, per-layer gradient factors while the user's own code runs.

    Use it as a context manager around an unchanged training (or evaluation) loop::

        with hookinf.watch(model) as w:
            loss = F.cross_entropy(model(x), y)   # mean over the batch
            loss.backward()
            grads = w.per_example_gradients()     # {layer: [B, O, I]}

    Args:
        model: the model; it is never modified (no module replaced, no attribute added).
        modules: what to track. ``None`` tracks every supported module (``nn.Linear``, ``nn.Conv1d``,
            ``nn.Conv2d``, GPT-2 ``Conv1D``, hence peft LoRA's ``lora_A``/``lora_B``) that has a trainable
            parameter of its own, so a LoRA fine-tune with a frozen base tracks only its adapters. Otherwise a
            qualified name, a glob pattern (``"encoder.*.attention.*"``), a module type, or a list of these.
        loss_reduction: how the loss being differentiated combines the examples of a batch. ``"mean"``
            (``F.cross_entropy``'s default) rescales the captured output gradients by the batch size ``B`` so that
            they are gradients of each example's own loss; ``"sum"`` takes them as they are. For a language model
            whose loss averages over all *tokens* of the batch, pass ``"sum"`` and compute the loss as the sum over
            examples of each example's mean token loss (or the sum of token losses, to attribute per token).
            The first backward that reaches the model is checked against it (:mod:`hookinf.reduction_probe`): a loss
            whose graph ends in a ``sum`` under ``"mean"``, or the other way round, raises before the backward.
        fit: also accumulate a method's curvature statistics from every step of the loop (``"kfac"``,
            ``"exact"``, ``"identity"``, or ``hookinf.EKFAC(basis=kfac_curvature)`` for EK-FAC's correction pass);
            :meth:`LoopWatch.curvature` returns the result. Run the loop at fixed weights (e.g. a zero learning
            rate, or an evaluation pass) for the statistics of one model, as :func:`hookinf.fit` computes them.
        dtype: the dtype the statistics accumulate in (default: float64 for a float64 model, else float32).
        log_to: also log every step's compressed per-example gradients into a :class:`~hookinf.GradientStore` at
            this directory (resumed when it exists). Tag each batch with its examples' ids before its forward —
            the one line a loop gains: ``w.tag(ids)``. Shards are flushed every ``flush_every`` examples and when
            the block ends (also on an exception: completed steps are kept). The store records the weights each
            entry of the block starts and ends at: another run's store at other weights is refused (a rerun in
            the same folder), and so is scoring it with a model at other weights than logging ended at. With several
            ranks (``group``), every rank logs into the same ``log_to``: each into its own part of one store, which
            rank 0 merges at every exit (see ``group``).
        compress: the compressor (``hookinf.LoGra``, ``hookinf.Dropout``, ``hookinf.Gaussian``) for ``log_to``, and
            for ``fit``: the statistics are then accumulated in the compressed space (as
            ``hookinf.fit(..., compress=...)`` does), so a curvature and a store from the same loop score together —
            ``hookinf.influence(model, store, query, loss_fn, method=w.curvature())`` — with no further pass.
            The projections run inside the hooks, so the watch never holds the full-width factors; its steps (and
            ``w.per_example_gradients()``) are then the compressed ones.
        flush_every: see ``log_to``.
        overwrite: replace the store at ``log_to`` when the block is first entered (with several ranks: when the
            watch is built, by rank 0, before any rank opens its part), instead of resuming it.
        group: with ``"auto"`` and an initialised process group of several ranks (or a given ``ProcessGroup``), the
            loop runs on every rank over its own shard, and the watch combines the ranks' steps. ``fit``, as
            :func:`hookinf.fit`: :meth:`LoopWatch.curvature` — called on every rank, as a collective — sums the
            statistics over the ranks (one all-reduce per call), so that every rank returns the curvature of one
            process over every rank's steps. ``log_to``, as :func:`hookinf.log` across ranks: building the watch is
            a collective (the ranks share rank 0's run token, recorded with the weights), and each rank logs into
            its own part ``log_to/rank-NNNNN`` of one store, skipping the ids stored anywhere in it. Entering the
            block is a collective (every rank opens its part, or none logs); so is every exit: when every rank
            closed its part, rank 0 merges the parts atomically (every id once) and the others wait, so the store
            at ``log_to`` is whole after each exit and the next entry resumes it; when a rank's block raised, the
            others raise :class:`~hookinf.errors.DistributedError` there, nothing is merged and every flushed shard
            is kept, so entering again (or logging again into ``log_to``) resumes the store. ``None``: this
            process alone (its own store at ``log_to``).

    A ``DistributedDataParallel`` model is watched through its wrapper: the layers are the inner module's, named
    without the ``module.`` prefix (as :func:`hookinf.fit` and :func:`hookinf.influence` name them), and the loop
    keeps calling the wrapper (its gradient reducer is untouched: the watch never reads or writes ``.grad``).

    Returns:
        A :class:`LoopWatch` (a :class:`~hookinf.Watch`) to enter with ``with``.

    Raises:
        ConfigurationError: ``loss_reduction`` is not one of ``"mean"``, ``"sum"``, or ``compress``/``log_to``/
            ``fit`` do not go together.
        NoTrackableModuleError: the model has no supported module with trainable parameters.
        PatternMatchError: an entry of ``modules`` matches no trackable module.
        UnsupportedModuleError: a module named in ``modules`` cannot be tracked.
        DistributedError: with several ranks and ``log_to``, another rank failed or died while the ranks joined the
            store (and, from ``with``: while entering the block, in its block, or while merging the store).
    """
    return LoopWatch(
        model,
        modules=modules,
        loss_reduction=loss_reduction,
        fit=fit,
        dtype=dtype,
        log_to=log_to,
        compress=compress,
        flush_every=flush_every,
        overwrite=overwrite,
        group=group,
    )


class LoopWatch(Watch):
    """A :class:`~hookinf.Watch` whose consumers are the ones :func:`watch`'s arguments ask for (see there)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: ModuleSpec | Sequence[ModuleSpec] | Selection | None = None,
        loss_reduction: LossReduction = "mean",
        fit: str | Method | None = None,
        dtype: torch.dtype | None = None,
        log_to: str | os.PathLike[str] | None = None,
        compress: Compressor | None = None,
        flush_every: int = 4096,
        overwrite: bool = False,
        group: Group = "auto",
    ) -> None:
        require_compressor(compress)
        ranks = resolve_ranks(group)  # refuses an invalid group= now; resolved again when the curvature is summed
        self._group = group
        if compress is not None and log_to is None and fit is None:
            raise ConfigurationError(
                "watch(compress=...) compresses what log_to= stores or what fit= accumulates; give one of them "
                "(e.g. watch(model, log_to='grads/', compress=hookinf.LoGra(16, 16)))."
            )
        if log_to is not None and compress is None:
            raise ConfigurationError(
                "watch(log_to=...) needs compress=...: a store holds compressed gradients (e.g. "
                "compress=hookinf.LoGra(16, 16))."
            )
        model = unwrap(model)
        selection = select(model, modules)
        bound = compress.bind(selection.shapes) if compress is not None else None
        self._accumulator = None if fit is None else _accumulator(fit, selection, bound, dtype)
        self._fit_name = None if fit is None else resolve_method(fit).name
        self._logger: GradientLogger | None = None
        self._target: LogTarget | None = None  # where this rank logs: the store, or its part of a shared one
        self._log_ranks = ranks if log_to is not None else None  # the ranks sharing the store (fixed once joined)
        if log_to is not None and bound is not None:
            self._target = join_store(log_to, self._log_ranks, overwrite)  # with several ranks: a collective
            self._logger = GradientLogger(
                self._target.path,
                bound,
                selection.parameters(),
                flush_every,
                overwrite=self._target.overwrite,
                run=self._target.run,
                whole=self._target.whole,
            )
        consumers: list[Consumer] = [c for c in (self._accumulator, self._logger) if c is not None]
        super().__init__(model, modules=selection, loss_reduction=loss_reduction, consumers=consumers, factor_map=bound)
        self._probe = ReductionProbe(loss_reduction, self._pending_batch_size, selection.parameters())

    def __enter__(self) -> LoopWatch:
        opened = False
        try:
            with announcing(self._log_ranks, "opening the store's parts"):  # no rank logs unless every rank can
                if self._logger is not None and self._logger.closed:  # entered again after an exit: resume it
                    self._logger.reopen()
                super().__enter__()
                opened = True
        except BaseException:
            if opened:  # another rank could not enter: this one leaves the block unentered too
                self._close()
            raise
        self._probe.start()  # until the first backward: is the loss reduced as loss_reduction says?
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._probe.stop()
        try:
            super().__exit__(exc_type, exc, tb)  # closes the logger: this rank's part, or the store
        except BaseException:
            self._leave(failed=True)
            raise
        self._leave(failed=exc_type is not None)

    def _leave(self, *, failed: bool) -> None:
        """Meets the ranks sharing the store once this rank's part is closed; rank 0 merges when none failed."""
        if self._target is None or self._logger is None or self._log_ranks is None:
            return
        weights = None if failed else self._logger.store.manifest.weights  # the weights this rank's logging ended at
        leave_store(self._target, self._log_ranks, failed=failed, weights=weights)

    def _pending_batch_size(self) -> int | None:
        """The batch size of the watched forward awaiting its backward (``None``: none awaits one)."""
        calls = self._pending.calls
        return int(calls[0].a.shape[0]) if calls else None

    def tag(self, ids: Sequence[int] | Sequence[str] | Tensor) -> None:
        """Names the examples of the next batch (call it before the batch's forward): the store keeps them by id."""
        if self._logger is None:
            raise ConfigurationError("tag() names examples for a gradient store: create the watch with log_to=... .")
        super().tag(ids)

    @property
    def store(self) -> GradientStore:
        """The gradient store being logged (``log_to``).

        With several ranks sharing it: inside the block, this rank's part (``log_to/rank-NNNNN``, what this rank has
        written); outside it, the whole store at ``log_to`` — merged after an exit in which every rank closed its
        part, else the parts as they were left (which open all the same).
        """
        if self._logger is None or self._target is None:
            raise ConfigurationError("this watch logs no gradients: create it with log_to=... and compress=... .")
        part = self._logger.store
        if self._target.whole is None or not self._logger.closed:
            return part
        return GradientStore(self._target.whole)

    def curvature(self, damping: float | Damping | None = None) -> Curvature:
        """The curvature accumulated from every step so far (needs ``watch(model, fit=...)``).

        With several ranks (``watch(group=...)``), a collective: every rank calls it (the same number of times),
        and each call sums a copy of every rank's statistics so far — the watch keeps its own rank's, so the loop
        may go on and a later call counts each step once. A rank whose captures fail the finiteness check tells the
        others, which raise :class:`~hookinf.errors.DistributedError`.

        Args:
            damping: the damping rule stored with it (see :func:`hookinf.fit`); ``None``: the method's default
                (:func:`~hookinf.damping.default_damping`: 1.0 for ``exact``, 0.1 otherwise).

        Raises:
            DistributedError: another rank failed, died or did not call ``curvature`` within the process group's
                timeout.
        """
        if self._accumulator is None:
            raise ConfigurationError(
                "this watch accumulates no statistics: create it with hookinf.watch(model, fit='kfac') (or 'exact', "
                "or hookinf.EKFAC(basis=...))."
            )
        ranks = resolve_ranks(self._group)
        try:
            self.steps  # noqa: B018 - closes the pending step, which feeds the accumulator
            self.verify()  # no curvature of non-finite captures
        except BaseException:
            if ranks is not None:  # the others are summing: join them with the failure flag
                _summed(self._accumulator, ranks, self._fit_name, failed=True)
            raise
        accumulator = self._accumulator if ranks is None else _summed(self._accumulator, ranks, self._fit_name)
        rule = default_damping(self._fit_name or "") if damping is None else as_damping(damping)
        return accumulator.finish(rule)


def _summed(accumulator: Accumulator, ranks: Ranks, name: str | None, *, failed: bool = False) -> Accumulator:
    """A copy of ``accumulator`` summed over ``ranks`` (the watch keeps its own); ``failed``: only tells the others."""
    total = copy.deepcopy(accumulator)
    what = f"the {name} statistics of the watched loop"
    if not failed:
        total.all_reduce(ranks, what=what)
    else:
        with contextlib.suppress(DistributedError):
            total.all_reduce(ranks, failed=True, what=what)
    return total


def _accumulator(
    fit: str | Method, selection: Selection, bound: BoundCompressor | None, dtype: torch.dtype | None
) -> Accumulator:
    """The accumulator of ``watch(fit=...)``, in the compressed space when there is a compressor."""
    method = resolve_method(fit)
    compressor = bound.compressor if bound is not None else None
    check_basis_compressor(method, compressor, "the basis")
    if not isinstance(method, Method):
        raise ConfigurationError(
            f"watch(fit={method.name!r}): {method.name} has no statistics to accumulate in advance (it streams "
            f"over the training data for each set of queries); use 'kfac', 'exact' or hookinf.EKFAC(basis=...)."
        )
    shapes = bound.shapes if bound is not None else selection.shapes
    method.check(shapes)
    return method.accumulator(shapes, statistics_dtype(selection.parameters(), dtype), compressor)
