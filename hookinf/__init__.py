"""hookinf: which training examples, and which layers, made my PyTorch model do this?

Hook-based, per-layer influence functions. ``hookinf.watch(model)`` captures each tracked layer's input
activations and output gradients per example from an unchanged training loop; the methods turn them into
influence scores ``I(z_q, z) = −Σ_l g_l(z_q)ᵀ (G_l + λ_l I)⁻¹ g_l(z)`` with the per-layer decomposition kept.
"""

import hookinf.report  # noqa: F401  (registers the presenter behind Scores.report(), .save_html(), .layer_table())
from hookinf._version import __version__ as __version__
from hookinf.capture import LayerCapture, Step
from hookinf.checkpoint_scores import CheckpointScores, CheckpointSelfScores
from hookinf.compress import Compressor, Dropout, Gaussian, LoGra
from hookinf.curvature import Curvature, load
from hookinf.damping import Damping
from hookinf.errors import (
    CaptureError,
    CheckpointError,
    CompressorMismatchError,
    ConfigurationError,
    CurvatureError,
    DataError,
    DistributedError,
    HookinfError,
    HookinfWarning,
    NestedWatchError,
    NonFiniteGradientError,
    NoTrackableModuleError,
    PatternMatchError,
    UnsupportedModuleError,
)
from hookinf.helpers import fit, influence, log, self_influence
from hookinf.hooks import Watch
from hookinf.loop import LoopWatch, watch
from hookinf.losses import CrossEntropy, SampledLoss, Sampler, Summed, summed
from hookinf.methods import EKFAC, KFAC, DataInf, Exact, Identity, LiSSA, Method, QueryMethod
from hookinf.preconditioned import PreconditionedStore, precondition_store
from hookinf.retrieval import top_k
from hookinf.scores import Scores, TopK, load_scores
from hookinf.self_scores import SelfScores, SelfTopK, load_self_scores
from hookinf.shapes import LayerShape
from hookinf.snapshots import Snapshots, saved_snapshots
from hookinf.store import GradientStore, StoreError
from hookinf.streaming import Retrieved

__all__ = [
    # one-call helpers
    "fit",
    "influence",
    "self_influence",
    "log",
    "top_k",
    "precondition_store",
    "load",
    "load_scores",
    "load_self_scores",
    # capture
    "watch",
    "Watch",
    "LoopWatch",
    "Snapshots",
    "saved_snapshots",
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
    "Summed",
    "summed",
    "SampledLoss",
    "Sampler",
    # compression
    "Compressor",
    "LoGra",
    "Dropout",
    "Gaussian",
    "GradientStore",
    "PreconditionedStore",
    # results
    "Scores",
    "CheckpointScores",
    "CheckpointSelfScores",
    "TopK",
    "Retrieved",
    "SelfScores",
    "SelfTopK",
    # errors
    "HookinfError",
    "HookinfWarning",
    "CaptureError",
    "CheckpointError",
    "CompressorMismatchError",
    "ConfigurationError",
    "CurvatureError",
    "DataError",
    "DistributedError",
    "StoreError",
    "NestedWatchError",
    "NonFiniteGradientError",
    "NoTrackableModuleError",
    "PatternMatchError",
    "UnsupportedModuleError",
]
