"""Report tables shared by the benchmarks: each printed with rich and written as markdown (internal helper)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


@dataclass
class Section:
    """One table of the report: printed with rich, and written as markdown."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rich(self) -> Table:
        table = Table(title=self.title, title_justify="left", caption_justify="left")
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i == 0 else "right", overflow="fold")
        for row in self.rows:
            table.add_row(*(escape(cell) for cell in row))
        if self.notes:
            table.caption = escape("\n".join(self.notes))
        return table

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(c.replace("|", "\\|") for c in self.columns) + " |"]
        lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(self.columns) - 1)) + "|")
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


class Report:
    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self.header: list[str] = []
        self.sections: list[Section] = []

    def run_header(self, script: str, argv: Sequence[str], threads: int | None) -> None:
        """The header every results file starts with: the command, the versions, threads, CPUs, load and date."""
        import torch

        import hookinf

        python = os.path.relpath(sys.executable) if sys.executable.startswith(str(Path.cwd())) else sys.executable
        self.line(f"command: {shlex.join([python, os.path.relpath(script), *argv])}")
        shown = "" if threads is None else f"{threads} torch thread(s) · "
        self.line(
            f"torch {torch.__version__} · hookinf {hookinf.__version__} · Python {platform.python_version()} · "
            f"{shown}{os.cpu_count()} CPUs · load average at start {os.getloadavg()[0]:.2f} · "
            f"{time.strftime('%Y-%m-%d %H:%M')}"
        )

    def line(self, text: str) -> None:
        self.header.append(text)
        self.console.print(text, highlight=False, soft_wrap=True)

    def add(self, section: Section) -> None:
        self.sections.append(section)
        self.console.print(section.rich())
        self.console.print()

    def markdown(self) -> str:
        head = f"# {self.title}\n\n" + "\n".join(f"    {h}" for h in self.header)
        return head + "\n\n" + "\n".join(section.markdown() for section in self.sections)
