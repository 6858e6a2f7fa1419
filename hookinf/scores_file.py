"""The saved form of :class:`~hookinf.Scores`: a directory written by :func:`write_scores`.

Version 2 (see :mod:`hookinf.bundle` for how it is written and checked): ``manifest.json`` (``method``, ``layers``,
``damping``, ``shape`` ``[n_query, n_train]``, ``per_token``, ``ids``: ``"int"``, ``"str"`` or null, the tensor
file's name, size and SHA-256, and the manifest's own checksum) and ``scores-{digest}.safetensors`` holding
``layer/<name>`` ``[n_query, n_train]``, ``token/<name>`` ``[n_query, n_train, T]`` with ``per_token``, and the ids:
``ids`` ``int64 [n_train]``, or ``ids_utf8`` (the UTF-8 JSON list of string ids). Version 3 is version 2 with
:class:`~hookinf.descriptions.Descriptions`: the manifest's ``descriptions`` lists the fields saved, each a tensor
``describe/<field>`` (texts as the UTF-8 JSON list, like string ids); scores without descriptions are still written
as version 2, so an older hookinf reads them. Version 1 (``scores.safetensors``, ``ids`` a bool, no checksums) still
loads. This module knows the format, not the class, so :mod:`hookinf.scores` imports it and not the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from torch import Tensor

from hookinf.bundle import MANIFEST, load_bundle, save_bundle
from hookinf.descriptions import FIELDS, Descriptions
from hookinf.errors import ConfigurationError, HookinfError
from hookinf.ids import Ids, id_kind, strings_from_tensor, strings_to_tensor

FORMAT = "hookinf.scores"
_STEM = "scores"
_LEGACY = "scores.safetensors"  # version 1's fixed tensor file
_STR_IDS = "ids_utf8"
_DESCRIBE = "describe/"


@dataclass(frozen=True)
class SavedScores:
    """What a scores directory holds: the fields of :class:`~hookinf.Scores` (see there)."""

    per_layer: dict[str, Tensor]
    method: str
    damping: dict[str, float]
    per_token: dict[str, Tensor] | None
    ids: Ids | None
    descriptions: Descriptions | None = None


def id_tensors(ids: Ids | None) -> dict[str, Tensor]:
    """The tensors a saved file holds its ids in: ``ids`` (int64), ``ids_utf8`` (strings as UTF-8 JSON), or none."""
    if isinstance(ids, Tensor):
        return {"ids": ids}
    return {} if ids is None else {_STR_IDS: strings_to_tensor(ids)}


def pop_ids(kind: object, tensors: dict[str, Tensor]) -> Ids | None:
    """The ids of the manifest's ``ids`` kind (``"int"``, ``"str"`` or null), taken out of ``tensors``.

    Raises:
        ValueError: another kind.
    """
    if kind == "int":
        return tensors.pop("ids")
    if kind == "str":
        return strings_from_tensor(tensors.pop(_STR_IDS))
    if kind is not None:
        raise ValueError(f"ids is {kind!r}, not 'int', 'str' or null")
    return None


def write_scores(directory: Path, scores: SavedScores) -> None:
    """Saves scores into ``directory`` (created when missing), all-or-nothing.

    Raises:
        HookinfError: a write failed (names the directory; chained from the ``OSError``); the directory keeps what
            it held before.
    """
    tensors = {f"layer/{name}": part for name, part in scores.per_layer.items()}
    if scores.per_token is not None:
        tensors.update({f"token/{name}": part for name, part in scores.per_token.items()})
    tensors.update(id_tensors(scores.ids))
    described = scores.descriptions.present() if scores.descriptions is not None else {}
    for name, value in described.items():
        tensors[_DESCRIBE + name] = strings_to_tensor(value) if isinstance(value, list) else value
    n_query, n_train = next(iter(scores.per_layer.values())).shape
    fields = {
        "format": FORMAT,
        "version": 3 if described else 2,
        "method": scores.method,
        "layers": list(scores.per_layer),
        "damping": scores.damping,
        "shape": [int(n_query), int(n_train)],
        "per_token": scores.per_token is not None,
        "ids": None if scores.ids is None else id_kind(scores.ids),
    }
    if described:
        fields["descriptions"] = list(described)
    try:
        save_bundle(directory, _STEM, tensors, fields, legacy=(_LEGACY,))
    except (OSError, ValueError) as err:
        cause = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise HookinfError(
            f"{directory}: cannot save the scores ({cause}); the directory keeps what it held before. Fix the cause "
            f"(e.g. free disk space) and save again."
        ) from err


def read_scores(directory: Path) -> SavedScores:
    """Loads and checks what :func:`write_scores` (or an older hookinf) saved.

    Raises:
        HookinfError: no scores in ``directory``, or damaged or edited ones (the message names the file).
    """
    if not (directory / MANIFEST).is_file():
        raise HookinfError(f"{directory}: no hookinf scores here (missing {MANIFEST}).")
    try:
        bundle = load_bundle(directory, FORMAT, _STEM, legacy=_LEGACY)
        manifest, tensors = bundle.manifest, dict(bundle.tensors)
        if manifest.get("version", 1) not in (1, 2, 3):
            raise ValueError(f"version {manifest.get('version')!r} is not one this hookinf reads: upgrade hookinf")
        layers = [str(name) for name in manifest["layers"]]
        per_layer = {name: tensors.pop(f"layer/{name}") for name in layers}
        per_token = {name: tensors.pop(f"token/{name}") for name in layers} if manifest["per_token"] else None
        ids = pop_ids({True: "int", False: None}.get(manifest["ids"], manifest["ids"]), tensors)  # version 1: a bool
        descriptions = _read_descriptions(manifest.get("descriptions", []), tensors)
        if tensors:
            raise ValueError(f"the tensor file holds tensors the manifest does not list: {sorted(tensors)[:3]}")
        shape = [int(n) for n in manifest["shape"]]
        for name, part in [*per_layer.items(), *(per_token or {}).items()]:
            if list(part.shape[:2]) != shape:
                raise ValueError(f"layer {name!r} has scores {list(part.shape)}, not {shape} as the manifest says")
        damping = {str(k): float(v) for k, v in manifest["damping"].items()}
        return SavedScores(per_layer, str(manifest["method"]), damping, per_token, ids, descriptions)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError, ConfigurationError) as err:
        raise HookinfError(f"{directory}: corrupt hookinf scores ({type(err).__name__}: {err}).") from err


def _read_descriptions(names: object, tensors: dict[str, Tensor]) -> Descriptions | None:
    """The descriptions the manifest lists, taken out of ``tensors``; ``None`` when it lists none."""
    if not isinstance(names, list) or not all(name in FIELDS for name in names):
        raise ValueError(f"descriptions is {names!r}, not a list of {', '.join(FIELDS)}")
    if not names:
        return None
    fields = {name: tensors.pop(_DESCRIBE + name) for name in names}
    texts = {name: strings_from_tensor(value) for name, value in fields.items() if name.endswith("_text")}
    return Descriptions.of(**{**fields, **texts})
