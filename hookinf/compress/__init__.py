"""Gradient compressors (LoGra, dropout masks, Gaussian projection) over the captured factors."""

from hookinf.compress.base import BoundCompressor, Compressor
from hookinf.compress.dropout import Dropout
from hookinf.compress.gaussian import Gaussian
from hookinf.compress.logra import LoGra

__all__ = ["BoundCompressor", "Compressor", "Dropout", "Gaussian", "LoGra"]
