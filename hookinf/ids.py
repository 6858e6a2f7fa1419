"""Example ids: integers (an ``int64`` tensor ``[n]`` on the host) or strings (a ``list[str]``), never a mix.

Integer ids are dataset positions or integer keys; string ids are document ids, file names, a Hugging Face dataset's
``id`` column. :func:`as_ids` is the one front door: it takes what a loop or an ``ids=`` function gives (a tensor,
a numpy array, a list, a range) and refuses what would silently lose information — a non-integer float (which
``int()`` would truncate), a boolean, or strings mixed with numbers. The other functions treat both kinds alike, so
the logger, the store and :class:`~hookinf.Scores` need no branch of their own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError, DataError

Ids = Tensor | list[str]
"""Example ids: an ``int64`` tensor ``[n]`` on the host, or a list of ``n`` strings."""

IdKind = Literal["int", "str"]

_EXACT = 2**53  # larger whole floats may already have been rounded


def as_ids(values: Any, what: str) -> Ids:
    """``values`` as :data:`Ids`, refusing anything that would not survive as given.

    Args:
        values: integers (a tensor, numpy array, list, tuple or range; whole-number floats are taken as integers),
            or strings (a list, tuple or numpy array of ``str``).
        what: how the caller names the ids, for the error message (``"w.tag(ids)"``).

    Returns:
        An ``int64`` tensor ``[n]`` on the CPU, or a new ``list[str]``.

    Raises:
        DataError: a non-integer, non-finite or boolean id, strings mixed with numbers, or a single string.
    """
    if isinstance(values, Tensor):
        return _integers(values, what)
    if isinstance(values, str | bytes):
        raise DataError(f"{what}: give one id per example (a list or tensor), not the single value {values!r}.")
    kind = getattr(getattr(values, "dtype", None), "kind", None)  # numpy arrays: 'U' str, 'O' object, 'f' float ...
    if kind is not None and kind not in "OUS":
        return _integers(torch.as_tensor(values, device="cpu"), what)
    items = list(values.tolist() if kind is not None else values)
    strings = [isinstance(item, str) for item in items]
    if items and all(strings):
        return [str(item) for item in items]
    if any(strings):
        first_str = items[strings.index(True)]
        first_other = items[strings.index(False)]
        raise DataError(
            f"{what}: the ids mix strings and numbers ({first_str!r} and {first_other!r}); use one kind of id "
            f"(a store holds either integer or string ids)."
        )
    if any(isinstance(item, bool) for item in items):
        raise DataError(f"{what}: ids must be integers or strings, not booleans.")
    try:
        tensor = torch.as_tensor(items, device="cpu") if items else torch.zeros(0, dtype=torch.int64, device="cpu")
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"{what}: ids must be integers or strings; got {items[:3]!r} ({err}).") from err
    return _integers(tensor, what)


def _integers(tensor: Tensor, what: str) -> Tensor:
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool or flat.is_complex():
        raise DataError(f"{what}: ids must be integers or strings; got a {flat.dtype} tensor.")
    if flat.is_floating_point():
        host = flat.to(device="cpu", dtype=torch.float64)
        bad = ~torch.isfinite(host) | (host != host.round()) | (host.abs() > _EXACT)
        if bool(bad.any()):
            value = float(host[bad][0])
            raise DataError(
                f"{what}: id {value!r} is not a whole number; ids must be integers or strings (a float id would be "
                f"truncated, so two examples could share an id)."
            )
    return flat.to(device="cpu", dtype=torch.int64)


def id_kind(ids: Ids) -> IdKind:
    """``"int"`` or ``"str"``."""
    return "int" if isinstance(ids, Tensor) else "str"


def id_count(ids: Ids) -> int:
    """The number of ids."""
    return int(ids.numel()) if isinstance(ids, Tensor) else len(ids)


def id_values(ids: Ids) -> list[int] | list[str]:
    """The ids as Python values (for sets and messages)."""
    if isinstance(ids, Tensor):
        values: list[int] = ids.tolist()
        return values
    return list(ids)


def empty_ids(kind: IdKind) -> Ids:
    """No ids of the given kind."""
    return torch.zeros(0, dtype=torch.int64, device="cpu") if kind == "int" else []  # the host, whatever the default


def take(ids: Ids, index: Tensor | Sequence[int]) -> Ids:
    """The ids at positions ``index`` (in that order)."""
    if isinstance(ids, Tensor):
        return ids[torch.as_tensor(index, dtype=torch.int64, device=ids.device)]
    positions: list[int] = index.tolist() if isinstance(index, Tensor) else list(index)
    return [ids[i] for i in positions]


def concat(parts: Sequence[Ids]) -> Ids:
    """The ids of ``parts`` one after the other (all of one kind, empty parts aside; no ids: integer ones).

    Raises:
        DataError: the parts mix integer and string ids.
    """
    parts = [part for part in parts if id_count(part)]
    if len({id_kind(part) for part in parts}) > 1:
        raise DataError("cannot join integer and string ids: a store or a set of scores holds one kind of id.")
    if not parts:
        return empty_ids("int")
    if isinstance(parts[0], Tensor):
        return torch.cat([part for part in parts if isinstance(part, Tensor)])
    return [value for part in parts if isinstance(part, list) for value in part]


def sort_order(ids: Ids) -> Tensor:
    """The stable permutation ``[n]`` (int64) that sorts the ids (strings by code point)."""
    if isinstance(ids, Tensor):
        return torch.sort(ids, stable=True).indices
    return torch.tensor(sorted(range(len(ids)), key=ids.__getitem__), dtype=torch.int64, device="cpu")


def same_ids(left: Ids | None, right: Ids | None) -> bool:
    """Whether two sets of ids (or two ``None``) are the same, in the same order."""
    if left is None or right is None:
        return left is right
    if isinstance(left, Tensor) and isinstance(right, Tensor):
        return torch.equal(left, right)
    return id_kind(left) == id_kind(right) and id_values(left) == id_values(right)


def check_ids(ids: Ids, n: int) -> None:
    """Refuses ids that are not ``n`` ids of one kind (``int64 [n]``, or a list of ``n`` strings).

    Raises:
        ConfigurationError: names what is wrong.
    """
    if isinstance(ids, Tensor):
        if ids.dtype != torch.int64 or tuple(ids.shape) != (n,):
            raise ConfigurationError(f"ids {ids.dtype} {list(ids.shape)} must be int64 [{n}]: one id per column.")
    elif not isinstance(ids, list) or not all(isinstance(value, str) for value in ids):
        raise ConfigurationError("ids must be an int64 tensor or a list of strings (one id per column).")
    elif len(ids) != n:
        raise ConfigurationError(f"{len(ids)} ids for {n} columns: give one id per column.")


def strings_to_tensor(ids: Sequence[str]) -> Tensor:
    """String ids as a ``uint8`` tensor (their UTF-8 JSON list), to keep them in a safetensors file."""
    data = json.dumps(list(ids), ensure_ascii=False).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def strings_from_tensor(tensor: Tensor) -> list[str]:
    """The string ids kept by :func:`strings_to_tensor`.

    Raises:
        ValueError: the tensor does not hold a JSON list of strings.
    """
    values = json.loads(bytes(tensor.to("cpu", torch.uint8).numpy().tobytes()).decode("utf-8"))
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise ValueError("the stored string ids are not a list of strings")
    return values
