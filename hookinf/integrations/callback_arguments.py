"""The checks of :class:`~hookinf.integrations.HookinfCallback`'s arguments, made once at its construction."""

from __future__ import annotations

import os

from hookinf.compress import Compressor, require_compressor
from hookinf.distributed import Group, resolve_ranks
from hookinf.errors import ConfigurationError
from hookinf.methods import EKFAC, Method, check_basis_compressor, resolve_method


def callback_method(
    *,
    fit: str | Method | None,
    save_to: str | os.PathLike[str] | None,
    log_to: str | os.PathLike[str] | None,
    compress: Compressor | None,
    epoch: int,
    snapshot_every: int | None,
    snapshots_to: str | os.PathLike[str] | None,
    group: Group,
) -> tuple[Method | None, bool]:
    """Checks the callback's arguments; returns the method to fit (``None``: none) and whether it takes two passes.

    Two passes: ``fit="ekfac"`` with no basis (K-FAC during the epoch, EK-FAC's correction pass at its end).

    Raises:
        ConfigurationError: the arguments do not go together, or one is invalid (the message says which).
    """
    if fit is None and log_to is None and snapshot_every is None:
        raise ConfigurationError(
            "HookinfCallback does nothing without fit=... (a curvature), log_to=... (a store) or snapshot_every=."
        )
    if snapshots_to is not None and snapshot_every is None:
        raise ConfigurationError("snapshots_to= saves snapshots: give snapshot_every= (optimizer steps) too.")
    if save_to is not None and fit is None:
        raise ConfigurationError("save_to= saves the fitted curvature: give fit= too (e.g. fit='kfac').")
    if log_to is not None and compress is None:
        raise ConfigurationError(
            "log_to= needs compress= (the store's compressor, e.g. hookinf.LoGra(16, 16); "
            "hookinf.LoGra(10**6, 10**6, init='orthogonal') keeps the full gradients)."
        )
    require_compressor(compress)
    resolve_ranks(group)  # refuses an invalid group= now; resolved again when training begins
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise ConfigurationError(f"epoch={epoch!r} must be an int (0-based; -1 is the last epoch).")
    if fit is None:
        return None, False
    method = resolve_method(fit)
    if not isinstance(method, Method):
        raise ConfigurationError(
            f"fit={method.name!r} has no statistics to fit in advance (it streams over the training data for "
            f"each set of queries); use 'kfac', 'ekfac', 'exact' or 'identity', or score with "
            f"hookinf.influence(..., method={method.name!r}) after training."
        )
    check_basis_compressor(method, compress, "the basis")
    return method, isinstance(method, EKFAC) and method.basis is None
