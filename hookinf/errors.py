"""Errors raised by hookinf.

Every error hookinf raises on bad input derives from :class:`HookinfError`, so one ``except`` clause catches them
all. The specific classes also derive from the matching built-in (``ValueError``, ``TypeError``,
``RuntimeError``) so code that already catches those keeps working.
"""

from __future__ import annotations


class HookinfError(Exception):
    """Base class of every error hookinf raises on bad input or an impossible request."""


class HookinfWarning(UserWarning):
    """Something hookinf did on its own that changes what is attributed (e.g. a tied layer left out)."""


class ConfigurationError(HookinfError, ValueError):
    """An argument has a value hookinf cannot use (an unknown option, a negative damping, ...)."""


class UnsupportedModuleError(HookinfError, TypeError):
    """A module that hookinf cannot track was selected (wrong type or unsupported configuration)."""


class NoTrackableModuleError(HookinfError, ValueError):
    """The model (or the ``modules=`` selection) holds no supported module with trainable parameters."""


class PatternMatchError(HookinfError, ValueError):
    """An entry of ``modules=`` matched no trackable module of the model."""


class NestedWatchError(HookinfError, RuntimeError):
    """A module is already tracked by another active :func:`hookinf.watch`."""


class CaptureError(HookinfError, RuntimeError):
    """A forward/backward pass did not produce a consistent capture (missing layer, batch mismatch, ...)."""


class NonFiniteGradientError(CaptureError):
    """A captured activation or output gradient holds NaN or infinity."""


class DataError(HookinfError, ValueError):
    """The data passed to an influence helper cannot be used as given (shuffled, one-shot, changing size, ...)."""


class CurvatureError(HookinfError, RuntimeError):
    """A curvature block cannot be built or inverted (too large, not positive definite, ...)."""


class CheckpointError(HookinfError, ValueError):
    """A checkpoint cannot be read, or does not fit the model (an unknown name, a wrong shape, a missing parameter)."""


class StoreError(HookinfError, RuntimeError):
    """A gradient store is missing, corrupt, locked by another writer, unwritable, or incompatible with the input.

    Incompatible: another compressor, model, dtype or kind of ids than the store holds. The message names the file
    and what to do; a failed write is chained from the ``OSError`` behind it.
    """


class CompressorMismatchError(CurvatureError, ConfigurationError):
    """A curvature (or an EK-FAC basis) is used, or merged, in another compressed space than it was fitted in."""


class DistributedError(HookinfError, RuntimeError):
    """Another rank of a distributed run failed: it raised, died, or did not reach a collective within its timeout.

    Raised on the ranks that were waiting for it, naming the failed rank(s) where known; the failed rank raises its
    own error. Chained from torch.distributed's ``RuntimeError`` when a collective itself failed.
    """
