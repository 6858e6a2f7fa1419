"""Per-example losses that can also draw labels from the model, for the true (sampled) Fisher.

``fisher="empirical"`` builds the curvature from gradients of the losses at the given labels; ``fisher="sampled"``
from gradients at labels drawn from the model's own predictive distribution, which makes ``G`` the true Fisher
(equal to the Gauss-Newton matrix for cross-entropy) as K-FAC/EK-FAC implementations use it (Martens & Grosse 2015;
Grosse et al. 2023, §2.2). A loss supports sampling when it has a ``sampled(model, batch, sampler)`` method
(:class:`SampledLoss`); :class:`CrossEntropy` covers classification and language modelling.

Randomness: every pass over the training data draws fresh labels from its own :class:`Sampler`, seeded from the
fit's ``seed`` and the pass's index (:func:`pass_seed`), so the passes of a fit differ (EK-FAC's correction pass does
not reuse the draws that fitted its eigenbasis) while a whole fit is reproducible for a given seed. A sampler hands out
one generator per device, so labels are drawn where the logits are, without copying them to the host.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hookinf.errors import ConfigurationError, DataError

Fisher = Literal["empirical", "sampled"]


def pass_seed(seed: int, index: int, rank: int = 0) -> int:
    """The seed of pass ``index`` (0, 1, …) of a fit seeded with ``seed``: a hash of both, in ``[0, 2⁶³)``.

    ``int.from_bytes(blake2b(f"{seed}:{index}", digest_size=8), "little") >> 1``: the same pair always gives the same
    seed (blake2b is not salted per process, unlike ``hash``), and distinct pairs give unrelated seeds (an affine mix
    such as ``seed · P + index`` makes pairs collide, e.g. ``(0, P)`` and ``(1, 0)``); any Python int is accepted.
    Rank ``r > 0`` of a distributed fit hashes ``f"{seed}:{index}:{r}"`` instead, so each rank draws its own labels,
    reproducibly; rank 0 draws what a single process would.
    """
    text = f"{seed}:{index}" if rank == 0 else f"{seed}:{index}:{rank}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Sampler:
    """The random source of one pass of a sampled Fisher: one generator per device, each seeded with ``seed``.

    A ``torch.Generator`` draws on one device only, so a loss asks for the generator of its logits' device
    (:meth:`generator`); it is created at the first request and reused for the rest of the pass, so the draws of a
    pass are one reproducible stream per device.

    Attributes:
        seed: the pass's seed (:func:`pass_seed` of the fit's seed and the pass's index).
    """

    seed: int
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def for_pass(cls, seed: int, index: int, rank: int = 0) -> Sampler:
        """The sampler of pass ``index`` on ``rank`` of a fit seeded with ``seed`` (seeded with :func:`pass_seed`)."""
        return cls(pass_seed(seed, index, rank))

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The pass's generator for ``device`` (a CPU one for ``meta`` tensors, which hold no values).

        Args:
            device: the device the random numbers are drawn on (the logits' device).

        Returns:
            A generator on ``device``, seeded with ``seed`` at its creation and advanced by every draw since.
        """
        key = torch.device(device)
        if key not in self._generators:
            where = torch.device("cpu") if key.type == "meta" else key
            self._generators[key] = torch.Generator(device=where).manual_seed(self.seed)
        return self._generators[key]


_DRAW_ELEMENTS = 2**24  # logits given Gumbel noise at once (64 MiB of float32 noise)


