"""The documentation runs as written: every ``python`` block of README.md and docs/, page by page.

mktestdocs (``check_md_file(memory=True)``) joins the ``python`` blocks of one page, in order, into one script and
executes it in a fresh namespace: a page may build on its earlier blocks (each page starts with a visible set-up
block), never on another page or on anything hidden here. Blocks that are not meant to run (signatures, shell
commands, printed output) are tagged ``text``, ``bash``... and are not executed. The script runs in a temporary
directory, so the files the blocks write (stores, curvatures, HTML reports) never land in the repository.
"""

import re
from pathlib import Path

import mktestdocs
import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # docs/_ext holds code, no page
# Pages without a python block have nothing to run.
PAGES = [page for page in ALL_PAGES if mktestdocs.grab_code_blocks(page.read_text(encoding="utf-8"), lang="python")]


def test_the_pages_with_code_are_found():
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "docs/quickstart.md", "docs/huggingface.md", "docs/report.md"} <= names, names


def test_no_python_block_escapes_the_run():
    # mktestdocs runs the fences whose info string is exactly `python`; `py`, `python3`, `python title="..."` or
    # `{.python}` would be shown as Python and silently not run. (`pycon`, `text`, `bash`... are not Python.)
    fence = re.compile(r"^[ \t]*```+[ \t]*(?P<info>[^`\n]*?)[ \t]*$", re.MULTILINE)
    python_like = re.compile(r"^\{?\s*\.?(py|python|python3)\b")
    escaped = [
        f"{page.relative_to(ROOT).as_posix()}: ```{match['info']}"
        for page in ALL_PAGES
        for match in fence.finditer(page.read_text(encoding="utf-8"))
        if python_like.match(match["info"]) and match["info"] != "python"
    ]
    assert not escaped, escaped


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_page_runs_as_one_script(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files written by the blocks go here
    mktestdocs.check_md_file(page, memory=True, lang="python")
