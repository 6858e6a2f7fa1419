"""Passes over training data inside one watch: the data path every one-call helper shares (internal).

``Passes.steps(data, description)`` runs ``loss_fn`` on each batch inside the watch, differentiates the summed loss
with ``torch.autograd.grad`` with respect to the tracked layers' outputs (so no weight gradient is formed and ``.grad``
is never touched; see :meth:`hookinf.Watch.gradient_targets`) and yields the captured (and, with a compressor,
compressed) :class:`~hookinf.capture.Step`; a :class:`~hookinf.GradientStore` yields its stored gradients instead.
A graph holding a reentrant checkpoint (``torch.utils.checkpoint(..., use_reentrant=True)``, which refuses
``torch.autograd.grad``) is differentiated with ``backward()``, and every ``.grad`` it touches is put back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from hookinf.capture import Step
from hookinf.compress import Compressor, require_compressor
from hookinf.curvature import Curvature, LayerShape, fingerprint, statistics_dtype
from hookinf.damping import Damping, as_damping
from hookinf.errors import CaptureError, ConfigurationError, CurvatureError, DataError
from hookinf.losses import Fisher, SampledLoss, check_fisher
from hookinf.methods import EKFAC, KFAC, Method, Passes, Preconditioned, QueryMethod, resolve_method
from hookinf.progress import PassProgress
from hookinf.store import GradientStore, store_step
from hookinf.watch import Watch

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch)`` → per-example losses ``[B]`` or their sum (a scalar)."""


