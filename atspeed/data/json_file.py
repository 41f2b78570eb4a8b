"""Read a JSON file strictly: bad JSON and duplicate keys (which ``json`` would silently resolve to the last value)
end in one DataError naming the file and line; ``validated`` checks parsed data against a pydantic model, one
DataError naming the file and each bad key."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from atspeed.errors import DataError

M = TypeVar("M", bound=BaseModel)


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


def validated(model: type[M], data: Any, where: str | Path) -> M:
    """``data`` (parsed from the file ``where``) as the pydantic ``model``; else one DataError
    ``<where>: <key>: <what is wrong>`` naming every bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise DataError(f"{where}: {problems(err)}") from None


def problems(err: ValidationError) -> str:
    """Pydantic's errors as ``key: what is wrong (got value)`` (keys as ``stages[0].run``), joined by ``; ``."""
    found = []
    for error in err.errors():
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
        key = key or "top level"
        got = "" if error["type"] in ("missing", "value_error") else f" (got {_short(error['input'])})"
        message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        found.append(f"{key}: {message}{got}")
    return "; ".join(found)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
