"""``checkpoints=`` for the one-call helpers: run the helper once per checkpoint, then combine the results.

:func:`over_checkpoints` decorates a helper whose signature has ``model``, ``method``, ``modules`` and
``checkpoints``. Called with ``checkpoints=None`` it is the helper itself. Called with a list of checkpoints, it
reads each in turn (:func:`hookinf.checkpoints.read_checkpoint`), loads it into the model for one call of the
helper (:class:`hookinf.loaded_checkpoint.LoadedCheckpoint`: the model's own weights, modes and ``requires_grad``
flags come back afterwards, also on error), with ``method=`` the checkpoint's own entry when it is a list (one fitted
curvature per checkpoint, reused without refitting), and hands the per-checkpoint results to the helper's
``combine`` function (:func:`fit` keeps the list; :func:`influence` combines the scores with
:func:`hookinf.checkpoint_scores.combine_scores`). Cost is linear in the number of checkpoints: each one runs the
helper's passes once.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypedDict, TypeVar, cast

import torch

from hookinf.checkpoint_scores import (
    CheckpointScores,
    CheckpointSelfScores,
    check_combine,
    combine_scores,
    combine_self_scores,
)
from hookinf.checkpoints import CheckpointSource, check_source, describe, read_checkpoint
from hookinf.compress import Compressor
from hookinf.curvature import Curvature
from hookinf.damping import Damping
from hookinf.distributed import Group, unwrap
from hookinf.errors import ConfigurationError, HookinfWarning
from hookinf.loaded_checkpoint import LoadedCheckpoint, tracked_names
from hookinf.losses import Fisher
from hookinf.methods import Method
from hookinf.selection import ModuleSpec, select
from hookinf.store import GradientStore

P = ParamSpec("P")
R = TypeVar("R")
Checkpoints = Sequence[CheckpointSource]
"""``checkpoints=``: one entry per checkpoint, in training order (see :mod:`hookinf.checkpoints`)."""


@dataclass(frozen=True)
class Combination:
    """How a helper's per-checkpoint results become one.

    Attributes:
        combine: ``combine(results, arguments)``: the per-checkpoint results, in order, and the helper's bound
            arguments → the helper's result over checkpoints.
        check: ``check(arguments, count)``, run before the first checkpoint: refuses arguments that cannot combine
            ``count`` results (e.g. a wrong number of weights), so no pass runs in vain.
        per_call: ``per_call(arguments, k)`` → arguments that differ for checkpoint ``k`` (e.g. its own store path).
    """

    combine: Callable[[list[Any], Mapping[str, Any]], Any]
    check: Callable[[Mapping[str, Any], int], None] | None = None
    per_call: Callable[[Mapping[str, Any], int], dict[str, Any]] | None = None


class FitOptions(TypedDict, total=False):
    """The keyword options of :func:`hookinf.fit` besides ``checkpoints`` (for its typed overloads)."""

    method: str | Method
    modules: ModuleSpec | Sequence[ModuleSpec] | None
    damping: float | Damping | None
    fisher: Fisher
    seed: int
    compress: Compressor | None
    dtype: torch.dtype | None
    progress: bool
    group: Group


def over_checkpoints(combination: Combination) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorates a one-call helper so that ``checkpoints=[...]`` runs it per checkpoint and combines the results.

    Args:
        combination: how the per-checkpoint results become the helper's result (:data:`CURVATURES`,
            :data:`SCORES`).
    """

    def decorate(helper: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(helper)
        call = cast(Callable[..., R], helper)

        @functools.wraps(helper)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            checkpoints, method = arguments["checkpoints"], arguments.get("method")
            listed = isinstance(method, Sequence) and not isinstance(method, str)
            if checkpoints is None:
                if listed:
                    raise ConfigurationError(
                        "method= is a list (one fitted curvature per checkpoint): give checkpoints=[...] too."
                    )
                return call(**arguments)
            sources = checkpoint_list(checkpoints)
            methods = per_checkpoint(method, len(sources)) if listed and method is not None else [method] * len(sources)
            if combination.check is not None:
                combination.check(arguments, len(sources))
            trains = per_checkpoint_train(arguments.get("train"), len(sources))
            model = unwrap(arguments["model"])  # a DDP wrapper's inner model: its names have no "module." prefix
            with warnings.catch_warnings():  # what select() warns about, each checkpoint's call warns about again
                warnings.simplefilter("ignore", HookinfWarning)
                require = tracked_names(select(model, arguments["modules"]))
            results = []
            for index, (source, entry) in enumerate(zip(sources, methods, strict=True)):
                what = describe(source, index)
                own = {"checkpoints": None, **({"method": entry} if "method" in arguments else {})}
                if trains is not None:
                    own["train"] = trains[index]
                if combination.per_call is not None:
                    own.update(combination.per_call(arguments, index))
                with LoadedCheckpoint(model, read_checkpoint(source, model, what), require=require, what=what):
                    results.append(call(**{**arguments, **own}))
            return cast(R, combination.combine(results, arguments))

        return run

    return decorate


def checkpoint_list(checkpoints: object) -> list[CheckpointSource]:
    """``checkpoints=`` as a list of sources, each checked to exist before any pass runs."""
    if isinstance(checkpoints, str | os.PathLike | Mapping) or not isinstance(checkpoints, Sequence):
        raise ConfigurationError(
            f"checkpoints= takes a list of checkpoints (state dicts, files or checkpoint directories), got "
            f"{type(checkpoints).__name__}; wrap a single checkpoint in a list."
        )
    if not checkpoints:
        raise ConfigurationError("checkpoints= is empty: give at least one checkpoint.")
    for index, source in enumerate(checkpoints):
        check_source(
            source,
            describe(source, index) if isinstance(source, str | os.PathLike | Mapping) else f"checkpoints[{index}]",
        )
    return list(checkpoints)


def per_checkpoint_train(train: object, count: int) -> list[GradientStore] | None:
    """``train=`` as one gradient store per checkpoint when it is a list of stores; ``None`` for training data.

    Each store must hold the gradients taken at its checkpoint's weights (checked against the store's record of
    them when it is scored, see :meth:`hookinf.GradientStore.check_weights`).

    Raises:
        ConfigurationError: a single store, or not one store per checkpoint.
    """
    if isinstance(train, GradientStore):
        raise ConfigurationError(
            "checkpoints= with one GradientStore as train: a store holds the training gradients of one set of "
            "weights. Pass one store per checkpoint (train=[store_0, store_1, ...], e.g. from hookinf.log(..., "
            "checkpoints=...)), or the training data, so that each checkpoint's gradients are computed at its weights."
        )
    if not isinstance(train, list | tuple) or not train or not all(isinstance(t, GradientStore) for t in train):
        return None
    if len(train) != count:
        raise ConfigurationError(
            f"train= lists {len(train)} gradient stores for {count} checkpoints: give one store per checkpoint, in the "
            f"order of checkpoints=."
        )
    return list(train)


def per_checkpoint(method: Sequence[Any], count: int) -> list[Curvature]:
    """``method=`` given as one fitted curvature per checkpoint, checked."""
    if len(method) != count:
        raise ConfigurationError(
            f"method= lists {len(method)} curvatures for {count} checkpoints: give one fitted curvature per checkpoint "
            f"(hookinf.fit(..., checkpoints=...) returns them in order)."
        )
    for index, entry in enumerate(method):
        if not isinstance(entry, Curvature):
            raise ConfigurationError(
                f"method[{index}] is a {type(entry).__name__}; a list in method= holds fitted curvatures, one per "
                f"checkpoint. Give a method name (e.g. 'ekfac') to fit at every checkpoint."
            )
    return list(method)


def _keep_list(results: list[Any], arguments: Mapping[str, Any]) -> list[Any]:
    """:func:`hookinf.fit`'s combination: the curvatures, one per checkpoint, in order."""
    return results


def _check_rule(arguments: Mapping[str, Any], count: int) -> None:
    """:func:`hookinf.influence`'s check: ``combine=`` is a rule or ``count`` finite weights."""
    check_combine(arguments["combine"], count)


def _combined_scores(results: list[Any], arguments: Mapping[str, Any]) -> CheckpointScores:
    """:func:`hookinf.influence`'s combination: the checkpoints' scores combined by its ``combine=`` rule."""
    return combine_scores(results, arguments["combine"])


def _combined_self_scores(results: list[Any], arguments: Mapping[str, Any]) -> CheckpointSelfScores:
    """:func:`hookinf.self_influence`'s combination: the checkpoints' self-influence combined by ``combine=``."""
    return combine_self_scores(results, arguments["combine"])


def _own_store(arguments: Mapping[str, Any], index: int) -> dict[str, Any]:
    """:func:`hookinf.log`'s per-checkpoint argument: the store ``path/checkpoint-<k>``."""
    return {"path": Path(arguments["path"]) / f"checkpoint-{index}"}


CURVATURES = Combination(_keep_list)
""":func:`hookinf.fit`'s combination: the list of curvatures, one per checkpoint."""
SCORES = Combination(_combined_scores, _check_rule)
""":func:`hookinf.influence`'s combination: :func:`~hookinf.checkpoint_scores.combine_scores` by ``combine=``."""
SELF_SCORES = Combination(_combined_self_scores, _check_rule)
""":func:`hookinf.self_influence`'s combination: :func:`~hookinf.checkpoint_scores.combine_self_scores`."""
STORES = Combination(_keep_list, per_call=_own_store)
""":func:`hookinf.log`'s combination: one store per checkpoint, at ``path/checkpoint-<k>``, in order."""
