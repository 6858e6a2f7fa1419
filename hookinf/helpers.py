"""One-call helpers: :func:`fit`, :func:`influence`, :func:`self_influence` and :func:`log`.

The scores compute, for every tracked layer ``l``,

    I_l(z_q, z) = − g_l(z_q)ᵀ (G_l + λ_l I)⁻¹ g_l(z),      G_l = (1/n) Σ_i g_l(z_i) g_l(z_i)ᵀ,

with ``g_l(z)`` the gradient of example ``z``'s own loss with respect to layer ``l``'s parameters (Koh & Liang 2017
with the block-diagonal Gauss-Newton approximation of Kwon et al. 2023, eq. (2)–(3)). Positive influence is
harmful: up-weighting ``z`` increases the query's loss.

Data flow: a :class:`~hookinf.runner.Runner` runs ``loss_fn(model, batch)`` inside a :class:`~hookinf.Watch` whose
pipeline compresses each step once; each helper feeds those steps to its consumers (an accumulator, the scoring, the
gradient logger). The parameters' ``.grad`` are never touched; the model is put in eval mode for the passes (dropout
off) and restored after.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Any, Unpack, overload

import torch
from torch import Tensor, nn

from hookinf.checkpoint_scores import Combine
from hookinf.compress import Compressor, require_compressor
from hookinf.curvature import Curvature
from hookinf.damping import Damping
from hookinf.distributed import Group, announcing, resolve_ranks
from hookinf.distributed_log import shared_store
from hookinf.distributed_scores import cat1, check_shared, gather_columns, id_order
from hookinf.errors import ConfigurationError
from hookinf.ids import id_count
from hookinf.logger import GradientLogger, batch_ids
from hookinf.losses import Fisher
from hookinf.methods import Method, QueryMethod, resolve_method
from hookinf.over_checkpoints import (
    CURVATURES,
    SCORES,
    SELF_SCORES,
    STORES,
    Checkpoints,
    FitOptions,
    over_checkpoints,
)
from hookinf.pairwise import LowRank, check_per_token, check_positions, layer_scores, pad_cat
from hookinf.progress import PassProgress
from hookinf.runner import LossFn, Runner, check_reiterable, gradient_chunks, store_compressor
from hookinf.scores import Scores
from hookinf.selection import ModuleSpec
from hookinf.self_scores import SelfScores
from hookinf.solvers import precondition, solver, solver_name
from hookinf.store import GradientStore

IdsFn = Callable[[Any], Sequence[int] | Sequence[str] | Tensor]
"""``ids(batch)`` → the ids of the batch's examples (integers or strings)."""
TrainData = Iterable[Any] | GradientStore
"""``train=``: batches of training examples, or a gradient store of their compressed gradients."""


