"""The one data path: a :class:`~hookinf.Watch` hands every finished :class:`~hookinf.capture.Step` to consumers.

A *transform* maps a step to a step in the same canonical form (``a`` ``[B, S, I]``, ``δ`` ``[B, S, O]`` per layer):
a :class:`Rescale`, a bound compressor's ``compress``. A transform that is linear per position and per factor can run
earlier, inside the hooks, as a :class:`FactorMap`: a compressor projects ``a`` in the forward hook and ``δ`` in the
gradient hook, so the watch holds only the compressed ``[B, S, r]`` factors between forward and backward.
A *consumer* takes steps and is closed once when the watch's
block ends: curvature accumulators (:class:`hookinf.methods.base.Accumulator`), the gradient logger
(:class:`hookinf.logger.GradientLogger`), the :class:`Collect` queue the one-call helpers read, and whatever a
later feature adds. A :class:`Pipeline` is a consumer that applies transforms once and fans the result out, so a
step is compressed once for the statistics and the store alike.

Nothing here registers a hook or knows a method, a store or a compressor: those modules depend on this one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from torch import Tensor

from hookinf.capture import LayerCapture, Step
from hookinf.errors import CaptureError
from hookinf.layers import LayerAdapter

Transform = Callable[[Step], Step]
"""A map from a step to a step of the same examples (compression, rescaling)."""


@runtime_checkable
class Consumer(Protocol):
    """Anything that takes finished steps: ``consume`` once per step, ``close`` once at the end of the block."""

    def consume(self, step: Step) -> None:
        """Takes one finished step."""

    def close(self) -> None:
        """Ends the consumer's work (flushes what it buffers); called once, also when the block raised."""


@runtime_checkable
class FactorMap(Protocol):
    """Maps a layer's factors while they are captured (inside the hooks), then builds the layer's capture.

    A :class:`~hookinf.Watch` given one calls :meth:`activations` in each forward hook and :meth:`output_gradients`
    in each gradient hook and keeps only what they return; when the step closes it concatenates a layer's calls
    along ``S``, applies the ``loss_reduction`` scale to the mapped ``δ`` and calls :meth:`capture`. Both maps must
    act on each position (and, for ``δ``, linearly), so that concatenating and scaling after them is the same as
    before them. A bound compressor is one (:class:`hookinf.compress.BoundCompressor`).
    """

    def activations(self, layer: str, adapter: LayerAdapter, x: Tensor) -> Tensor:
        """The module's input ``x`` → the mapped activations ``[B, S, ·]``."""
        ...

    def output_gradients(self, layer: str, delta: Tensor) -> Tensor:
        """Output gradients ``δ`` ``[B, S, O]`` → the mapped ``[B, S, ·]``."""
        ...

    def capture(self, layer: str, a: Tensor, delta: Tensor, adapter: LayerAdapter) -> LayerCapture:
        """The layer's capture from the mapped, concatenated and scaled factors of one step."""
        ...


def close_all(consumers: Iterable[Consumer]) -> None:
    """Closes every consumer, even when one raises; re-raises the first error after all were closed."""
    error: BaseException | None = None
    for consumer in consumers:
        try:
            consumer.close()
        except BaseException as err:
            error = error or err
    if error is not None:
        raise error


class Pipeline:
    """Transforms applied in order, then every consumer, for each step (itself a :class:`Consumer`).

    Args:
        consumers: what receives the transformed steps, in order.
        transforms: step → step maps applied once per step before the consumers see it.
    """

    def __init__(self, consumers: Sequence[Consumer], transforms: Sequence[Transform] = ()) -> None:
        self.consumers = tuple(consumers)
        self.transforms = tuple(transforms)

    def consume(self, step: Step) -> None:
        """Transforms ``step`` and hands the result to every consumer."""
        for transform in self.transforms:
            step = transform(step)
        for consumer in self.consumers:
            consumer.consume(step)

    def close(self) -> None:
        """Closes every consumer (all of them, even when one raises)."""
        close_all(self.consumers)

    def __repr__(self) -> str:
        names = ", ".join(type(c).__name__ for c in self.consumers)
        return f"Pipeline({len(self.transforms)} transform(s) → {names})"


@dataclass(frozen=True)
class Rescale:
    """Multiplies every layer's output gradients ``δ`` by a factor: a number, or a function of the step.

    A gradient is linear in ``δ`` (``g = Σ_s δ_s a_sᵀ``), so this rescales every per-example gradient of the step;
    the Trainer callback uses it to undo the Trainer's measured loss weight per micro-batch. The function may return
    a 0-dim tensor on the device (the factor is then never read on the host).
    """

    factor: float | Callable[[Step], float | Tensor]

    def __call__(self, step: Step) -> Step:
        """The step with ``δ × factor`` in every layer."""
        factor = self.factor(step) if callable(self.factor) else self.factor
        if not isinstance(factor, Tensor) and factor == 1.0:
            return step
        layers = {
            name: capture.with_delta(capture.delta * _on(factor, capture.delta))
            for name, capture in step.layers.items()
        }
        return replace(step, layers=layers)


def _on(factor: float | Tensor, like: Tensor) -> float | Tensor:
    return factor.to(device=like.device, dtype=like.dtype) if isinstance(factor, Tensor) else factor


class Collect:
    """A queue of finished steps for code that drives the model itself and reads each step back (FIFO)."""

    def __init__(self) -> None:
        self._steps: deque[Step] = deque()

    def consume(self, step: Step) -> None:
        """Queues ``step``."""
        self._steps.append(step)

    def take(self) -> Step:
        """The oldest queued step.

        Raises:
            CaptureError: no step is queued.
        """
        if not self._steps:
            raise CaptureError("no captured step is waiting: the loss did not reach any tracked layer.")
        return self._steps.popleft()

    def __len__(self) -> int:
        return len(self._steps)

    def close(self) -> None:
        """Drops what was not taken."""
        self._steps.clear()
