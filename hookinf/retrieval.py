"""Streaming top-k retrieval: the most harmful and helpful training examples per query, without the score matrix.

:func:`top_k` scores the training examples chunk by chunk (a gradient store's shards, or the batches of ``train``)
exactly as :func:`hookinf.influence` does — the same preconditioned query gradients, the same
:func:`~hookinf.pairwise.layer_scores` per chunk — and keeps only a running top-k per query
(:class:`~hookinf.streaming.RunningTopK`): memory ``O(n_query × (k + chunk))`` per layer, never
``n_query × n_train``, and the same entries as ``influence(...).top_k(k)``, ties included.

Against a :class:`~hookinf.preconditioned.PreconditionedStore` (training gradients preconditioned once), the query
gradients are used raw and the scores are plain inner products: no curvature is applied. With ``candidates`` (for
example from :func:`hookinf.prefilter.tfidf`), each query ranks only its own candidates, and a store's examples
that are no query's candidate are not scored at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hookinf.capture import Step, store_step
from hookinf.compress import Compressor
from hookinf.curvature import Curvature
from hookinf.damping import Damping
from hookinf.distributed import Group, announcing, resolve_ranks
from hookinf.distributed_scores import check_candidates, check_shared, merged_top_k, store_rows
from hookinf.errors import ConfigurationError
from hookinf.ids import Ids, id_count, sort_order, take
from hookinf.losses import Fisher
from hookinf.methods import Method, QueryMethod
from hookinf.pairwise import LowRank, check_per_token, check_positions, layer_scores
from hookinf.preconditioned import PreconditionedStore
from hookinf.progress import PassProgress
from hookinf.runner import LossFn, Runner, check_reiterable, store_compressor
from hookinf.selection import ModuleSpec
from hookinf.solvers import precondition, solver, solver_name
from hookinf.store import GradientStore
from hookinf.streaming import Retrieved, RunningTopK

Train = Iterable[Any] | GradientStore | PreconditionedStore
"""What :func:`top_k` ranks: batches of training data, a gradient store, or a preconditioned store."""


def top_k(
    model: nn.Module,
    train: Train,
    query: Iterable[Any],
    loss_fn: LossFn,
    *,
    k: int = 10,
    method: str | Method | QueryMethod | Curvature | None = None,
    modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
    damping: float | Damping | None = None,
    fisher: Fisher = "empirical",
    seed: int = 0,
    compress: Compressor | None = None,
    candidates: Tensor | None = None,
    per_token: bool = False,
    query_rank: int | None = None,
    progress: bool = True,
    group: Group = "auto",
) -> Retrieved:
    """The ``k`` most harmful and most helpful training examples per query, streaming over ``train``.

    The same entries, scores and per-layer parts as ``hookinf.influence(model, train, query, loss_fn, ...).top_k(k)``
    (ties go to the smaller column), but only ``O(n_query × (k + chunk))`` scores are held at a time.

    Args:
        model: the trained model (left unchanged; run in eval mode during the passes).
        train: batches of training examples (as for :func:`hookinf.influence`), a :class:`~hookinf.GradientStore`
            (streamed shard by shard), or a :class:`~hookinf.PreconditionedStore` (scored by inner products with the
            raw query gradients; its curvature is the one it was written with).
        query: batches of query examples; row ``q`` of the result is the ``q``-th query.
        loss_fn: ``loss_fn(model, batch)`` returning per-example losses ``[B]``.
        k: training examples kept per query and direction (at most the number ranked).
        method: as for :func:`hookinf.influence` (``None``: ``"auto"``); with a preconditioned store, leave it out
            or pass the very curvature the store was written with.
        modules: which layers to track (see :func:`hookinf.watch`).
        damping: as for :func:`hookinf.influence` (not with a preconditioned store).
        fisher: as for :func:`hookinf.influence`.
        seed: as for :func:`hookinf.influence`.
        compress: as for :func:`hookinf.influence` (a store's own compressor is used for a store).
        candidates: optional ``[n_query, m]`` int64 training columns (``m ≥ k``): query ``q`` ranks only
            ``candidates[q]``. Columns are those of the dense scores (for a store, the rank of an id among the
            stored ids: example ``j`` when the ids are dataset indices).
        per_token: also keep each chosen entry's split over the training example's positions (tokens), as
            :func:`hookinf.influence` computes it: ``harmful_tokens``/``helpful_tokens`` ``[n_query, k, T]`` per
            layer, equal to ``influence(..., per_token=True).per_token`` at the chosen columns. The entries are
            chosen by their whole scores, as without it. Only with ``train`` as data (a store keeps each example's
            gradient summed over its positions), and ``compress`` ``None`` or :class:`~hookinf.LoGra`; memory
            ``O(n_query × (k + chunk) × T)`` per layer.
        query_rank: approximate each layer's preconditioned query gradient by its best rank-``k`` matrix, as
            :func:`hookinf.influence` does (Grosse et al. 2023, §3.2): the top-k of those approximate scores. Not
            with a preconditioned store, whose queries are never preconditioned.
        progress: show rich progress bars.
        group: as for :func:`hookinf.influence`: with several ranks, each ranks its own shard of ``train`` (or its
            block of a store's rows), and every rank returns the merged top-k of all of them, columns numbered as
            the dense scores' (:mod:`hookinf.distributed_scores`); ``candidates`` then needs a store.

    Returns:
        :class:`~hookinf.streaming.Retrieved`: a :class:`~hookinf.TopK` (columns, scores and ids, best first) with
        the per-layer parts of the chosen entries.

    Raises:
        ConfigurationError: a bad ``k``, ``candidates``, ``query_rank`` or ``method`` (for a preconditioned
            store), a compressor other than the store's, or ``per_token`` with a store or a compressor that keeps no
            positions, or ``query_rank`` with a preconditioned store.
        DataError: an empty ``query`` or ``train``.
    """
    store = train.gradients if isinstance(train, PreconditionedStore) else train
    compress = store_compressor(store, compress)
    check_reiterable(store, "train")
    check_reiterable(query, "query")
    n_train = len(store) if isinstance(store, GradientStore) else None
    checked = None if candidates is None else _check_candidates(candidates, n_train, k)
    _check_options(train, compress, per_token, query_rank)
    ranks = resolve_ranks(group)
    if checked is not None and n_train is None:
        check_candidates(ranks)
    if per_token and ranks is not None:
        raise ConfigurationError(
            "top_k(per_token=True) keeps each chosen entry's per-token parts on the rank that scored it, and gathering "
            "them across ranks is not supported: call influence(..., per_token=True) (which gathers them) or pass "
            "group=None."
        )
    with (
        announcing(ranks, "the end of the top-k pass"),
        Runner(model, loss_fn, modules=modules, compress=compress, progress=progress, group=group) as runner,
    ):
        raw = runner.query_gradients(query)
        if isinstance(train, PreconditionedStore):
            _check_preconditioned(train, method, damping)
            queries = {name: q.to(torch.promote_types(q.dtype, train.gradients.dtype)) for name, q in raw.items()}
            name, lambdas = train.record.method, train.record.lambdas
        else:
            solved = solver(runner, "auto" if method is None else method, train, damping, None, fisher, seed)
            pre = precondition(solved, raw, runner)
            queries, name, lambdas = dict(pre.grads), solver_name(solved), pre.lambdas
            check_shared(isinstance(solved, Curvature), name, ranks)
        approximated: dict[str, Tensor | LowRank] = (
            dict(queries) if query_rank is None else {n: LowRank.of(q, query_rank) for n, q in queries.items()}
        )
        running = RunningTopK(k, checked)
        chunks = (
            _store_chunks(runner, store, checked) if isinstance(store, GradientStore) else _data_chunks(runner, store)
        )
        for columns, step in chunks:
            if not per_token:
                parts = {layer: layer_scores(approximated[layer], c) for layer, c in step.layers.items()}
                running.update(parts, columns)
                continue
            check_positions(step)
            tokens = {layer: layer_scores(approximated[layer], c, per_token=True) for layer, c in step.layers.items()}
            running.update({layer: part.sum(dim=2) for layer, part in tokens.items()}, columns, tokens)
        runner.check_count()
    ranked = merged_top_k(running, ranks, runner.watch.layers, positions=n_train is None)
    harmful, helpful = ranked.harmful, ranked.helpful
    ids = store.ids if isinstance(store, GradientStore) else None
    return Retrieved(
        harmful.columns, harmful.scores, helpful.columns, helpful.scores,
        _ids_at(ids, harmful.columns), _ids_at(ids, helpful.columns),
        harmful.parts, helpful.parts, name, lambdas, ranked.seen,
        harmful.tokens if per_token else None, helpful.tokens if per_token else None,
    )  # fmt: skip


def _check_preconditioned(
    train: PreconditionedStore, method: str | Method | QueryMethod | Curvature | None, damping: float | Damping | None
) -> None:
    """A preconditioned store brings its curvature: ``method`` may only name the same one, ``damping`` none."""
    if isinstance(method, Curvature):
        train.check_curvature(method)
    elif method is not None:
        raise ConfigurationError(
            f"{train.path} holds gradients preconditioned with a {train.record.method} curvature; method={method!r} "
            f"cannot be applied to them. Leave method= out, or rank the source gradient store instead."
        )
    if damping is not None:
        raise ConfigurationError(
            f"{train.path} was preconditioned with damping λ = {train.record.lambdas}; damping= cannot change it. "
            f"Precondition the store again with hookinf.precondition_store(store, curvature.with_damping(...), path)."
        )


def _check_options(train: Train, compress: Compressor | None, per_token: bool, query_rank: int | None) -> None:
    """Refuses ``per_token`` where there are no positions, and ``query_rank`` with a preconditioned store."""
    if per_token:
        check_per_token(isinstance(train, GradientStore | PreconditionedStore), compress)
    if query_rank is not None and isinstance(train, PreconditionedStore):
        raise ConfigurationError(
            f"query_rank={query_rank!r} approximates the preconditioned query gradients, and against a "
            f"preconditioned store ({train.path}) the queries are never preconditioned: the curvature is on the "
            f"training side. Rank the source gradient store with method=<the curvature> and query_rank=, or leave "
            f"query_rank out."
        )


def _check_candidates(candidates: Tensor, n_train: int | None, k: int) -> Tensor:
    """``candidates`` as ``[n_query, m]`` int64, each row without repeats and within the training columns."""
    if not isinstance(candidates, Tensor) or candidates.dim() != 2 or candidates.dtype.is_floating_point:
        raise ConfigurationError("candidates must be an integer tensor [n_query, m] of training columns.")
    checked = candidates.to(torch.int64)
    if checked.numel() and (int(checked.min()) < 0 or (n_train is not None and int(checked.max()) >= n_train)):
        raise ConfigurationError(f"candidates must be training columns in [0, {n_train}).")
    ordered = checked.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ConfigurationError("candidates repeat a column within a query's row; give each candidate once.")
    return checked


def _store_chunks(runner: Runner, store: GradientStore, candidates: Tensor | None) -> Iterator[tuple[Tensor, Step]]:
    """A store's shards as steps, with their columns (ranks of their ids); rows no query wants are left out."""
    runner.check_store(store)
    rank = torch.empty(len(store), dtype=torch.int64, device="cpu")
    rank[sort_order(store.ids)] = torch.arange(len(store), device="cpu")
    wanted = None if candidates is None else torch.unique(candidates)
    with PassProgress("top-k", len(store.shards), enabled=runner.progress) as bar:
        for index, (start, ids, gradients) in enumerate(store_rows(store, runner.devices, runner.ranks)):
            columns = rank[start : start + id_count(ids)]
            if wanted is not None:
                keep = torch.isin(columns, wanted).nonzero().squeeze(1)
                if not keep.numel():
                    continue
                columns = columns[keep]
                gradients = {name: g[keep.to(g.device)] for name, g in gradients.items()}
            yield columns, store_step(index, gradients, store.layers)
            bar.advance(int(columns.numel()))


def _data_chunks(runner: Runner, train: Iterable[Any]) -> Iterator[tuple[Tensor, Step]]:
    """The batches of ``train`` as steps, with their columns (positions in ``train``)."""
    start = 0
    for step in runner.steps(train, "top-k"):
        yield torch.arange(start, start + step.batch_size, device="cpu"), step
        start += step.batch_size


def _ids_at(ids: Ids | None, columns: Tensor) -> Tensor | list[list[str]]:
    """The ids (sorted, as the dense scores hold them) at ``columns`` ``[n_query, k]``; the columns without ids."""
    if ids is None:
        return columns
    ordered = take(ids, sort_order(ids))
    if isinstance(ordered, Tensor):
        return ordered[columns.cpu()]
    return [[ordered[j] for j in row] for row in columns.tolist()]