@overload
def fit(
    model: nn.Module, train: TrainData, loss_fn: LossFn, *, checkpoints: None = None, **options: Unpack[FitOptions]
) -> Curvature: ...
@overload
def fit(
    model: nn.Module, train: TrainData, loss_fn: LossFn, *, checkpoints: Checkpoints, **options: Unpack[FitOptions]
) -> list[Curvature]: ...
@over_checkpoints(CURVATURES)
def fit(
    model: nn.Module,
    train: TrainData,
    loss_fn: LossFn,
    *,
    method: str | Method = "auto",
    modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
    damping: float | Damping | None = None,
    fisher: Fisher = "empirical",
    seed: int = 0,
    compress: Compressor | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    checkpoints: Checkpoints | None = None,
    group: Group = "auto",
) -> Curvature | list[Curvature]:
    """Fits a method's curvature over the training data, streaming (memory does not grow with ``len(train)``).

    Args:
        model: the trained model (left unchanged; run in eval mode during the passes).
        train: batches of training examples (iterated once, twice for ``ekfac``; same order each time), or a
            :class:`~hookinf.GradientStore` (``exact`` and ``identity`` fitted from its compressed gradients).
        loss_fn: ``loss_fn(model, batch)`` returning per-example losses ``[B]`` (a scalar only when declared the
            sum of the batch's per-example losses with :func:`hookinf.summed`).
        method: ``"auto"`` (default: ``"exact"`` when every layer has at most 8,192 parameters — compressed
            dimensions when compressing — else ``"ekfac"``; the curvature's ``method`` says which), ``"ekfac"``,
            ``"kfac"``, ``"exact"`` (small layers), ``"identity"``, or a :class:`hookinf.Method` such as
            ``hookinf.EKFAC(basis=...)``.
        modules: which layers to track (see :func:`hookinf.watch`).
        damping: relative damping (see :mod:`hookinf.damping`), or ``hookinf.Damping(absolute=...)``; stored with
            the curvature. ``None``: the method's default, relative 1.0 for ``exact`` and 0.1 for the others
            (:data:`hookinf.damping.DEFAULT_RELATIVE`, measured in ``docs/methods.md``).
        fisher: ``"empirical"`` (gradients at the given labels, the default) or ``"sampled"`` (labels drawn from
            the model, the true Fisher; needs a loss with a ``sampled`` method such as :class:`hookinf.CrossEntropy`).
            Scores always use the given labels.
        seed: seeds the labels of ``fisher="sampled"``: pass ``k`` of the fit draws fresh labels from a generator
            seeded with :func:`hookinf.losses.pass_seed` of ``(seed, k)``, so the passes differ and the same seed
            gives the same curvature (on the same devices). Unused with ``fisher="empirical"``.
        compress: fit in a compressed gradient space (``hookinf.LoGra``, ``hookinf.Dropout``,
            ``hookinf.Gaussian``); the curvature remembers the compressor and must be used with the same one.
        dtype: the dtype statistics accumulate in; default float64 for a float64 model and float32 otherwise.
        progress: show rich progress bars (one per pass).
        checkpoints: fit at each of these checkpoints of the same run instead of the model's own weights (state
            dicts, files or Hugging Face checkpoint directories; see ``docs/checkpoints.md``).
        group: with ``"auto"`` and an initialised process group of several ranks (or a given ``ProcessGroup``),
            every rank calls ``fit`` with its own shard of ``train`` (used as given; a gradient store, the same on
            every rank, is split by rows) and every rank returns the same curvature, that of one process over all
            shards (see ``docs/distributed.md``); ``None``: this process alone.

    Returns:
        The fitted :class:`hookinf.Curvature`; pass it as ``method=`` to :func:`influence` /
        :func:`self_influence` to reuse it, or :meth:`~hookinf.Curvature.save` it. With ``checkpoints``, a list
        of curvatures, one per checkpoint in order (pass the list as ``method=`` with the same ``checkpoints``).

    Raises:
        ConfigurationError: ``method`` has no curvature to fit, or ``fisher``/``seed`` is invalid.
    """
    compress = store_compressor(train, compress)
    check_reiterable(train, "train")
    with Runner(model, loss_fn, modules=modules, compress=compress, progress=progress, group=group) as runner:
        resolved = resolve_method(method, runner.shapes)
        if not isinstance(resolved, Method):
            raise ConfigurationError(
                f"method={resolved.name!r} has no curvature to fit: it streams over the training data for each set "
                f"of queries. Pass it to hookinf.influence(...) directly, or fit 'ekfac', 'kfac' or 'exact'."
            )
        curvature = solver(runner, resolved, train, damping, dtype, fisher, seed)
        assert isinstance(curvature, Curvature)
        return curvature


