"""Gradient compressors (LoGra, dropout masks, Gaussian projection) over the captured factors."""

from hookinf.compress.base import BoundCompressor, Compressor, require_compressor
from hookinf.compress.dropout import Dropout
from hookinf.compress.gaussian import Gaussian
from hookinf.compress.logra import LoGra
from hookinf.errors import ConfigurationError

__all__ = ["BoundCompressor", "Compressor", "Dropout", "Gaussian", "LoGra", "from_config", "require_compressor"]

_KINDS: dict[str, type[Compressor]] = {"logra": LoGra, "dropout": Dropout, "gaussian": Gaussian}


def from_config(config: dict[str, object]) -> Compressor:
    """Rebuilds a compressor from :meth:`Compressor.config` (as stored in manifests)."""
    options = dict(config)
    kind = options.pop("kind", None)
    if kind not in _KINDS:
        raise ConfigurationError(f"unknown compressor kind {kind!r}; known: {sorted(_KINDS)}.")
    return _KINDS[str(kind)](**options)
