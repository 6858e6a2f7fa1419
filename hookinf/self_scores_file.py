"""The saved form of :class:`~hookinf.SelfScores`: a directory written by :func:`write_self_scores`.

Version 1 (written and checked by :mod:`hookinf.bundle`, as scores and curvatures are: all-or-nothing, the tensor
file named by its content and renamed before the manifest, which records its size and SHA-256 and is sealed by its
own checksum): ``manifest.json`` (``format`` ``"hookinf.self-scores"``, ``method``, ``layers`` in model order,
``damping`` ``λ_l`` per layer, ``n``, ``ids``: ``"int"``, ``"str"`` or null) and ``self-scores-{digest}.safetensors``
holding ``layer/<name>`` ``[n]`` float64 and the ids as scores hold them (:func:`~hookinf.scores_file.id_tensors`).
This module knows the format, not the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from torch import Tensor

from hookinf.bundle import MANIFEST, load_bundle, save_bundle
from hookinf.errors import ConfigurationError, HookinfError
from hookinf.ids import Ids, id_kind
from hookinf.scores_file import id_tensors, pop_ids

FORMAT = "hookinf.self-scores"
_STEM = "self-scores"


@dataclass(frozen=True)
class SavedSelfScores:
    """What a self-scores directory holds: the fields of :class:`~hookinf.SelfScores` (see there)."""

    per_layer: dict[str, Tensor]
    method: str
    damping: dict[str, float]
    ids: Ids | None


def write_self_scores(directory: Path, saved: SavedSelfScores) -> None:
    """Saves self-influence into ``directory`` (created when missing), all-or-nothing.

    Raises:
        HookinfError: a write failed (names the directory; chained from the ``OSError``); the directory keeps what
            it held before.
    """
    tensors = {f"layer/{name}": part for name, part in saved.per_layer.items()} | id_tensors(saved.ids)
    fields = {
        "format": FORMAT,
        "version": 1,
        "method": saved.method,
        "layers": list(saved.per_layer),
        "damping": saved.damping,
        "n": int(next(iter(saved.per_layer.values())).shape[0]),
        "ids": None if saved.ids is None else id_kind(saved.ids),
    }
    try:
        save_bundle(directory, _STEM, tensors, fields)
    except (OSError, ValueError) as err:
        cause = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise HookinfError(
            f"{directory}: cannot save the self-influence ({cause}); the directory keeps what it held before. Fix "
            f"the cause (e.g. free disk space) and save again."
        ) from err


def read_self_scores(directory: Path) -> SavedSelfScores:
    """Loads and checks what :func:`write_self_scores` saved.

    Raises:
        HookinfError: no self-influence in ``directory``, or damaged or edited files (the message names the file).
    """
    if not (directory / MANIFEST).is_file():
        raise HookinfError(f"{directory}: no hookinf self-influence here (missing {MANIFEST}).")
    try:
        bundle = load_bundle(directory, FORMAT, _STEM)
        manifest, tensors = bundle.manifest, dict(bundle.tensors)
        if manifest.get("version") != 1:
            raise ValueError(f"version {manifest.get('version')!r} is not one this hookinf reads: upgrade hookinf")
        per_layer = {str(name): tensors.pop(f"layer/{name}") for name in manifest["layers"]}
        ids = pop_ids(manifest["ids"], tensors)
        if tensors:
            raise ValueError(f"the tensor file holds tensors the manifest does not list: {sorted(tensors)[:3]}")
        n = int(manifest["n"])
        for name, part in per_layer.items():
            if list(part.shape) != [n]:
                raise ValueError(f"layer {name!r} has self-influence {list(part.shape)}, not [{n}] (the manifest's)")
        damping = {str(k): float(v) for k, v in manifest["damping"].items()}
        return SavedSelfScores(per_layer, str(manifest["method"]), damping, ids)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError, ConfigurationError) as err:
        raise HookinfError(f"{directory}: corrupt hookinf self-influence ({type(err).__name__}: {err}).") from err