@over_checkpoints(SCORES)
def influence(
    model: nn.Module,
    train: TrainData,
    query: Iterable[Any],
    loss_fn: LossFn,
    *,
    method: str | Method | QueryMethod | Curvature | Sequence[Curvature] = "auto",
    modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
    damping: float | Damping | None = None,
    fisher: Fisher = "empirical",
    seed: int = 0,
    compress: Compressor | None = None,
    per_token: bool = False,
    query_rank: int | None = None,
    progress: bool = True,
    checkpoints: Checkpoints | None = None,
    combine: Combine = "normalized",
    group: Group = "auto",
) -> Scores:
    """Influence of every training example on every query, per layer.

    Args:
        model: the trained model (left unchanged; run in eval mode during the passes).
        train: batches of training examples, iterated once per pass in the same order (a fit pass or two, then
            the scoring pass); column ``j`` of the scores is the ``j``-th example in that order. A shuffling
            DataLoader is refused.
        query: batches of query examples; row ``q`` of the scores is the ``q``-th query.
        loss_fn: ``loss_fn(model, batch)`` returning per-example losses ``[B]`` (a scalar only when declared the
            sum of the batch's per-example losses with :func:`hookinf.summed`).
        method: ``"auto"`` (default: ``"exact"`` when every layer has at most 8,192 parameters, else ``"ekfac"``;
            the scores' ``method`` says which), ``"exact"`` (explicit damped blocks), ``"kfac"``, ``"ekfac"``,
            ``"identity"`` (TracIn-style dot products), a :class:`hookinf.Method` such as
            ``hookinf.Exact(max_dim=...)``, or a fitted :class:`hookinf.Curvature` (from :func:`fit` or
            :func:`hookinf.load`), which is reused without refitting; with ``checkpoints``, also a list of fitted
            curvatures, one per checkpoint.
        modules: which layers to track (see :func:`hookinf.watch`).
        damping: relative damping ``λ_l = damping × tr(G_l)/d_l`` or ``hookinf.Damping(absolute=...)``; ``None``
            means the damping a fitted curvature was fitted with, or the method's default: relative 1.0 for
            ``exact``, 0.1 for the others (:data:`hookinf.damping.DEFAULT_RELATIVE`).
        fisher: which labels the curvature's gradients use, see :func:`fit` (ignored for a fitted curvature).
        seed: seeds the sampled labels of ``fisher="sampled"``, see :func:`fit`.
        compress: compute influence in a compressed gradient space: ``hookinf.LoGra(r_in, r_out)`` (projected
            factors; every method, K-FAC/EK-FAC included, runs on them), ``hookinf.Dropout(r=...)`` (kept entries)
            or ``hookinf.Gaussian(r)``; the damping rule applies with the compressed dimension
            (``λ'_l = damping × tr(G'_l)/r'_l``). Per-layer parts are kept.
        per_token: also split each training example's score over its positions (tokens): ``Scores.per_token``
            ``[n_query, n_train, T]`` per layer, summing over ``T`` to ``per_layer`` (shorter sequences are padded
            with zeros). Every tracked layer must see the same positions (one call per forward, same ``T``).
        query_rank: approximate each layer's preconditioned query gradient by its best rank-``k`` matrix (SVD),
            so that scoring costs ``O(T k (O + I))`` per pair and layer instead of ``O(O I)`` (Grosse et al. 2023,
            §3.2); ``None`` keeps them exact.
        progress: show rich progress bars.
        checkpoints: score at each of these checkpoints of the same run (state dicts, files or Hugging Face
            checkpoint directories, loaded into ``model`` in turn; ``model`` is restored afterwards) and combine.
        combine: with ``checkpoints``: ``"normalized"`` (each checkpoint's scores scaled to unit standard deviation),
            ``"sum"``, or one weight per checkpoint (e.g. learning rates); see ``docs/checkpoints.md``.
        group: with ``"auto"`` and an initialised process group of several ranks (or a given ``ProcessGroup``),
            every rank calls ``influence`` with the same ``query`` and its own shard of ``train`` (or the same
            store, whose rows the ranks split), the curvature is fitted over every rank's rows as :func:`fit` fits
            it, and every rank returns the whole scores: column ``j`` is the ``j``-th example of the ranks' shards
            concatenated in rank order (from a store: sorted by id, as in one process). See
            :mod:`hookinf.distributed_scores`; ``None``: this process alone.

    Returns:
        :class:`Scores` with ``total`` and ``per_layer`` of shape ``[n_query, n_train]`` (float64; float32 for
        ``kfac``/``ekfac`` on a float32 model, whose preconditioning runs in the statistics' dtype). From a
        :class:`~hookinf.GradientStore`, the columns are sorted by id and ``Scores.ids`` holds them (column ``j``
        is example ``j`` when the ids are dataset indices), whatever order the examples were logged in. With
        ``checkpoints``, a :class:`~hookinf.CheckpointScores` that also holds each checkpoint's scores.
    """
    assert isinstance(method, str | Method | QueryMethod | Curvature)  # @over_checkpoints split a list per checkpoint
    compress = store_compressor(train, compress)
    check_reiterable(train, "train")
    check_reiterable(query, "query")
    if per_token:
        check_per_token(isinstance(train, GradientStore), compress)
    ranks = resolve_ranks(group)
    with (
        announcing(ranks, "the end of scoring"),
        Runner(model, loss_fn, modules=modules, compress=compress, progress=progress, group=group) as runner,
    ):
        layers = runner.watch.layers
        solved = solver(runner, method, train, damping, None, fisher, seed)
        check_shared(isinstance(solved, Curvature), solver_name(solved), ranks)
        pre = precondition(solved, runner.query_gradients(query), runner)
        queries: dict[str, Tensor | LowRank] = (
            {name: LowRank.of(q, query_rank) for name, q in pre.grads.items()}
            if query_rank is not None
            else dict(pre.grads)
        )
        columns: dict[str, list[Tensor]] = {name: [] for name in layers}
        for step in runner.steps(train, "scores"):
            if per_token:
                check_positions(step)
            for name, capture in step.layers.items():
                columns[name].append(layer_scores(queries[name], capture, per_token=per_token))
        runner.check_count()
    ids, order = id_order(train)
    joined = gather_columns(columns, ranks, dim=1, ndim=3 if per_token else 2, join=pad_cat if per_token else cat1)
    if per_token:
        tokens = {name: part[:, order] for name, part in joined.items()}  # [n_query, n_train, T]
        per_layer = {name: part.sum(dim=2) for name, part in tokens.items()}
        return Scores(per_layer=per_layer, method=solver_name(solved), damping=pre.lambdas, per_token=tokens, ids=ids)
    per_layer = {name: part[:, order] for name, part in joined.items()}
    return Scores(per_layer=per_layer, method=solver_name(solved), damping=pre.lambdas, ids=ids)