class DataPasses:
    """Runs passes of ``loss_fn`` over data inside one watch and yields the captured steps."""

    def __init__(
        self, model: nn.Module, w: Watch, loss_fn: LossFn, progress: bool, compress: Compressor | None
    ) -> None:
        self.model = model
        self.watch = w
        self.loss_fn = loss_fn
        self.progress = progress
        self.params = [p for m in w.modules.values() for p in m.parameters(recurse=False) if p.requires_grad]
        shapes = {name: LayerShape.of(adapter) for name, adapter in w.adapters.items()}
        require_compressor(compress)
        self.compressor = compress.bind(shapes) if compress is not None else None
        self.shapes = self.compressor.shapes if self.compressor is not None else shapes
        self.compress_config = compress.config() if compress is not None else None
        self.counts: dict[int, set[int]] = {}  # id(data) → example counts of its passes

    def curvature(
        self,
        method: str | Method | QueryMethod | Curvature,
        train: Iterable[Any] | GradientStore,
        damping: float | Damping | None,
        dtype: torch.dtype | None,
        fisher: Fisher,
    ) -> Curvature | Streaming:
        """What preconditions the queries: a fitted curvature (checked), a fit of ``method``, or a query method.

        A query method (DataInf, LiSSA) comes back bound to the passes over ``train`` it will stream over.
        """
        check_fisher(fisher, self.loss_fn)
        if isinstance(method, Curvature):
            check_compressor(method, self.compress_config)
            method.check_compatible(self.shapes)
            return method if damping is None else method.with_damping(as_damping(damping))
        resolved = resolve_method(method)
        basis = getattr(resolved, "basis", None)
        if isinstance(basis, Curvature):
            check_compressor(basis, self.compress_config, "the EKFAC(basis=...) ")
        damp = as_damping(0.1 if damping is None else damping)
        resolved.check(self.shapes)
        if isinstance(train, GradientStore) and isinstance(resolved, KFAC | EKFAC):
            raise ConfigurationError(
                f"method={resolved.name!r} needs the projected activations and output gradients, which a gradient "
                f"store does not keep (only their products). Fit it on the data with the store's compressor — "
                f"hookinf.fit(model, train_data, loss_fn, method={resolved.name!r}, compress=<the store's "
                f"compressor>) — and pass that curvature as method=; or use 'exact', 'datainf', 'lissa' or 'identity'."
            )

        def passes(description: str) -> Iterator[Step]:
            # sampled Fisher: every pass draws the same labels (one seeded generator per pass), so a method's passes
            # all see one set of sampled gradients — EK-FAC's correction lives in the eigenbasis of those very
            # gradients, and replaying the first pass from memory (EKFAC(cache_bytes=...)) changes nothing
            generator = torch.Generator().manual_seed(0) if fisher == "sampled" else None
            return self.steps(train, description, generator)

        if isinstance(resolved, QueryMethod):
            return Streaming(resolved, passes, damp)
        curvature = resolved.fit(passes, self.shapes, damp, statistics_dtype(self.params, dtype))
        if self.compress_config is not None:
            curvature.extra["compressor"] = self.compress_config
        return curvature

    def precondition(
        self, solver: Curvature | Streaming, queries: dict[str, Tensor], train: Iterable[Any]
    ) -> Preconditioned:
        """``(G_l + λ_l I)⁻¹`` (or the method's approximation) applied to ``[n, O, I]`` gradients per layer."""
        if isinstance(solver, Curvature):
            return Preconditioned({n: solver.apply(n, q) for n, q in queries.items()}, solver.lambdas)
        return solver.method.precondition(queries, solver.passes, self.shapes, solver.damping)

    def steps(
        self, data: Iterable[Any] | GradientStore, description: str, sample: torch.Generator | None = None
    ) -> Iterator[Step]:
        """One pass over ``data``; with ``sample``, the loss uses labels drawn from the model (sampled Fisher).

        A :class:`GradientStore` yields its stored (already compressed) gradients chunk by chunk.
        """
        if isinstance(data, GradientStore):
            yield from self._store_steps(data, description, sample)
            return
        seen = 0
        total = len(data) if isinstance(data, Sized) else None
        with PassProgress(description, total, enabled=self.progress) as bar:
            for batch in data:
                step = self.step(batch, description, sample)
                seen += step.batch_size
                yield self.compressor.compress(step) if self.compressor is not None else step
                bar.advance(step.batch_size)
        self.counts.setdefault(id(data), set()).add(seen)

    def _store_steps(self, store: GradientStore, description: str, sample: torch.Generator | None) -> Iterator[Step]:
        if sample is not None:
            raise ConfigurationError(
                "fisher='sampled' needs the model's predictions on the training data, which a gradient store does not "
                "hold; fit the curvature on the data (hookinf.fit(..., compress=..., fisher='sampled')) and pass it."
            )
        assert self.compressor is not None
        store.check(
            compressor=self.compress_config or {},
            original=self.compressor.original,
            fingerprint=fingerprint(self.compressor.original),
        )
        with PassProgress(description, len(store.shards), enabled=self.progress) as bar:
            for index, (_, gradients) in enumerate(store.chunks()):
                step = store_step(index, gradients, store.layers)
                yield step
                bar.advance(step.batch_size)

    def step(self, batch: Any, description: str, sample: torch.Generator | None = None) -> Step:
        """Runs ``loss_fn`` on one batch, differentiates it and returns the captured step."""
        before = self.watch.steps
        with torch.enable_grad(), self.watch.recording_outputs():
            if sample is not None:
                assert isinstance(self.loss_fn, SampledLoss)
                losses = self.loss_fn.sampled(self.model, batch, sample)
            else:
                losses = self.loss_fn(self.model, batch)
            if not isinstance(losses, Tensor) or losses.dim() > 1:
                shape = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise DataError(
                    f"loss_fn must return per-example losses of shape [B] or their sum (a scalar); got {shape}."
                )
            if not losses.requires_grad:
                raise DataError(
                    "loss_fn returned a loss that does not require grad: does it run under torch.no_grad() or "
                    "detach the output? hookinf needs to differentiate it."
                )
            differentiate(losses.sum(), self.watch.gradient_targets() or self.params, self.model)
        if self.watch.steps == before:
            raise CaptureError(
                f"the loss of a {description} batch does not depend on any tracked layer "
                f"({', '.join(self.watch.layers)}); check loss_fn and modules=."
            )
        step = self.watch.last_step
        assert step is not None
        if losses.dim() == 1 and losses.shape[0] != step.batch_size:
            raise DataError(
                f"loss_fn returned {losses.shape[0]} losses for a batch of {step.batch_size} examples; return "
                f"one loss per example (shape [B]) or their sum."
            )
        return step

    def check_count(self) -> None:
        """Refuses a ``train`` that yielded a different number of examples on different passes."""
        for counts in self.counts.values():
            if len(counts) > 1:
                raise DataError(
                    f"train yielded {sorted(counts)} examples on different passes; it must yield the same examples "
                    f"in the same order each time it is iterated (no shuffling, no random augmentation of the count)."
                )


