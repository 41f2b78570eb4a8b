"""``atspeed.tables``: the one place text and markdown tables are drawn."""

from __future__ import annotations

from atspeed.tables import markdown_table, text_table


def test_text_table_aligns_names_left_and_numbers_right() -> None:
    lines = text_table(["metric", "value"], [["val/recall@10", "0.1234"], ["calls", "12.50"]]).splitlines()
    assert lines[0].split() == ["metric", "value"] and set(lines[1]) == {"─"}
    assert lines[2].startswith("val/recall@10") and lines[3].startswith("calls ")
    assert lines[2].endswith("0.1234") and lines[3].endswith(" 12.50") and len(lines[2]) == len(lines[3])
    assert all(line == line.rstrip() for line in lines)


def test_text_table_prints_cells_as_given() -> None:
    """Brackets are data (an accepted-depth histogram, a run name), never rich markup; long rows never wrap."""
    cells = [["[1, 2, 3]", "[bold]x[/bold]", "y" * 300]]
    text = text_table(["histogram", "name", "long"], cells, left=3)
    lines = text.splitlines()
    assert len(lines) == 3 and all(cell in lines[2] for cell in cells[0])


def test_markdown_table() -> None:
    assert markdown_table(["K", "x"], [[10, "1.5x"]]) == "| K | x |\n|---|---|\n| 10 | 1.5x |"