@over_checkpoints(SELF_SCORES)
def self_influence(
    model: nn.Module,
    train: TrainData,
    loss_fn: LossFn,
    *,
    method: str | Method | QueryMethod | Curvature | Sequence[Curvature] = "auto",
    modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
    damping: float | Damping | None = None,
    fisher: Fisher = "empirical",
    seed: int = 0,
    compress: Compressor | None = None,
    checkpoints: Checkpoints | None = None,
    combine: Combine = "normalized",
    progress: bool = True,
    group: Group = "auto",
) -> SelfScores:
    """Self-influence ``Σ_l g_l(z)ᵀ (G_l + λ_l I)⁻¹ g_l(z)`` of every training example (the mislabel signal).

    It is the diagonal of ``influence(model, train, train, ...)`` with the opposite sign: large values mark
    examples the model finds hard to fit, often mislabeled ones. Arguments are those of :func:`influence`; with
    ``checkpoints``, ``train`` may also be one gradient store per checkpoint, and the result is a
    :class:`~hookinf.checkpoint_scores.CheckpointSelfScores` combined by ``combine``. With several ranks
    (``group``, as for :func:`influence`), every rank returns every rank's entries, in the same order.

    Returns:
        :class:`~hookinf.SelfScores`: ``per_layer`` ``{layer: [n_train]}`` (``g_l(z)ᵀ (G_l + λ_l I)⁻¹ g_l(z)``),
        their sum ``total`` ``[n_train]`` float64, and ``topk(k)`` (values, indices and ids), in the order of
        ``train``; from a :class:`~hookinf.GradientStore`, sorted by id with the ids in ``ids`` (entry ``j`` is the
        example with the ``j``-th smallest id: example ``j`` when the ids are dataset indices), whatever order the
        examples were logged in.
    """
    assert isinstance(method, str | Method | QueryMethod | Curvature)  # @over_checkpoints split a list per checkpoint
    compress = store_compressor(train, compress)
    check_reiterable(train, "train")
    ranks = resolve_ranks(group)
    with (
        announcing(ranks, "the end of the self-influence pass"),
        Runner(model, loss_fn, modules=modules, compress=compress, progress=progress, group=group) as runner,
    ):
        solved = solver(runner, method, train, damping, None, fisher, seed)
        check_shared(isinstance(solved, Curvature), solver_name(solved), ranks)
        values: dict[str, list[Tensor]] = {name: [] for name in runner.watch.layers}  # layer → [B] parts
        lambdas: dict[str, float] = {}
        if isinstance(solved, Curvature):
            lambdas = solved.lambdas
            for step in runner.steps(train, "self-influence"):
                for name, capture in step.layers.items():
                    grads = capture.gradients()
                    applied = solved.apply(name, grads)
                    values[name].append((applied * grads.to(applied.dtype)).flatten(1).sum(dim=1).double())
        else:  # a query method: precondition chunks of training gradients as if they were queries
            for chunk in gradient_chunks(runner.steps(train, "self-influence"), _SELF_CHUNK):
                pre = precondition(solved, chunk, runner)
                lambdas = dict(pre.lambdas)
                for n in chunk:
                    values[n].append((pre.grads[n] * chunk[n].to(pre.grads[n].dtype)).flatten(1).sum(dim=1).double())
        runner.check_count()
    ids, order = id_order(train)
    joined = gather_columns(values, ranks, dim=0, ndim=1, join=torch.cat)
    per_layer = {name: part[order] for name, part in joined.items()}
    return SelfScores(per_layer=per_layer, method=solver_name(solved), damping=lambdas, ids=ids)


