"""``hookinf.watch``: forward/backward hooks that capture per-example gradient factors around the user's loop.

For every tracked module a forward hook computes the activations ``a`` ``[B, S, I]`` (through the module's
adapter) and registers a tensor hook on the module's output; the tensor hook receives ``∂loss/∂output`` during
backward and turns it into ``δ`` ``[B, S, O]``. A *step* (one forward/backward) is complete when the next forward
starts outside of backward, or when its result is asked for (:attr:`Watch.last_step`) or the block ends. Then
every tracked layer must have received a gradient, calls of the same module are summed (concatenated along
``S``), ``δ`` is rescaled for ``loss_reduction="mean"``, and the :class:`~hookinf.capture.Step` is published.

Design notes:
* Output gradients come from tensor hooks, not ``register_full_backward_hook`` (which breaks when an in-place
  activation such as ``nn.ReLU(inplace=True)`` follows the layer).
* Each forward call's tensor hook captures at most once, so a second backward through the same graph
  (``create_graph=True`` optimizers such as AdaHessian) does not add spurious captures.
* Forwards re-run by gradient checkpointing happen inside backward and never close a step, so checkpointed models
  give the same captures as plain ones.
* The model is never modified: all state lives here, and every handle is removed when the block exits.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hookinf.capture import LayerCapture, Step
from hookinf.compress import BoundCompressor, Compressor, require_compressor
from hookinf.curvature import Curvature, LayerShape, statistics_dtype
from hookinf.damping import Damping, as_damping
from hookinf.errors import (
    CaptureError,
    ConfigurationError,
    HookinfError,
    HookinfWarning,
    NestedWatchError,
    NonFiniteGradientError,
    NoTrackableModuleError,
    PatternMatchError,
    UnsupportedModuleError,
)
from hookinf.layers import LayerAdapter, adapter_for, is_supported, supported_types
from hookinf.methods import Method, resolve_method
from hookinf.methods.base import Accumulator
from hookinf.store import GradientStore

if TYPE_CHECKING:
    from hookinf.logger import GradientLogger

LossReduction = Literal["mean", "sum"]
ModuleSpec = str | type[nn.Module]

# Tracked module → the watch that owns it, so a second watch over the same modules is refused.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Watch] = weakref.WeakKeyDictionary()
_HANDLE_PRUNE_AT = 4096


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
) -> Watch:
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
        fit: also accumulate a method's curvature statistics from every step of the loop (``"kfac"``,
            ``"exact"``, ``"identity"``, or ``hookinf.EKFAC(basis=kfac_curvature)`` for EK-FAC's correction pass);
            :meth:`Watch.curvature` returns the result. Run the loop at fixed weights (e.g. a zero learning rate, or
            an evaluation pass) for the statistics of one model, as :func:`hookinf.fit` computes them.
        dtype: the dtype the statistics accumulate in (default: float64 for a float64 model, else float32).
        log_to: also log every step's compressed per-example gradients into a :class:`~hookinf.GradientStore` at
            this directory (resumed when it exists). Tag each batch with its examples' ids before its forward —
            the one line a loop gains: ``w.tag(ids)``. Shards are flushed every ``flush_every`` examples and when
            the block ends (also on an exception: completed steps are kept).
        compress: the compressor (``hookinf.LoGra``, ``hookinf.Dropout``, ``hookinf.Gaussian``) for ``log_to``, and
            for ``fit``: the statistics are then accumulated in the compressed space (as
            ``hookinf.fit(..., compress=...)`` does), so a curvature and a store from the same loop score together —
            ``hookinf.influence(model, store, query, loss_fn, method=w.curvature())`` — with no further pass.
        flush_every: see ``log_to``.

    Returns:
        A :class:`Watch` to enter with ``with``.

    Raises:
        ConfigurationError: ``loss_reduction`` is not one of ``"mean"``, ``"sum"``.
        NoTrackableModuleError: the model has no supported module with trainable parameters.
        PatternMatchError: an entry of ``modules`` matches no trackable module.
        UnsupportedModuleError: a module named in ``modules`` cannot be tracked.
    """
    return Watch(
        model,
        modules=modules,
        loss_reduction=loss_reduction,
        fit=fit,
        dtype=dtype,
        log_to=log_to,
        compress=compress,
        flush_every=flush_every,
    )


