"""Reading a YAML file that the user wrote: one error naming the file and line instead of a parser traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from atspeed.errors import DataError


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed ``path`` (``what`` names the kind of file in errors: "pipeline file", "sweep file")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text YAML {what} (byte {err.start} is not UTF-8)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DataError(f"{where}: not a YAML {what} ({problem})") from None