@over_checkpoints(STORES)
def log(
    model: nn.Module,
    train: Iterable[Any],
    loss_fn: LossFn,
    *,
    compress: Compressor,
    path: str | os.PathLike[str],
    ids: IdsFn | None = None,
    modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
    flush_every: int = 4096,
    overwrite: bool = False,
    checkpoints: Checkpoints | None = None,
    progress: bool = True,
    group: Group = "auto",
) -> GradientStore:
    """Logs every training example's compressed gradient into a store at ``path`` (resuming a partial one).

    Args:
        model: the model (left unchanged; run in eval mode).
        train: batches of training examples (iterated once; a generator is fine).
        loss_fn: ``loss_fn(model, batch)`` returning per-example losses ``[B]`` (a scalar only when declared the
            sum of the batch's per-example losses with :func:`hookinf.summed`).
        compress: the compressor (``hookinf.LoGra(16, 16)``, ``hookinf.Dropout(r=...)``, ``hookinf.Gaussian(r)``).
        path: the store's directory. When it already holds a store of the same compressor and model, at the same
            weights, logging resumes (a :class:`~hookinf.HookinfWarning` says how many examples it holds): batches
            whose ids are all stored are skipped without running the model, and the store ends with every id
            exactly once. A store of the same model at other weights (another run's) is refused.
        ids: ``ids(batch)`` → the batch's example ids (integers, or strings such as document ids); by default an
            example's id is its position in ``train``.
        modules: which layers to track (see :func:`hookinf.watch`).
        flush_every: a shard is written at least every this many examples (what an interruption can lose).
        overwrite: replace the store at ``path`` (its manifest and shards) instead of resuming it.
        checkpoints: log at each of these checkpoints (see :func:`influence`) into its own store,
            ``path/checkpoint-<k>``; returns the list of stores, in order, to pass as ``train`` with the same
            ``checkpoints`` (each store records its checkpoint's weights, and is refused at any other).
        progress: show a rich progress bar.
        group: as :func:`fit`: with several ranks, each logs its shard into its own part of the store at ``path``
            and rank 0 merges the parts at the end (``ids`` is then required: positions repeat across ranks).

    Returns:
        The :class:`GradientStore`; pass it as ``train`` to :func:`hookinf.influence` / :func:`self_influence`.
        With ``checkpoints``, a list of stores, one per checkpoint.
    """
    if compress is None:
        raise ConfigurationError("a gradient store needs compress= (e.g. hookinf.LoGra(16, 16)).")
    require_compressor(compress)
    ranks = resolve_ranks(group)
    if ranks is not None and ids is None:
        raise ConfigurationError("logging from several ranks needs ids= (e.g. dataset indices): positions repeat.")
    with (
        Runner(model, loss_fn, modules=modules, compress=compress, progress=False) as runner,
        shared_store(path, ranks, overwrite) as target,
    ):
        assert runner.compressor is not None
        logger = GradientLogger(
            target.path,
            runner.compressor,
            runner.params,
            flush_every,
            overwrite=target.overwrite,
            run=target.run,
            whole=target.whole,
        )
        try:
            total = len(train) if isinstance(train, Sized) else None
            position = 0
            with PassProgress("log gradients", total, enabled=progress) as bar:
                for batch in train:
                    example_ids = batch_ids(batch, ids, position)
                    position += id_count(example_ids)
                    if logger.all_stored(example_ids):
                        bar.advance(0)
                        continue
                    runner.watch.tag(example_ids)
                    step = runner.step(batch, "log")
                    logger.consume(step)
                    bar.advance(step.batch_size)
        finally:
            logger.close()  # completed steps are durable even when the loop raised
    return logger.store if target.whole is None else GradientStore(target.whole)


_SELF_CHUNK = 256  # training examples preconditioned together when a query method computes self-influence