def draw_labels(logits: Tensor, generator: torch.Generator) -> Tensor:
    """Labels drawn from ``softmax(logits)`` over the last dimension, on the logits' device (Gumbel-max).

    ``y = argmax_c (z_c + g_c)`` with ``g_c = −log(−log U_c)``, ``U_c ~ U[0, 1)`` i.i.d., is distributed exactly as
    ``softmax(z)`` (the Gumbel-max trick; Gumbel 1954, Maddison, Tarlow & Minka 2014, §2). It needs no softmax and
    no probability tensor: the noise is drawn in ``promote(logits.dtype, float32)`` (float32 for bf16/float16/float32
    logits, never a float64 copy of them), in chunks of examples of at most 2²⁴ numbers, by ``generator`` on the
    logits' device, with no read back to the host. ``torch.multinomial`` with one sample runs the same trick on
    probabilities (``argmax p / E``, ``E ~ Exp(1)``) after a softmax and validity checks that some torch versions
    read on the host. Up to the resolution of float32 uniforms (``g ∈ [−2.8, 16.6]``), a class more than ~19 nats
    below the most likely one (probability below 4e-9 of it) is never drawn; float64 logits get float64 noise.

    Args:
        logits: ``[B, ..., C]`` (at least 2-D), on any device.
        generator: a generator on the logits' device (see :meth:`Sampler.generator`).

    Returns:
        ``[B, ...]`` int64 labels on the logits' device.
    """
    logits = logits.detach()
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = max(1, _DRAW_ELEMENTS // max(1, math.prod(logits.shape[1:])))
    labels = []
    for chunk in logits.split(rows):  # views along the batch: no copy, even of a shifted (strided) slice
        noise = torch.rand(chunk.shape, generator=generator, device=chunk.device, dtype=dtype)
        noise.log_().neg_().log_().neg_().add_(chunk)  # z + Gumbel(0, 1) in place; U = 0 gives −∞ (never drawn)
        labels.append(noise.argmax(dim=-1))
    return torch.cat(labels)


def sums_examples(loss_fn: object) -> bool:
    """Whether ``loss_fn`` declares that the scalar it returns is the sum of the batch's per-example losses.

    A declaration, not a guess: a scalar is a batch mean as often as a sum (``F.cross_entropy``'s default), and a mean
    taken as a sum makes every gradient ``1/B`` too small. Declared by a true ``sums_examples`` attribute
    (:func:`summed`, :class:`hookinf.integrations.ModelLoss`).
    """
    return getattr(loss_fn, "sums_examples", False) is True


@dataclass(frozen=True)
class Summed:
    """A ``loss_fn`` whose scalar result is the sum of the batch's per-example losses (see :func:`summed`).

    Attributes:
        fn: ``fn(model, batch)`` → the sum over the batch's examples of each example's loss (a scalar).
    """

    fn: Callable[[nn.Module, Any], Tensor]
    sums_examples = True

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """``fn(model, batch)``."""
        return self.fn(model, batch)


def summed(fn: Callable[[nn.Module, Any], Tensor]) -> Summed:
    """Declares that ``fn`` returns the *sum* of its batch's per-example losses, so a one-call helper may take it.

    hookinf's helpers take per-example losses ``[B]``; a scalar is refused unless declared a sum this way, because a
    batch mean (``F.cross_entropy``'s default) cannot be told from a sum and would scale every gradient by ``1/B``::

        loss_fn = hookinf.summed(lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], reduction="sum"))
    """
    return Summed(fn)


@runtime_checkable
class SampledLoss(Protocol):
    """A ``loss_fn`` that can also compute the loss at labels sampled from the model.

    ``sampled`` draws its labels with ``sampler.generator(logits.device)`` (e.g. through :func:`draw_labels`), so that
    each pass gets fresh labels and a fit is reproducible for its ``seed``.
    """

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-example losses ``[B]`` at the batch's own labels."""
        ...

    def sampled(self, model: nn.Module, batch: Any, sampler: Sampler) -> Tensor:
        """Per-example losses ``[B]`` at labels drawn from the model's predictive distribution."""
        ...


def check_fisher(fisher: str, loss_fn: object, seed: object = 0) -> None:
    """Validates ``fisher=`` against the loss function, and ``seed=``.

    Raises:
        ConfigurationError: ``fisher`` is not ``"empirical"`` or ``"sampled"``; it is ``"sampled"`` and ``loss_fn``
            cannot draw labels (no ``sampled`` method); or ``seed`` is not an integer.
    """
    if fisher not in get_args(Fisher):
        raise ConfigurationError(f"fisher={fisher!r} is not valid; use one of {list(get_args(Fisher))}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigurationError(f"seed={seed!r} is not valid; give an integer (it seeds fisher='sampled' draws).")
    if fisher == "sampled" and not isinstance(loss_fn, SampledLoss):
        raise ConfigurationError(
            "fisher='sampled' needs a loss that can draw labels from the model: use hookinf.CrossEntropy(logits=..., "
            "target=...) as loss_fn, or give your loss_fn a sampled(model, batch, sampler) method returning "
            "per-example losses [B] at labels drawn with sampler.generator(logits.device) (see "
            "hookinf.losses.draw_labels)."
        )


@dataclass(frozen=True)
class CrossEntropy:
    """Per-example cross-entropy for classification (``[B, C]`` logits) or sequences (``[B, T, C]``).

    Use it as ``loss_fn``: ``CrossEntropy(logits=lambda model, batch: model(batch[0]), target=lambda b: b[1])``.

    Attributes:
        logits: ``(model, batch) → logits`` ``[B, C]`` or ``[B, T, C]``.
        target: ``batch → labels`` ``[B]`` or ``[B, T]``; positions equal to ``ignore_index`` do not count.
        shift: for causal language models, predict position ``t + 1`` from position ``t``.
        per_example: how an example's token losses combine: ``"sum"`` (then per-token influence sums to the
            example's) or ``"mean"``.
        ignore_index: label value of padding positions.
    """

    logits: Callable[[nn.Module, Any], Tensor]
    target: Callable[[Any], Tensor]
    shift: bool = False
    per_example: Literal["sum", "mean"] = "sum"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.per_example not in ("sum", "mean"):
            raise ConfigurationError(f"CrossEntropy(per_example={self.per_example!r}): use 'sum' or 'mean'.")

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-example losses ``[B]`` at the batch's labels."""
        logits, target = self._pair(model, batch)
        return self._loss(logits, target)

    def sampled(self, model: nn.Module, batch: Any, sampler: Sampler) -> Tensor:
        """Per-example losses ``[B]`` at labels drawn from ``softmax(logits)`` (padding positions kept).

        The labels are drawn on the logits' device by :func:`draw_labels` with ``sampler.generator(logits.device)``.
        """
        logits, target = self._pair(model, batch)
        with torch.no_grad():
            drawn = draw_labels(logits, sampler.generator(logits.device)).to(target.device)
            drawn = torch.where(target == self.ignore_index, target, drawn)
        return self._loss(logits, drawn)

    def _pair(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        logits, target = self.logits(model, batch), self.target(batch)
        if self.shift:
            logits, target = logits[:, :-1], target[:, 1:]
        if logits.shape[:-1] != target.shape:
            shifted = "; shift=True drops one position" if self.shift else ""
            raise DataError(
                f"CrossEntropy: logits {list(logits.shape)} do not match labels {list(target.shape)} (expected "
                f"logits [B, C] with labels [B], or [B, T, C] with [B, T]{shifted})."
            )
        return logits, target

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none", ignore_index=self.ignore_index
        ).reshape(target.shape)
        if losses.dim() == 1:
            return losses
        losses = losses.flatten(1)
        if self.per_example == "sum":
            return losses.sum(dim=1)
        counts = (target.flatten(1) != self.ignore_index).sum(dim=1).clamp_min(1)
        return losses.sum(dim=1) / counts