def differentiate(loss: Tensor, targets: Sequence[Tensor], model: nn.Module) -> None:
    """Runs the backward of ``loss`` far enough to reach ``targets`` (firing the watch's hooks); keeps no gradient.

    ``torch.autograd.grad`` where possible. A reentrant checkpoint in the graph runs only under ``backward()``
    (``torch.utils.checkpoint`` raises otherwise), so then the ``.grad`` of every parameter of ``model`` and of every
    other leaf of the graph is saved and restored around it: the user's model is left as it was.
    """
    leaves = _reentrant_checkpoint_leaves(loss)
    if leaves is None:
        torch.autograd.grad(loss, targets, allow_unused=True)
        return
    known = {id(leaf) for leaf in leaves}
    leaves += [p for p in model.parameters() if p.requires_grad and id(p) not in known]
    saved = [leaf.grad for leaf in leaves]
    try:
        for leaf in leaves:
            leaf.grad = None
        loss.backward()
    finally:
        for leaf, grad in zip(leaves, saved, strict=True):
            leaf.grad = grad


def _reentrant_checkpoint_leaves(loss: Tensor) -> list[Tensor] | None:
    """The graph's leaves when it holds a reentrant checkpoint, else ``None`` (a walk over ``loss``'s graph).

    The parameters used inside a checkpointed segment are not in this graph (its first forward ran without grad);
    :func:`differentiate` adds the model's parameters for them.
    """
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    leaves: list[Tensor] = []
    found = False
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name == "CheckpointFunctionBackward":
            found = True
        elif name == "AccumulateGrad":
            leaves.append(node.variable)  # type: ignore[attr-defined]  # AccumulateGrad holds its leaf
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves if found else None


@dataclass(frozen=True)
class Streaming:
    """A query method bound to the training passes it streams over."""

    method: QueryMethod
    passes: Passes
    damping: Damping


def check_compressor(curvature: Curvature, config: dict[str, Any] | None, what: str = "this ") -> None:
    """Refuses a curvature fitted in another (or no) compressed space than the one it is used in."""
    fitted_with = curvature.extra.get("compressor")
    if fitted_with != config:
        raise CurvatureError(
            f"{what}{curvature.method} curvature was fitted with compress={fitted_with} but is used with "
            f"compress={config}; pass the same compressor as when fitting it."
        )


def check_reiterable(data: Iterable[Any] | GradientStore, what: str) -> None:
    """Refuses data that would not give the same examples in the same order on every pass."""
    if isinstance(data, GradientStore):
        return
    if isinstance(data, DataLoader) and order_changes(data):
        raise DataError(
            f"{what} is a DataLoader whose order changes between passes (shuffle=True or a random sampler); "
            f"hookinf iterates it more than once and column j of the scores must be the same example each time. "
            f"Use shuffle=False and a sequential sampler."
        )
    if iter(data) is data:
        raise DataError(
            f"{what} is an iterator that can be consumed only once; pass a list of batches or a DataLoader."
        )


def order_changes(loader: DataLoader[Any]) -> bool:
    """Whether two passes over ``loader`` would visit the examples in different orders (indices only)."""
    if isinstance(loader.sampler, RandomSampler):
        return True
    if isinstance(loader.dataset, IterableDataset):
        return False
    order: Iterable[Any] = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    return list(order) != list(order)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Runs the block with every module in eval mode (dropout off), restoring each module's own flag after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