@dataclass(eq=False)
class _Call:
    """One forward call of one tracked module, waiting for its output gradient."""

    name: str
    adapter: LayerAdapter
    a: Tensor
    done: bool = False


@dataclass
class _Pending:
    """What the current (not yet closed) step has received."""

    fired: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    calls: list[_Call] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.fired)


class Watch:
    """The context manager returned by :func:`watch`; owns every hook it registers.

    Attributes:
        layers: tracked layer names in model order.
        loss_reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: ModuleSpec | Sequence[ModuleSpec] | None = None,
        loss_reduction: LossReduction = "mean",
        fit: str | Method | None = None,
        dtype: torch.dtype | None = None,
        log_to: str | os.PathLike[str] | None = None,
        compress: Compressor | None = None,
        flush_every: int = 4096,
    ) -> None:
        if loss_reduction not in get_args(LossReduction):
            raise ConfigurationError(
                f"loss_reduction={loss_reduction!r} is not valid; use one of {list(get_args(LossReduction))}."
            )
        self.model = model
        self.loss_reduction: LossReduction = loss_reduction
        selected = select_modules(model, modules)
        self._modules: dict[str, nn.Module] = dict(selected)
        self._adapters: dict[str, LayerAdapter] = {name: adapter_for(name, mod) for name, mod in selected}
        self.layers: tuple[str, ...] = tuple(self._adapters)
        shapes = {name: LayerShape.of(adapter) for name, adapter in self._adapters.items()}
        require_compressor(compress)
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
        self._compress_config = compress.config() if compress is not None else None
        self._bound: BoundCompressor | None = compress.bind(shapes) if compress is not None else None
        self._accumulator: Accumulator | None = None
        if fit is not None:
            method = resolve_method(fit)
            basis = getattr(method, "basis", None)
            if isinstance(basis, Curvature) and basis.extra.get("compressor") != self._compress_config:
                raise ConfigurationError(
                    f"watch(fit=EKFAC(basis=...)): the basis was fitted with compress={basis.extra.get('compressor')}, "
                    f"but this watch has compress={self._compress_config}; pass the compressor the basis was fitted "
                    f"with."
                )
            if not isinstance(method, Method):
                raise ConfigurationError(
                    f"watch(fit={method.name!r}): {method.name} has no statistics to accumulate in advance (it streams "
                    f"over the training data for each set of queries); use 'kfac', 'exact' or hookinf.EKFAC(basis=...)."
                )
            params = [p for m in self._modules.values() for p in m.parameters(recurse=False)]
            fit_shapes = self._bound.shapes if self._bound is not None else shapes
            method.check(fit_shapes)
            self._accumulator = method.accumulator(fit_shapes, statistics_dtype(params, dtype))
        self._logger: GradientLogger | None = None
        self._tag: Tensor | None = None
        if log_to is not None and compress is not None:
            from hookinf.logger import GradientLogger, model_dtype

            self._log_config = (log_to, compress, shapes, model_dtype(self._modules.values()), flush_every)
            self._logger = GradientLogger(*self._log_config, bound=self._bound)
        self._handles: list[RemovableHandle] = []
        self._tensor_handles: list[RemovableHandle] = []
        self._pending = _Pending()
        self._ran: set[str] | None = None  # tracked layers whose forward ran in the current model forward
        self._outputs: list[tuple[str, Tensor, int]] | None = None  # see recording_outputs()
        self._last_step: Step | None = None
        self._steps = 0
        self._open = False

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> Watch:
        if self._open:
            raise NestedWatchError("this watch is already active; a Watch object can be entered only once at a time.")
        for name, module in self._modules.items():
            owner = _ACTIVE.get(module)
            if owner is not None:
                raise NestedWatchError(
                    f"layer '{name}' is already tracked by another active hookinf.watch; nested watches over the "
                    f"same model are not supported. Use the outer watch, or exit it before entering a new one."
                )
        if self._logger is not None and self._logger.closed:  # entered again after an exit: resume the store
            from hookinf.logger import GradientLogger

            self._logger = GradientLogger(*self._log_config, bound=self._bound)
        try:
            for name, module in self._modules.items():
                _ACTIVE[module] = self
                hook = self._make_forward_hook(name, self._adapters[name])
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            # Around the whole model's forward: which tracked layers ran (catches layers whose forward() is
            # never called even when no other layer produces a step).
            # closures, not bound methods: copy.deepcopy(model) would deep-copy a bound method's watch along with it
            self._handles.append(self.model.register_forward_pre_hook(lambda m, a: self._on_model_forward_start(m, a)))
            self._handles.append(self.model.register_forward_hook(lambda m, a, o: self._on_model_forward_end(m, a, o)))
        except BaseException:
            self._close()
            raise
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._finish_step()
            elif self._pending_is_whole():
                # the block raised between batches: the last step's backward had finished, so it is kept (its
                # gradients are logged); never let that mask the user's exception
                with contextlib.suppress(HookinfError):
                    self._finish_step()
        finally:
            self._close()

    def _pending_is_whole(self) -> bool:
        """Whether the open step's backward reached every tracked layer and every forward call it made."""
        pending = self._pending
        return (
            bool(pending)
            and not _in_backward()
            and all(name in pending.fired for name in self.layers)
            and all(call.done for call in pending.calls)
        )

    def _close(self) -> None:
        self._open = False
        if self._logger is not None:
            self._logger.close()  # completed steps are durable even when the block raised
        for handle in self._handles + self._tensor_handles:
            handle.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self._pending = _Pending()
        for module in self._modules.values():
            if _ACTIVE.get(module) is self:
                del _ACTIVE[module]

    # ------------------------------------------------------------------ results
    @property
    def modules(self) -> dict[str, nn.Module]:
        """Tracked layer name → module, in model order."""
        return dict(self._modules)

    @property
    def adapters(self) -> dict[str, LayerAdapter]:
        """Tracked layer name → its adapter (shapes, parameter names), in model order."""
        return dict(self._adapters)

    @property
    def last_step(self) -> Step | None:
        """The most recent complete step (closing the current one if gradients have arrived), or ``None``."""
        self._finish_step()
        return self._last_step

    @property
    def steps(self) -> int:
        """Number of steps completed so far."""
        self._finish_step()
        return self._steps

    def tag(self, ids: Sequence[int] | Tensor) -> None:
        """Names the examples of the next batch (call it before the batch's forward) for ``log_to``."""
        if self._logger is None:
            raise ConfigurationError("tag() names examples for a gradient store: create the watch with log_to=... .")
        self._finish_step()  # the previous batch's step is complete once the next batch is tagged
        self._tag = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)

    @property
    def store(self) -> GradientStore:
        """The gradient store being logged (``log_to``)."""
        if self._logger is None:
            raise ConfigurationError("this watch logs no gradients: create it with log_to=... and compress=... .")
        return self._logger.store

    def curvature(self, damping: float | Damping = 0.1) -> Curvature:
        """The curvature accumulated from every step so far (needs ``watch(model, fit=...)``).

        Args:
            damping: the damping rule stored with it (see :func:`hookinf.fit`).
        """
        if self._accumulator is None:
            raise ConfigurationError(
                "this watch accumulates no statistics: create it with hookinf.watch(model, fit='kfac') (or 'exact', "
                "or hookinf.EKFAC(basis=...))."
            )
        self._finish_step()
        curvature = self._accumulator.finish(as_damping(damping))
        if self._compress_config is not None:
            curvature.extra["compressor"] = self._compress_config
        return curvature

    @contextlib.contextmanager
    def recording_outputs(self) -> Iterator[None]:
        """Records the tracked layers' outputs of the forwards inside the block (see :meth:`gradient_targets`)."""
        self._outputs = []
        try:
            yield
        finally:
            self._outputs = None

    def gradient_targets(self) -> list[Tensor] | None:
        """What to differentiate the loss with respect to so that every output hook fires, with the least work.

        Differentiating with respect to the parameters (what ``loss.backward()`` does) also computes every weight
        gradient, which hookinf never uses: it needs only the output gradients ``δ``. Asking autograd for the
        gradients of the recorded layer *outputs* instead stops the backward at the earliest tracked layer and skips
        all weight-gradient products (about half of a backward's work). A layer whose output was modified in place
        after its forward hook (``nn.ReLU(inplace=True)``) no longer holds the gradient its hook watches, so that
        layer's parameters are used instead. Returns ``None`` (use the parameters) when some tracked layer ran
        without a recorded output, e.g. inside a reentrant checkpoint, whose first forward runs without grad.
        Call it inside :meth:`recording_outputs`, after the forward.
        """
        outputs = self._outputs
        if not outputs or {name for name, _, _ in outputs} != set(self.layers):
            return None
        targets: list[Tensor] = []
        modified: dict[str, None] = {}
        for name, output, version in outputs:
            if output._version == version:
                targets.append(output)
            else:
                modified[name] = None
        for name in modified:
            params = [p for p in self._modules[name].parameters(recurse=False) if p.requires_grad]
            if not params:
                return None
            targets.extend(params)
        return targets

    def per_example_gradients(self) -> dict[str, Tensor]:
        """The last step's per-example gradients per layer as matrices ``[B, O, I]`` (bias as the last column).

        Raises:
            CaptureError: no backward has run inside the watch yet.
        """
        return self._require_step().gradients()

    def per_example_param_gradients(self) -> dict[str, Tensor]:
        """The last step's per-example gradients keyed by parameter name, each ``[B, *param.shape]``."""
        return self._require_step().param_gradients()

    def _require_step(self) -> Step:
        step = self.last_step
        if step is None:
            raise CaptureError(
                "no gradients captured yet: run a forward and loss.backward() inside the watch before asking for "
                "per-example gradients."
            )
        return step

    def __repr__(self) -> str:
        state = "active" if self._open else "inactive"
        return f"Watch({state}, {len(self.layers)} layers, loss_reduction={self.loss_reduction!r}, steps={self._steps})"

    # ------------------------------------------------------------------ hooks
    # A deep copy of the model made inside the block (an EMA twin, a checkpoint copy) carries copies of these hook
    # entries; every hook checks that it runs on the module it was registered on, so copies are inert.
    def _on_model_forward_start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module is not self.model:
            return None
        if self._open and torch.is_grad_enabled() and not _in_backward() and not _in_functorch():
            self._ran = set()
        return None

    def _on_model_forward_end(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if module is not self.model:
            return None
        ran, self._ran = self._ran, None
        if ran is None or not self._open:
            return None
        missing = [name for name in self.layers if name not in ran]
        if missing:
            raise CaptureError(
                f"{len(missing)} tracked layer(s) did not run during the model's forward: "
                f"{', '.join(repr(n) for n in missing)}. {_MISSING_HINT}"
            )
        return None

    def _make_forward_hook(self, name: str, adapter: LayerAdapter) -> Any:
        owner = self._modules[name]

        def forward_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if module is not owner or not self._open or _in_functorch():
                return None  # a deep copy's inherited hook, closed, or inside a torch.func transform
            if self._ran is not None:
                self._ran.add(name)
            if not _in_backward():
                self._finish_step()  # a new forward outside backward: the previous step is complete
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None  # no_grad / frozen path: nothing will flow back
            call = _Call(name, adapter, adapter.activations(adapter.input_tensor(args, kwargs)))
            if self._outputs is not None and not _in_backward():
                self._outputs.append((name, output, output._version))
            self._pending.calls.append(call)
            self._tensor_handles.append(output.register_hook(lambda grad: self._on_output_grad(call, grad)))
            if len(self._tensor_handles) > _HANDLE_PRUNE_AT:
                self._tensor_handles = [h for h in self._tensor_handles if h.hooks_dict_ref() is not None]
            return None

        return forward_hook

    def _on_output_grad(self, call: _Call, grad: Tensor) -> None:
        if not self._open or call.done:
            return None
        call.done = True
        delta = call.adapter.output_gradients(grad.detach())
        if delta.shape[:2] != call.a.shape[:2]:
            raise CaptureError(
                f"layer '{call.name}': output gradient {list(delta.shape)} does not match its activations "
                f"{list(call.a.shape)} in the batch/position dimensions; the module's output was reshaped in a way "
                f"hookinf cannot follow. Exclude the layer with watch(model, modules=[...])."
            )
        self._pending.fired.setdefault(call.name, []).append((call.a, delta))
        return None

    # ------------------------------------------------------------------ step assembly
    def _finish_step(self) -> None:
        if not self._pending:
            # forwards whose backward never came (e.g. an evaluation pass with grad enabled): drop their calls, which
            # hold activations, so they cannot pile up over many forwards
            self._pending.calls.clear()
            return
        fired = self._pending.fired
        self._pending = _Pending()
        for handle in self._tensor_handles:
            handle.remove()
        self._tensor_handles.clear()
        missing = [name for name in self.layers if name not in fired]
        if missing:
            raise CaptureError(
                f"{len(missing)} tracked layer(s) received no output gradient in this forward/backward: "
                f"{', '.join(repr(n) for n in missing)}. Either its output does not reach the loss or "
                f"{_MISSING_HINT}"
            )
        layers: dict[str, LayerCapture] = {}
        batch_size: int | None = None
        first = ""
        for name in self.layers:
            calls = fired[name]
            sizes = sorted({int(a.shape[0]) for a, _ in calls})
            if len(sizes) > 1:
                raise CaptureError(
                    f"layer '{name}' was called with different batch sizes {sizes} within one forward/backward; "
                    f"per-example gradients need one batch per step. Run one backward per batch."
                )
            if batch_size is None:
                batch_size, first = sizes[0], name
            elif sizes[0] != batch_size:
                raise CaptureError(
                    f"layer '{name}' captured a batch of {sizes[0]} examples while layer '{first}' captured "
                    f"{batch_size} in the same forward/backward. Each tracked layer must see the batch as its first "
                    f"dimension: if the model reshapes [B, T, ...] to [B*T, ...] before this layer, exclude it with "
                    f"watch(model, modules=[...]); if the backward mixes batches, run one backward per batch."
                )
            a = calls[0][0] if len(calls) == 1 else torch.cat([c[0] for c in calls], dim=1)
            delta = calls[0][1] if len(calls) == 1 else torch.cat([c[1] for c in calls], dim=1)
            if self.loss_reduction == "mean":
                delta = delta * batch_size
            _check_finite(name, a, delta)
            layers[name] = LayerCapture(name=name, a=a, delta=delta, adapter=self._adapters[name])
        assert batch_size is not None
        self._last_step = Step(index=self._steps, batch_size=batch_size, layers=layers)
        self._steps += 1
        compressed = None
        if self._accumulator is not None:
            if self._bound is not None:  # compressed once, for the statistics and the store alike
                compressed = self._bound.compress(self._last_step)
            self._accumulator.update(compressed if compressed is not None else self._last_step)
        if self._logger is not None:
            tag, self._tag = self._tag, None
            if tag is None:
                raise CaptureError(
                    "a batch was logged without ids: call w.tag(ids) with the batch's example ids before its forward "
                    "(watch(log_to=...) stores every example under its id)."
                )
            self._logger.add(tag, self._last_step, compressed=compressed)


_MISSING_HINT = (
    "A module whose own forward() is never called (e.g. nn.MultiheadAttention uses out_proj's weights directly) "
    "has no captures, and its influence would be silently missing: exclude it with watch(model, modules=[...]) "
    "listing the layers to track."
)


def _in_functorch() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, ...) is running: its tensors are not the user's batch."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _in_backward() -> bool:
    """Whether autograd is executing a backward pass on this thread (true during checkpoint recomputation)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _check_finite(name: str, a: Tensor, delta: Tensor) -> None:
    for what, tensor in (("output gradients", delta), ("input activations", a)):
        # A NaN/inf entry makes the sum non-finite, so one reduction screens the tensor (an overflowing sum of
        # finite values is confirmed or cleared by the full elementwise check).
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteGradientError(
                f"layer '{name}': captured {what} contain NaN or infinity. Check the loss and the inputs of this "
                f"batch (a diverging learning rate or a log of zero are common causes); influence computed from "
                f"them would be meaningless."
            )


def _trackable(module: nn.Module) -> bool:
    return is_supported(module) and any(p.requires_grad for p in module.parameters(recurse=False))


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id → names of every module holding it directly (more than one name: tied weights)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            names = holders.setdefault(id(param), [])
            if name not in names:
                names.append(name)
    return holders


def _tied_elsewhere(name: str, module: nn.Module, holders: dict[int, list[str]]) -> list[str]:
    """Other modules (by name) that hold one of ``module``'s trainable parameters."""
    others: list[str] = []
    for param in module.parameters(recurse=False):
        if param.requires_grad:
            others += [h for h in holders.get(id(param), []) if h != name and h not in others]
    return others


