"""Griffe extension used by the documentation build (``mkdocs.yml``); not part of the hookinf package.

hookinf's docstrings cross-reference with Sphinx roles (``:func:`hookinf.watch```, ``:class:`~hookinf.Scores```,
``:meth:`apply```), which Markdown would print verbatim. Before mkdocstrings renders a docstring, this extension turns
each role into a link to the object's documentation, resolving relative names in the docstring's own scope as Sphinx
would. Links are *optional* autorefs: a target that no page documents (a private helper) renders as plain code
instead of failing the strict build. It also drops reST's ``::`` literal-block marker and puts the blank line that
Markdown needs before a bullet list that directly follows a paragraph line.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|attr|data|exc|obj):`(~?)\.?([\w.]+)(?:\(\))?`")
_CALLABLE_ROLES = {"func", "class", "meth", "exc"}
_BULLET = re.compile(r"^\s*[*-] ")


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the loaded package once it is fully loaded (aliases included)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Converts the docstrings of ``pkg`` and all its members."""
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _convert(obj, obj.docstring.value, loader.modules_collection)


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found.extend(_objects(member))  # type: ignore[arg-type]
    return found


def _convert(obj: griffe.Object, text: str, collection: griffe.ModulesCollection) -> str:
    def link(match: re.Match[str]) -> str:
        role, short, target = match.groups()
        title = target.rsplit(".", 1)[-1] if short else target
        code = f"<code>{html.escape(title)}</code>"
        path = _resolve(obj, target, role, collection)
        return f'<autoref identifier="{path}" optional>{code}</autoref>' if path else code

    text = _ROLE.sub(link, text)
    text = re.sub(r"(?<=\S)::$", ":", text, flags=re.MULTILINE)
    lines = text.split("\n")
    out: list[str] = []
    for line in lines:
        previous = out[-1] if out else ""
        if _BULLET.match(line) and previous.strip() and not _BULLET.match(previous) and not previous.startswith(" "):
            out.append("")
        out.append(line)
    return "\n".join(out)


def _resolve(obj: griffe.Object, target: str, role: str, collection: griffe.ModulesCollection) -> str | None:
    """The canonical path of ``target`` as seen from ``obj``'s scope, or ``None`` when it cannot be found."""
    head, _, rest = target.partition(".")
    if head in collection.members:
        path = target
    else:
        try:
            path = obj.resolve(head)
        except griffe.NameResolutionError:
            return None
        path = f"{path}.{rest}" if rest else path
    try:
        found: Any = collection[path]
        while found.is_alias:
            found = found.final_target
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    # `hookinf.watch` names both a module and the function the package re-exports from it
    name = path.rsplit(".", 1)[-1]
    if role in _CALLABLE_ROLES and found.is_module and name in found.members:
        return _resolve(found, name, role, collection)
    return str(found.path)
