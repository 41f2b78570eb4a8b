"""The code stays readable in pieces: no module over 300 lines and no function over 60 outside the tests (STYLE)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "atspeed").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])
MODULE_LINES, FUNCTION_LINES = 300, 60


def _too_long(path: Path) -> list[str]:
    text = path.read_text()
    found = [f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines"] if text.count("\n") > MODULE_LINES else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > FUNCTION_LINES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_or_function_is_too_long() -> None:
    found = [line for path in SOURCES for line in _too_long(path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(("text", "expected"), [("x = 1\n" * 301, 1), ("def f():\n" + "    x = 1\n" * 60, 1)])
def test_the_check_sees_a_long_module_and_a_long_function(tmp_path, text, expected) -> None:
    path = ROOT / "atspeed" / "_size_probe.py"
    try:
        path.write_text(text)
        assert len(_too_long(path)) == expected
    finally:
        path.unlink()
