"""Raw Amazon review dumps (McAuley lab), 2014 and 2018 releases; ``.gz`` files are read transparently.

Reviews: one record per line with ``reviewerID``, ``asin``, ``overall`` (rating) and ``unixReviewTime``.
The 2014 files mix strict JSON and Python dict literals (single quotes); 2018 files are JSON lines. A
line is parsed with ``json.loads``, falling back to ``ast.literal_eval`` (literals only, never ``eval``).
Metadata (optional): ``asin``, ``title``, ``brand`` and categories, as ``categories`` (2014, a list of
category paths) or ``category`` (2018, a flat list). Item text: ``"title: ...; categories: ...; brand: ..."``.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse.typing import NonNegativeInt

from atspeed.data.schema import Interactions
from atspeed.data.sources.common import KEY, Event, SourceOptions, assemble, iter_lines, line_error, require_file


@dataclass(frozen=True, kw_only=True)
class AmazonReviewsOptions(SourceOptions):
    """A raw Amazon review dump (McAuley lab) and, optionally, its metadata file; ``.gz`` files are read as is."""

    path: str
    """Reviews file (``reviews_Beauty_5.json.gz``, ``Beauty_5.json``, ...)."""
    meta_path: str | None = None
    """Item metadata file (titles, categories, brand: the item text semantic ids are built from); optional."""
    name: str | None = None
    """Dataset name; default: the reviews file name without ``.json`` / ``.gz``."""
    min_rating: float | None = None
    """Keep reviews rated at least this (the paper: 4); None keeps all."""
    kcore: NonNegativeInt = 0
    """Iteratively drop users and items with fewer interactions than this; 0 or 1 = off."""

    def check(self) -> None:
        require_file(Path(self.path), f"{KEY}.path")
        if self.meta_path is not None:
            require_file(Path(self.meta_path), f"{KEY}.meta_path")


@dataclass(frozen=True, kw_only=True)
class Amazon2014Options(AmazonReviewsOptions):
    """The 2014 release: categories as a list of category paths; lines may be Python dict literals."""


@dataclass(frozen=True, kw_only=True)
class Amazon2018Options(AmazonReviewsOptions):
    """The 2018 release: JSON lines; categories as a flat list."""


def load_amazon2014(options: Amazon2014Options) -> Interactions:
    """Reviews file ``options.path`` (+ metadata ``options.meta_path``) in the 2014 format."""
    return _load(options, category_key="categories")


def load_amazon2018(options: Amazon2018Options) -> Interactions:
    """Reviews file ``options.path`` (+ metadata ``options.meta_path``) in the 2018 format."""
    return _load(options, category_key="category")


def _load(options: AmazonReviewsOptions, category_key: str) -> Interactions:
    """Reviews kept by the rating filter, sorted per user by time, with item text from the metadata."""
    reviews_path = require_file(Path(options.path), f"{KEY}.path")
    events = list(_events(reviews_path, options.min_rating))
    item_text = None
    if options.meta_path is not None:
        meta_path = require_file(Path(options.meta_path), f"{KEY}.meta_path")
        item_text = _item_text(meta_path, {e.item for e in events}, category_key)
    return assemble(options.name or _stem(reviews_path), events, item_text)


def _stem(path: Path) -> str:
    """File name without ``.gz`` / ``.json`` suffixes: ``reviews_Beauty_5.json.gz`` -> ``reviews_Beauty_5``."""
    name = path.name
    for suffix in (".gz", ".json", ".jsonl"):
        name = name.removesuffix(suffix)
    return name


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(lineno, record)`` for each non-blank line: a JSON object or a Python dict literal."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            try:
                record = ast.literal_eval(line)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise line_error(path, lineno, "not a JSON object or Python dict literal") from None
        if not isinstance(record, dict):
            raise line_error(path, lineno, f"expected a record (dict), got {type(record).__name__}")
        yield lineno, record


def _field(path: Path, lineno: int, record: dict[str, Any], key: str) -> Any:
    """``record[key]``, or an error naming the line and the missing key."""
    if key not in record:
        raise line_error(path, lineno, f"missing key {key!r}")
    return record[key]


def _number(path: Path, lineno: int, record: dict[str, Any], key: str) -> float:
    """``record[key]`` as a float, or an error naming the line and the key."""
    value = _field(path, lineno, record, key)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise line_error(path, lineno, f"{key} {value!r} is not a number") from None


def _events(path: Path, min_rating: float | None) -> Iterator[Event]:
    """One event per review rated at least ``min_rating`` (all reviews when it is None)."""
    for lineno, record in _records(path):
        user, item = (str(_field(path, lineno, record, k)) for k in ("reviewerID", "asin"))
        rating = _number(path, lineno, record, "overall")
        time = _number(path, lineno, record, "unixReviewTime")
        if min_rating is None or rating >= min_rating:
            yield Event(user, item, time)


def _item_text(path: Path, items: set[str], category_key: str) -> dict[str, str]:
    """Text for the ``items`` that have a metadata line (first line wins); other lines are only checked."""
    text: dict[str, str] = {}
    for lineno, record in _records(path):
        asin = str(_field(path, lineno, record, "asin"))
        if asin in items and asin not in text:
            text[asin] = _describe(record, category_key)
    return text


def _describe(record: dict[str, Any], category_key: str) -> str:
    """``"title: ...; categories: a, b; brand: ..."``, leaving out what the record lacks."""
    parts = []
    title = str(record.get("title") or "").strip()
    if title:
        parts.append(f"title: {title}")
    categories = _flatten(record.get(category_key) or [])
    if categories:
        parts.append(f"categories: {', '.join(categories)}")
    brand = str(record.get("brand") or "").strip()
    if brand:
        parts.append(f"brand: {brand}")
    return "; ".join(parts)


def _flatten(value: Any) -> list[str]:
    """Distinct category names in first-seen order, from a string, a list, or a list of category paths."""
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    names: list[str] = []
    for entry in value if isinstance(value, (list, tuple)) else []:
        for name in _flatten(entry):
            if name not in names:
                names.append(name)
    return names
