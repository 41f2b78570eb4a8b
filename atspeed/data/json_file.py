"""Read a JSON file strictly: bad JSON and duplicate keys (which ``json`` would silently resolve to the last value)
end in one DataError naming the file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from atspeed.errors import DataError


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _line_of_second(text: str, key: str) -> int | None:
    """1-based line of the second ``"key":`` in ``text`` (where the duplicate stands), if it can be found."""
    hits = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
    return text.count("\n", 0, hits[1]) + 1 if len(hits) > 1 else None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse ``path``; DataError ``<path>:<line>: ...`` for a missing or unreadable file, bad JSON, a duplicate key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read {what}: {err}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    except _DuplicateKey as dup:
        line = _line_of_second(text, dup.key)
        where = f"{path}:{line}" if line else str(path)
        raise DataError(f"{where}: duplicate key {dup.key!r} in {what} (JSON keeps only one of them)") from None
