"""``Descriptions``: what each training example and query of a :class:`~hookinf.Scores` is, for its reports.

Scores index training examples by column (or id) and queries by row; a report that shows only "train 185" asks the
reader to look each one up. A :class:`Descriptions` carries, per example, a short text and optionally a picture
(an image array, shown as a thumbnail), and per query its label and the model's prediction, so that a saved result
(:meth:`hookinf.Scores.save`) reports with context later — ``hookinf report SCORES_DIR --html out.html
--misclassified`` — without the code that made it. Attach them with :meth:`hookinf.Scores.with_descriptions`.

Pictures are kept in full in the saved file: pass small ones (a thumbnail is at most 64 pixels a side anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError

FIELDS = ("train_text", "query_text", "train_images", "query_images", "query_labels", "query_predictions")
"""The fields of :class:`Descriptions`, in the order they are saved."""


@dataclass(frozen=True)
class Descriptions:
    """Optional per-example text and pictures, and per-query labels and predictions, of one set of scores.

    Every field is optional; a given one has one entry per training example (column of the scores, in column order:
    sorted by id for scores from a store) or per query (row).

    Attributes:
        train_text: ``n_train`` short texts (a label, a sentence, a file name), one per column.
        query_text: ``n_query`` short texts, one per row.
        train_images: ``[n_train, H, W]``, ``[n_train, H, W, C]`` or ``[n_train, C, H, W]`` (``C`` in 1, 3, 4):
            each training example's picture (float in ``[0, 1]`` or uint8; see :func:`hookinf.report.thumbnail`).
        query_images: the same, ``[n_query, ...]``.
        query_labels: ``int64 [n_query]``, each query's true label.
        query_predictions: ``int64 [n_query]``, the model's prediction for each query; with ``query_labels`` it
            tells which queries the model gets wrong (:meth:`misclassified`).
    """

    train_text: list[str] | None = None
    query_text: list[str] | None = None
    train_images: Tensor | None = None
    query_images: Tensor | None = None
    query_labels: Tensor | None = None
    query_predictions: Tensor | None = None

    @classmethod
    def of(cls, **given: Any) -> Descriptions:
        """Descriptions from lists, tuples, tensors or numpy arrays, checked and converted (``None``: not given).

        Raises:
            ConfigurationError: a field of the wrong kind (texts that are not strings, non-integer labels, images
                that are not ``[n, H, W]``, ``[n, H, W, C]`` or ``[n, C, H, W]`` numbers).
        """
        fields: dict[str, Any] = {}
        for name, value in given.items():
            if name not in FIELDS:
                raise ConfigurationError(f"unknown description {name!r}; the descriptions are {', '.join(FIELDS)}.")
            if value is None:
                continue
            if name.endswith("_text"):
                fields[name] = _texts(value, name)
            elif name.endswith("_images"):
                fields[name] = _images(value, name)
            else:
                fields[name] = _labels(value, name)
        return cls(**fields)

    def check(self, n_query: int, n_train: int) -> None:
        """Refuses fields whose length is not ``n_train`` (training examples) or ``n_query`` (queries).

        Raises:
            ConfigurationError: names the field and both lengths.
        """
        for name in FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            want = n_train if name.startswith("train") else n_query
            have = len(value)
            if have != want:
                what = "training examples (columns)" if name.startswith("train") else "queries (rows)"
                raise ConfigurationError(f"{name} has {have} entries; the scores have {want} {what}: give one each.")

    def misclassified(self) -> list[int]:
        """The queries (rows) whose prediction differs from their label, in row order.

        Raises:
            ConfigurationError: the descriptions lack ``query_labels`` or ``query_predictions``.
        """
        if self.query_labels is None or self.query_predictions is None:
            raise ConfigurationError(
                "choosing the misclassified queries needs query_labels and query_predictions in the descriptions: "
                "scores.with_descriptions(query_labels=..., query_predictions=...) before saving."
            )
        return [int(q) for q in (self.query_labels != self.query_predictions).nonzero().flatten()]

    def query_summary(self, q: int) -> str | None:
        """Query ``q``'s text and its label and prediction (``"label 3, predicted 5 · text"``), or ``None``."""
        parts = []
        if self.query_labels is not None:
            parts.append(f"label {int(self.query_labels[q])}")
        if self.query_predictions is not None:
            parts.append(f"predicted {int(self.query_predictions[q])}")
        labels = ", ".join(parts)
        if self.query_text is not None:
            return f"{labels} · {self.query_text[q]}" if labels else self.query_text[q]
        return labels or None

    def present(self) -> dict[str, Any]:
        """The fields that are given, by name (in :data:`FIELDS` order)."""
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name) is not None}


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not all(isinstance(t, str) for t in value):
        raise ConfigurationError(f"{name} must be a list of strings, one per example; got {type(value).__name__}.")
    return list(value)


def _images(value: Any, name: str) -> Tensor:
    images = torch.as_tensor(value, device="cpu").detach()
    if images.dim() not in (3, 4) or images.dtype == torch.bool or images.is_complex():
        raise ConfigurationError(
            f"{name} must be real numbers [n, H, W], [n, H, W, C] or [n, C, H, W]; got {images.dtype} "
            f"{list(images.shape)}."
        )
    if images.is_floating_point() and not bool(images.isfinite().all()):
        raise ConfigurationError(f"{name} hold NaN or infinite values.")
    return images.contiguous()


def _labels(value: Any, name: str) -> Tensor:
    labels = torch.as_tensor(value, device="cpu").detach()
    if labels.dim() != 1 or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ConfigurationError(f"{name} must be integers [n_query]; got {labels.dtype} {list(labels.shape)}.")
    return labels.to(torch.int64)
