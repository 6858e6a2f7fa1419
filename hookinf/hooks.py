"""``Watch``: the forward/backward hooks that capture per-example gradient factors around the user's loop.

A forward hook per tracked module keeps its input and registers a tensor hook on the module's output, which receives
``∂loss/∂output`` in backward and turns it into ``δ`` ``[B, S, O]``; the activations ``a`` ``[B, S, I]`` (through
the module's adapter: a convolution's unfolded patches) are formed then, or — in a watch without consumers — only
when the step is read (:func:`hookinf.assembly.received`). A *step* (one forward/backward) is complete when the
next forward starts outside of backward, or when its result is asked for (:attr:`Watch.last_step`) or the block
ends. Then every tracked layer must have received a gradient, calls of one module are concatenated along ``S``,
``δ`` is rescaled for ``loss_reduction="mean"``, and the :class:`~hookinf.capture.Step` goes to the watch's
consumers (:mod:`hookinf.pipeline`). The watch owns its hooks and nothing else.

Given a :class:`~hookinf.pipeline.FactorMap` (a compressor), the hooks keep only the mapped factors (``a P_inᵀ``,
``δ P_outᵀ``), never the full-width ones. Finiteness is checked on the raw tensors in the hooks (one fused flag per
device and step, read a step late). A watch with consumers holds its last step weakly.

Design notes: output gradients come from tensor hooks, not ``register_full_backward_hook`` (which breaks with
in-place activations); each forward call captures at most once (a ``create_graph=True`` second backward adds
nothing); forwards re-run by gradient checkpointing happen inside backward and never close a step; the model is
never modified — not even a hook is stored on it: the forward hooks are two global module hooks that look the module
up by identity, so a deep copy made inside the block carries none — and every handle is removed when the block
exits, whatever a consumer raises.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

from hookinf.assembly import MISSING_HINT, Call, Pending, assemble, check_received, finite_check, received
from hookinf.autograd import in_backward, in_functorch, without_autocast
from hookinf.capture import FiniteCheck, Step
from hookinf.distributed import unwrap
from hookinf.errors import CaptureError, ConfigurationError, HookinfError, NestedWatchError
from hookinf.ids import Ids, as_ids
from hookinf.layers import LayerAdapter
from hookinf.pipeline import Consumer, FactorMap, close_all
from hookinf.selection import ModuleSpec, Selection, select

LossReduction = Literal["mean", "sum"]

# Tracked module → the watch that owns it, so a second watch over the same modules is refused.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Watch] = weakref.WeakKeyDictionary()
_HANDLE_PRUNE_AT = 4096


class Watch:
    """Owns the hooks on the tracked layers of a model and emits one :class:`~hookinf.capture.Step` per backward.

    :func:`hookinf.watch` builds one (with the consumers its ``fit=`` and ``log_to=`` ask for); hookinf's one-call
    helpers and the Trainer callback build theirs from the same parts.

    Args:
        model: the model; it is never modified (no module replaced, no attribute added). A
            ``DistributedDataParallel`` (or ``DataParallel``) wrapper is looked through: the layers are its inner
            module's, named without the ``module.`` prefix, as the one-call helpers name them.
        modules: what to track (see :func:`hookinf.watch`), or an already resolved
            :class:`~hookinf.selection.Selection`.
        loss_reduction: ``"mean"`` or ``"sum"`` (see :func:`hookinf.watch`).
        consumers: what receives every finished step, in order (:class:`~hookinf.pipeline.Consumer`); each is
            closed when the block ends. A watch with consumers holds no finished step itself (see
            :attr:`last_step`).
        factor_map: maps every layer's factors inside the hooks (a bound compressor, so that only the compressed
            factors are ever held); the steps then hold the mapped factors. ``None``: the canonical factors.

    Attributes:
        layers: tracked layer names in model order.
        loss_reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: ModuleSpec | Sequence[ModuleSpec] | Selection | None = None,
        loss_reduction: LossReduction = "mean",
        consumers: Sequence[Consumer] = (),
        factor_map: FactorMap | None = None,
    ) -> None:
        if loss_reduction not in get_args(LossReduction):
            raise ConfigurationError(
                f"loss_reduction={loss_reduction!r} is not valid; use one of {list(get_args(LossReduction))}."
            )
        model = unwrap(model)
        self.model = model
        self.loss_reduction: LossReduction = loss_reduction
        self.selection = select(model, modules)
        self._modules = self.selection.modules
        self._names = {id(module): name for name, module in self._modules.items()}
        self._adapters = self.selection.adapters
        self.layers: tuple[str, ...] = self.selection.layers
        self.consumers: tuple[Consumer, ...] = tuple(consumers)
        self.factor_map = factor_map
        # No consumer and no map: keep each layer's input and form its activations only when the step is read
        # (a convolution's unfolded patches are k² times its input); else they are formed in backward.
        self._deferred = factor_map is None and not self.consumers
        self._handles: list[RemovableHandle] = []
        self._tensor_handles: list[RemovableHandle] = []
        self._pending = Pending()
        self._ran: set[str] | None = None  # tracked layers whose forward ran in the current model forward
        self._outputs: list[tuple[str, Tensor, int]] | None = None  # see recording_outputs()
        self._tag: Ids | None = None
        self._unverified: FiniteCheck | None = None  # the last step's finiteness, not read yet
        self._last_step: Step | weakref.ref[Step] | None = None  # weak when consumers hold the steps
        self._steps = 0
        self._open = False

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> Watch:
        if self._open:
            raise NestedWatchError("this watch is already active; a Watch object can be entered only once at a time.")
        for name, module in self._modules.items():
            if _ACTIVE.get(module) is not None:
                raise NestedWatchError(
                    f"layer '{name}' is already tracked by another active hookinf.watch; nested watches over the "
                    f"same model are not supported. Use the outer watch, or exit it before entering a new one."
                )
        try:
            for module in self._modules.values():
                _ACTIVE[module] = self
            # Global module hooks (torch.nn.modules.module.register_module_forward_hook), matched to the tracked
            # modules by identity: no hook is stored on any module, so a deep copy of the model made inside the block
            # (an EMA twin, a checkpoint copy) carries none, pickles, and is never captured.
            self._handles.append(register_module_forward_pre_hook(self._on_forward_start))
            self._handles.append(register_module_forward_hook(self._on_forward_end, with_kwargs=True))
        except BaseException:
            self._remove_hooks()
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
                self.verify()
            elif self._pending_is_whole():
                # the block raised between batches: the last step's backward had finished, so it is kept (e.g. its
                # gradients are logged); never let that mask the user's exception
                with contextlib.suppress(HookinfError):
                    self._finish_step()
        finally:
            self._close()

    def _pending_is_whole(self) -> bool:
        """Whether the open step's backward reached every tracked layer and every forward call it made."""
        return not in_backward() and self._pending.is_whole(self.layers)

    def _close(self) -> None:
        """Closes the consumers (completed steps become durable), then removes every hook whatever they raised."""
        self._open = False
        try:
            close_all(self.consumers)
        finally:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles + self._tensor_handles:
            handle.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self._pending = Pending()
        self._tag = None
        self._unverified = None
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
        """The most recent complete step (closing the current one if gradients have arrived), or ``None``.

        A watch without consumers keeps its last step until the next one closes. A watch with consumers (``fit=``,
        ``log_to=``) keeps none once they have it, so read it right after the backward (reading it closes the step);
        once a later batch's forward or :meth:`tag` closed it, it is ``None`` unless a consumer still holds it.
        """
        return self._finish_step() or self._recall()

    def _recall(self) -> Step | None:
        last = self._last_step
        return last() if isinstance(last, weakref.ref) else last

    @property
    def steps(self) -> int:
        """Number of steps completed so far."""
        self._finish_step()
        return self._steps

    def tag(self, ids: Sequence[int] | Sequence[str] | Tensor) -> None:
        """Names the examples of the next batch (call it before its forward): integers or strings.

        Raises:
            DataError: a non-integer float or boolean id, or strings mixed with numbers.
        """
        self._finish_step()  # the previous batch's step is complete once the next batch is tagged
        self._tag = as_ids(ids, "w.tag(ids)")

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

    def verify(self) -> None:
        """Reads the finiteness of the steps not checked yet (one host read per device; a no-op when all are).

        Each step's check is computed on the device when it closes and read when the next one closes (or at the end
        of the block, or here), so watched steps wait on no device-to-host read of their own.

        Raises:
            NonFiniteGradientError: a step's captured activations or output gradients hold NaN or infinity.
        """
        check, self._unverified = self._unverified, None
        if check is not None:
            check.raise_if_not_finite()

    def _require_step(self) -> Step:
        step = self._finish_step() or self._recall()
        self.verify()  # the caller is about to use these numbers
        if step is None and self._steps:
            raise CaptureError(
                "the last step went to this watch's consumers (fit=/log_to=), which keep no step for later: ask for "
                "per-example gradients right after loss.backward(), before the next batch's forward or tag()."
            )
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
    # Two global hooks see every module call in the process while the block runs; each looks the module up by identity
    # (one dict lookup) and returns at once for any module that is neither the model nor a tracked layer.
    def _on_forward_start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module is self.model:
            self._on_model_forward_start()

    def _on_forward_end(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        name = self._names.get(id(module))
        if name is not None and self._modules[name] is module:
            self._on_layer_forward(name, args, kwargs, output)
        if module is self.model:
            self._on_model_forward_end()

    def _on_model_forward_start(self) -> None:
        if self._open and torch.is_grad_enabled() and not in_backward() and not in_functorch():
            self._ran = set()
            if not self._pending:
                self._pending = Pending()  # calls of earlier forwards whose backward never came
        return None

    def _on_model_forward_end(self) -> None:
        ran, self._ran = self._ran, None
        if ran is None or not self._open:
            return None
        missing = [name for name in self.layers if name not in ran]
        if missing:
            raise CaptureError(
                f"{len(missing)} tracked layer(s) did not run during the model's forward: "
                f"{', '.join(repr(n) for n in missing)}. {MISSING_HINT}"
            )
        return None

    def _on_layer_forward(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self._open or in_functorch():
            return  # closed, or inside a torch.func transform
        if self._ran is not None:
            self._ran.add(name)
        if not in_backward():
            self._finish_step()  # a new forward outside backward: the previous step is complete
        if not isinstance(output, Tensor) or not output.requires_grad:
            return  # no_grad / frozen path: nothing will flow back
        adapter, weight = self._adapters[name], self._modules[name].weight
        x = adapter.input_tensor(args, kwargs).detach()
        dtype = weight.dtype if isinstance(weight, Tensor) else x.dtype
        self._pending.flags.append((name, "input activations", self._pending.input_finite(x)))
        fmap = self.factor_map
        with without_autocast(x.device.type):
            x = x.to(dtype)  # under autocast a float32 layer may get a bfloat16 input: capture in the weight's dtype
            a = x if fmap is None else fmap.activations(name, adapter, x)  # a formed in backward (received)
        size = adapter.positions(x) if fmap is None else ()  # the input's shape checked now, its activations later
        call = Call(name, adapter, a, dtype, size=size)
        if self._outputs is not None and not in_backward():
            self._outputs.append((name, output, output._version))
        self._pending.calls.append(call)
        self._tensor_handles.append(output.register_hook(lambda grad: self._on_output_grad(call, grad)))
        if len(self._tensor_handles) > _HANDLE_PRUNE_AT:
            self._tensor_handles = [h for h in self._tensor_handles if h.hooks_dict_ref() is not None]

    def _on_output_grad(self, call: Call, grad: Tensor) -> None:
        if not self._open or call.done:
            return None
        call.done = True
        a, delta = received(self._pending, call, grad, self.factor_map, self._deferred)
        self._pending.fired.setdefault(call.name, []).append((a, delta))
        return None

    # ------------------------------------------------------------------ step assembly
    def _finish_step(self) -> Step | None:
        """Closes the open step when its gradients have arrived, hands it to the consumers and returns it."""
        if not self._pending:
            # forwards whose backward never came (e.g. an evaluation pass with grad enabled): drop their calls, which
            # hold activations, so they cannot pile up over many forwards — but not those of the model forward now
            # running (`_ran` is set), whose backward is still to come
            if self._ran is None:
                self._pending = Pending()
            return None
        fired, flags, versions = self._pending.fired, self._pending.flags, self._pending.versions
        self._pending = Pending()
        for handle in self._tensor_handles:
            handle.remove()
        self._tensor_handles.clear()
        check_received(fired, self.layers)
        deferred = versions if self._deferred else None
        layers, batch_size = assemble(fired, self._adapters, self.loss_reduction, self.factor_map, deferred)
        del fired  # the raw per-call factors go as soon as the step's are built
        self.verify()  # the previous step's check, one step late: its device work is long done
        tag, self._tag = self._tag, None
        finite = finite_check(flags, self.layers)
        step = Step(index=self._steps, batch_size=batch_size, layers=layers, ids=tag, finite=finite)
        self._unverified = step.finite
        self._last_step = weakref.ref(step) if self.consumers else step
        self._steps += 1
        for consumer in self.consumers:
            consumer.consume(step)
        return step
