"""Candidate pre-filtering for language-model queries: TF-IDF similarity picks the training sequences worth scoring.

Grosse et al. (2023, §3.2.1, TF-IDF filtering) score each query against only the training sequences most similar to
it by TF-IDF, because scoring a whole pre-training corpus per query is unaffordable. :func:`tfidf` returns those
candidates; :func:`hookinf.top_k` with ``candidates=`` ranks each query among its own candidates only, and skips the
stored examples that are no query's candidate. Whenever a query's true top-k lies inside its candidates, the
restricted top-k is the full one (the same entries and scores: a candidate's score does not depend on the others).
Needs scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.ranking import top_entries

_CHUNK = 8192  # training texts compared with the queries at a time: memory O(n_query × (k + chunk))


def tfidf(query_texts: Sequence[str], train_texts: Sequence[str], k: int, *, vectorizer: Any = None) -> Tensor:
    """The ``k`` training texts most similar to each query by TF-IDF cosine similarity, most similar first.

    The vectoriser is fitted on ``train_texts`` (the corpus) and applied to the queries; rows are L2-normalised, so
    the similarity is their inner product. Ties go to the smaller index.

    Args:
        query_texts: one text per query.
        train_texts: one text per training sequence, in column order (index ``j`` is training column ``j``).
        k: candidates per query (clipped to ``len(train_texts)``).
        vectorizer: an unfitted scikit-learn vectoriser with ``fit_transform``/``transform`` (default
            ``TfidfVectorizer(sublinear_tf=True)``).

    Returns:
        ``[n_query, k]`` int64 training indices; pass it as ``candidates=`` to :func:`hookinf.top_k`.

    Raises:
        ConfigurationError: scikit-learn is not installed, ``k`` is not a positive integer, or a list is empty.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(f"tfidf(k={k!r}): k must be a positive integer.")
    if not len(query_texts) or not len(train_texts):
        raise ConfigurationError("tfidf needs at least one query text and one training text.")
    if vectorizer is None:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError as err:
            raise ConfigurationError("TF-IDF pre-filtering needs scikit-learn: pip install scikit-learn.") from err
        vectorizer = TfidfVectorizer(sublinear_tf=True)
    train = vectorizer.fit_transform(list(train_texts)).tocsr()
    queries = vectorizer.transform(list(query_texts)).tocsr()
    k = min(k, len(train_texts))
    kept: tuple[Tensor, Tensor] | None = None
    for start in range(0, len(train_texts), _CHUNK):
        block = torch.from_numpy((queries @ train[start : start + _CHUNK].T).toarray()).double()
        columns = torch.arange(start, start + block.shape[1], device=block.device).expand_as(block)
        if kept is not None:
            block, columns = torch.cat([kept[0], block], dim=1), torch.cat([kept[1], columns], dim=1)
        at = top_entries(block, columns, min(k, int(block.shape[1])), largest=True)
        kept = block.gather(1, at), columns.gather(1, at)
    assert kept is not None
    return kept[1]
