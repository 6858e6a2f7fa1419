"""hookinf: which training examples, and which layers, made my PyTorch model do this?

Hook-based, per-layer influence functions. ``hookinf.watch(model)`` captures each tracked layer's input
activations and output gradients per example from an unchanged training loop; the methods turn them into
influence scores ``I(z_q, z) = −Σ_l g_l(z_q)ᵀ (G_l + λ_l I)⁻¹ g_l(z)`` with the per-layer decomposition kept.
"""

from hookinf.capture import LayerCapture, Step
from hookinf.compress import Compressor, Dropout, Gaussian, LoGra
from hookinf.curvature import Curvature, LayerShape, load
from hookinf.damping import Damping
from hookinf.errors import (
    CaptureError,
    ConfigurationError,
    CurvatureError,
    DataError,
    HookinfError,
    NestedWatchError,
    NonFiniteGradientError,
    NoTrackableModuleError,
    PatternMatchError,
    UnsupportedModuleError,
)
from hookinf.influence import fit, influence, self_influence
from hookinf.logger import log
from hookinf.losses import CrossEntropy, SampledLoss
from hookinf.methods import EKFAC, KFAC, DataInf, Exact, Identity, LiSSA, Method, QueryMethod
from hookinf.scores import Scores, TopK, load_scores
from hookinf.store import GradientStore, StoreError
from hookinf.watch import Watch, watch

__version__ = "0.1.0"

__all__ = [
    # one-call helpers
    "fit",
    "influence",
    "self_influence",
    "log",
    "load",
    "load_scores",
    # capture
    "watch",
    "Watch",
    "Step",
    "LayerCapture",
    # methods and configuration
    "Method",
    "Exact",
    "Identity",
    "KFAC",
    "EKFAC",
    "QueryMethod",
    "DataInf",
    "LiSSA",
    "Curvature",
    "LayerShape",
    "Damping",
    "CrossEntropy",
    "SampledLoss",
    # compression
    "Compressor",
    "LoGra",
    "Dropout",
    "Gaussian",
    "GradientStore",
    # results
    "Scores",
    "TopK",
    # errors
    "HookinfError",
    "CaptureError",
    "ConfigurationError",
    "CurvatureError",
    "DataError",
    "StoreError",
    "NestedWatchError",
    "NonFiniteGradientError",
    "NoTrackableModuleError",
    "PatternMatchError",
    "UnsupportedModuleError",
]
