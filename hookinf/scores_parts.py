"""Pure helpers of :class:`~hookinf.Scores` that need no :class:`~hookinf.Scores`: layer groups and the flat table.

:func:`layer_groups` turns ``Scores.grouped(by)``'s rule into groups of layer names; :func:`score_frame` builds the
columns of ``Scores.to_pandas()``. Both take plain tensors and names, so :mod:`hookinf.scores` imports this module
and not the reverse.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.ids import Ids

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]


def layer_groups(names: Iterable[str], by: str | Callable[[str], str]) -> dict[str, list[str]]:
    """Group name → its layers (in the order given), groups in the order of their first layer.

    Args:
        names: the layer names, model order.
        by: a regular expression whose first match in a layer's name names its group (the first capturing group
            when it has one; layers it does not match keep their own name), or a function layer name → group name.

    Raises:
        ConfigurationError: ``by`` is not a regular expression or a function, or the function returns a non-string.
    """
    key: Callable[[str], str]
    if isinstance(by, str):
        try:
            pattern = re.compile(by)
        except re.error as err:
            raise ConfigurationError(f"grouped({by!r}): not a regular expression ({err}).") from err

        def key(name: str) -> str:
            found = pattern.search(name)
            if found is None:
                return name
            return str(found.group(1) if pattern.groups else found.group(0))

    elif callable(by):
        key = by
    else:
        raise ConfigurationError(f"grouped(by={by!r}): give a regular expression or a function layer → group.")
    groups: dict[str, list[str]] = {}
    for name in names:
        group = key(name)
        if not isinstance(group, str):
            raise ConfigurationError(f"grouped: the group of layer {name!r} must be a str, got {group!r}.")
        groups.setdefault(group, []).append(name)
    return groups


def score_frame(per_layer: dict[str, Tensor], total: Tensor, ids: Ids | None) -> pd.DataFrame:
    """The pandas DataFrame of :meth:`hookinf.Scores.to_pandas` (see there for its columns).

    Raises:
        ConfigurationError: pandas is not installed.
    """
    try:
        import pandas as pd
    except ImportError as err:
        raise ConfigurationError(
            "Scores.to_pandas needs pandas, which is not installed: pip install 'hookinf[report]'."
        ) from err
    n_query, n_train = total.shape
    columns: dict[str, Any] = {
        "query": torch.arange(n_query, device="cpu").repeat_interleave(n_train).numpy(),
        "train": torch.arange(n_train, device="cpu").repeat(n_query).numpy(),
    }
    if isinstance(ids, Tensor):
        columns["id"] = ids.detach().cpu().repeat(n_query).numpy()
    elif ids is not None:
        columns["id"] = ids * n_query
    columns["score"] = total.detach().cpu().flatten().numpy()
    for name, part in per_layer.items():
        columns[f"layer/{name or '<model>'}"] = part.detach().cpu().flatten().numpy()
    return pd.DataFrame(columns)
