"""Scoring training steps against preconditioned queries, straight from the captured factors (pure functions).

For one layer with preconditioned query matrices ``Q̃_q`` ``[O, I]`` and a training example's factors ``a`` ``[S, I]``
and ``δ`` ``[S, O]``, the score is ``−⟨Q̃_q, Σ_s δ_s a_sᵀ⟩ = −Σ_s δ_sᵀ Q̃_q a_s``: each term is the part of the
score carried by position ``s`` (a token), so per-token scores sum to the example's score (Grosse et al. 2023,
§3.3, token-wise attribution). With a rank-``k`` approximation ``Q̃_q ≈ Σ_r σ_r u_r v_rᵀ`` (Grosse et al. 2023,
§3.2, low-rank query gradients) the score is ``−Σ_s Σ_r σ_r (δ_s·u_r)(v_r·a_s)``: ``O(S k (O + I))`` per pair.

Index conventions: ``q`` queries, ``b`` training examples, ``s`` positions, ``o``/``i`` output/input features,
``k`` rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hookinf.capture import LayerCapture, Step
from hookinf.compress import Compressor, LoGra
from hookinf.errors import ConfigurationError
from hookinf.linalg import einsum


@dataclass(frozen=True)
class LowRank:
    """Rank-``k`` factors of preconditioned query matrices: ``Q̃_q ≈ left_q @ right_qᵀ``.

    Attributes:
        left: ``[n_query, O, k]`` (``U_k diag(σ_k)``).
        right: ``[n_query, I, k]`` (``V_k``).
    """

    left: Tensor
    right: Tensor

    @classmethod
    def of(cls, queries: Tensor, rank: int) -> LowRank:
        """Truncated SVD of each query matrix ``[n_query, O, I]`` (rank clipped to ``min(O, I)``)."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigurationError(f"query_rank={rank!r} must be a positive integer or None.")
        u, sigma, vh = torch.linalg.svd(queries, full_matrices=False)
        k = min(rank, sigma.shape[-1])
        return cls(u[..., :k] * sigma[..., None, :k], vh[..., :k, :].transpose(-1, -2))


def layer_scores(queries: Tensor | LowRank, capture: LayerCapture, *, per_token: bool = False) -> Tensor:
    """``−⟨Q̃_q, g_b⟩`` for every query and training example of a step (one layer), in the queries' dtype.

    Args:
        queries: preconditioned query matrices ``[n_query, O, I]`` or their :class:`LowRank` factors.
        capture: the training step's factors for this layer.
        per_token: keep the position axis.

    Returns:
        ``[n_query, B]``, or ``[n_query, B, S]`` with ``per_token``.
    """
    dtype = queries.left.dtype if isinstance(queries, LowRank) else queries.dtype
    a = capture.a.to(dtype)
    delta = capture.delta.to(dtype)
    out = "qbs" if per_token else "qb"
    if isinstance(queries, LowRank):
        return -einsum(f"bso,qok,bsi,qik->{out}", delta, queries.left, a, queries.right)
    return -einsum(f"qoi,bso,bsi->{out}", queries, delta, a)


def check_per_token(from_store: bool, compress: Compressor | None) -> None:
    """Refuses ``per_token=True`` where the training gradients have no positions left.

    Args:
        from_store: the training gradients come from a store, which keeps each example's gradient summed over its
            positions.
        compress: the compressor (``None``, a :class:`~hookinf.LoGra`, which keeps positions, or another).

    Raises:
        ConfigurationError: says why and what to pass instead.
    """
    if from_store:
        raise ConfigurationError(
            "per_token=True splits each training example's score over its positions (tokens), and a gradient store "
            "keeps each example's gradient summed over them. Pass the training batches as train (with compress= "
            "hookinf.LoGra(...) or none) to score with per-token parts, or leave per_token out."
        )
    if compress is not None and not isinstance(compress, LoGra):
        raise ConfigurationError(
            f"per_token=True needs positions in the compressed gradients; {type(compress).__name__} compresses whole "
            f"per-example gradients. Use hookinf.LoGra, which keeps them, or no compression."
        )


def check_positions(step: Step) -> None:
    """Refuses a step whose tracked layers see different positions (``per_token=True`` needs the same ones)."""
    sizes = {name: int(capture.a.shape[1]) for name, capture in step.layers.items()}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"'{n}': {s}" for n, s in sizes.items())
        raise ConfigurationError(
            f"per_token=True needs every tracked layer to see the same positions (tokens); the layers see {shown}. "
            f"Track only the layers applied once per token with modules=[...] (not convolutions or reused modules)."
        )


def pad_cat(parts: list[Tensor]) -> Tensor:
    """Concatenates ``[n_query, B, S_k]`` blocks along B, zero-padding the position axis to the longest."""
    longest = max(part.shape[2] for part in parts)
    return torch.cat([torch.nn.functional.pad(part, (0, longest - part.shape[2])) for part in parts], dim=1)