def _check_tied(model: nn.Module, chosen: list[str], explicit: bool) -> list[str]:
    """Refuses (or, for the default selection, leaves out with a warning) layers whose weights are tied.

    A tracked module only sees its own use of a parameter; if another module also uses it (GPT-2's ``lm_head``
    shares ``transformer.wte``'s weight) the captured gradient would miss that use and every score through the
    layer would be wrong.
    """
    holders = _holders(model)
    by_name = dict(model.named_modules())
    kept: list[str] = []
    for name in chosen:
        others = _tied_elsewhere(name, by_name[name], holders)
        if not others:
            kept.append(name)
            continue
        shown = ", ".join(f"'{o}' ({type(model.get_submodule(o)).__name__})" for o in others)
        message = (
            f"layer '{name}' shares a trainable parameter with {shown}; hookinf sees only '{name}''s own use of "
            f"it, so its per-example gradient would be partial. Exclude it with watch(model, modules=[...]) or untie "
            f"the weights."
        )
        if explicit or any(o in chosen for o in others):
            raise UnsupportedModuleError(message)
        warnings.warn(f"{message} It is left out of the default selection.", HookinfWarning, stacklevel=5)
    return kept


def select_modules(model: nn.Module, modules: ModuleSpec | Sequence[ModuleSpec] | None) -> list[tuple[str, nn.Module]]:
    """Resolves a ``modules=`` selection to ``(qualified name, module)`` pairs in model order.

    Args:
        model: the model.
        modules: ``None`` (every supported module with a trainable parameter of its own), or names, glob
            patterns and module types (one or a list).

    Returns:
        The selected modules in ``model.named_modules()`` order.

    Raises:
        NoTrackableModuleError: nothing to track.
        PatternMatchError: an entry matches no trackable module.
        UnsupportedModuleError: an exact name refers to a module that cannot be tracked.
        ConfigurationError: an entry is neither a string nor a module type.
    """
    named = list(model.named_modules())
    if modules is None:
        chosen = {name for name, module in named if _trackable(module)}
        if not chosen:
            kinds = sorted({type(m).__name__ for _, m in named})
            raise NoTrackableModuleError(
                f"{type(model).__name__} has no supported module with trainable parameters (it contains: "
                f"{', '.join(kinds)}). Supported types: {', '.join(supported_types())}. Check that the parameters "
                f"you want to attribute have requires_grad=True."
            )
        kept = set(_check_tied(model, [name for name, _ in named if name in chosen], explicit=False))
        if not kept:
            raise NoTrackableModuleError(
                f"{type(model).__name__}'s only supported trainable modules share their weights with other modules "
                f"(see the warning above); nothing can be tracked without a partial gradient."
            )
        return [(name, module) for name, module in named if name in kept]
    specs: Iterable[ModuleSpec] = [modules] if isinstance(modules, str | type) else modules
    by_name = dict(named)
    chosen = set()
    for spec in specs:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            matches = [name for name, module in named if isinstance(module, spec)]
            label = f"type {spec.__name__}"
        elif isinstance(spec, str):
            if spec in by_name:
                module = by_name[spec]
                if not is_supported(module):
                    adapter_for(spec, module)  # raises UnsupportedModuleError listing the supported types
                if not any(p.requires_grad for p in module.parameters(recurse=False)):
                    raise UnsupportedModuleError(
                        f"layer '{spec}' has no trainable parameter of its own (requires_grad=False); a frozen "
                        f"layer has no influence to attribute. Unfreeze it or remove it from modules=."
                    )
                chosen.add(spec)
                continue
            matches = [name for name, _ in named if fnmatch.fnmatchcase(name, spec)]
            label = f"pattern {spec!r}"
        else:
            raise ConfigurationError(
                f"modules= entries must be qualified names, glob patterns or nn.Module types; got {spec!r}."
            )
        hits = [name for name in matches if _trackable(by_name[name])]
        if not hits:
            if matches:
                shown = ", ".join(repr(m) for m in matches[:5])
                detail = (
                    f"matched {len(matches)} module(s) ({shown}) but none is a supported module with trainable "
                    f"parameters"
                )
            else:
                close = difflib.get_close_matches(str(spec), list(by_name), n=3)
                detail = "matched no module" + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "")
            raise PatternMatchError(
                f"modules= {label} {detail}. Trackable layers of this model: "
                f"{', '.join(repr(n) for n, m in named if _trackable(m)) or 'none'}."
            )
        chosen.update(hits)
    _check_tied(model, [name for name, _ in named if name in chosen], explicit=True)
    return [(name, module) for name, module in named if name in chosen]
