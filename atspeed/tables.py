"""Tables for people: ``text_table`` renders rows for a terminal or a log through ``rich``; ``markdown_table`` writes
the same rows as a markdown table for documents. Cells are given already formatted (strings)."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

from rich import box
from rich.console import Console
from rich.table import Table


def text_table(columns: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1, title: str | None = None) -> str:
    """Plain text (no colour, no markup): a header, a rule, one line per row; the first ``left`` columns are
    left-aligned, the rest (numbers) right-aligned."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < left else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    out = io.StringIO()
    console = Console(file=out, width=10_000, color_system=None, markup=False, emoji=False, highlight=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines() if line.strip())


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table (for files under docs/ and reports): a header row, the ``|---|`` rule, one line per row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
