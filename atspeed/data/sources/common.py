"""What the source loaders share: the options base class, path checks, line reading, id ordering, assembly, k-core."""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from atspeed.data.schema import Interactions
from atspeed.errors import DataError

KEY = "data.source.init_args"
"""Where a source's options sit in a config: ``data.source.init_args.<field>`` (messages name the field so)."""


class SourceOptions:
    """Base of the per-source options classes (``data.source``: one subclass, chosen by ``class_path``).

    Each subclass is a frozen, keyword-only dataclass whose fields are that source's settings (their docstrings are
    the ``--help`` text), ``kcore`` among them, and has one row in ``atspeed.data.sources.SOURCES`` naming its
    loader. The base itself is a plain class, so that jsonargparse reads ``data.source`` as ``class_path`` +
    ``init_args``.
    """

    kcore: int
    """Iteratively drop users and items with fewer interactions than this; 0 or 1 = off (applied after loading)."""

    def __post_init__(self) -> None:
        if self.kcore < 0:
            raise ValueError(f"{KEY}.kcore must be >= 0, got {self.kcore}")

    def check(self) -> None:
        """Refuse missing files before anything is built (the data module calls it from its constructor)."""

    def bundled_index(self) -> Path | None:
        """An item index JSON that ships with the data, used when ``data.index_file`` is not given; None: none."""
        return None


class Event(NamedTuple):
    """One interaction as read from a source file, before ids become indices."""

    user: str
    item: str
    timestamp: float | None = None


def line_error(path: Path, lineno: int, what: str) -> DataError:
    """A ``DataError`` pointing at ``path:lineno``."""
    return DataError(f"{path}:{lineno}: {what}")


def require_dir(path: Path, key: str) -> Path:
    """Return ``path`` if it is a directory, else raise naming the config ``key`` that gave it."""
    if not path.is_dir():
        raise DataError(f"{key}: directory not found: {path}")
    return path


def require_file(path: Path, key: str) -> Path:
    """Return ``path`` if it is a file, else raise naming the config ``key`` that gave it."""
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    return path


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(lineno, line)`` (1-based, line ending stripped) from a UTF-8 text file, gzipped when named ``*.gz``."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise line_error(path, lineno, f"not UTF-8 text ({err.reason})") from err
                yield lineno, line.rstrip("\r\n")
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err})") from err


def sort_ids(ids: Iterable[str]) -> list[str]:
    """Distinct ids, sorted numerically when all are non-negative integers, else as strings."""
    distinct = set(ids)
    if all(i.isascii() and i.isdigit() for i in distinct):
        return sorted(distinct, key=lambda i: (int(i), i))
    return sorted(distinct)


def assemble(name: str, events: Iterable[Event], item_text: Mapping[str, str] | None = None) -> Interactions:
    """Group events by user into ``Interactions``; users and items ordered by ``sort_ids``.

    When the events carry timestamps (all of them, or none), each user's events are sorted by time,
    stably, so ties keep file order. Items missing from ``item_text`` get empty text.
    """
    by_user: dict[str, list[Event]] = {}
    for event in events:
        by_user.setdefault(event.user, []).append(event)
    timed = all(e.timestamp is not None for evs in by_user.values() for e in evs)
    if timed:
        for evs in by_user.values():
            evs.sort(key=lambda e: e.timestamp)
    user_ids = sort_ids(by_user)
    item_ids = sort_ids(e.item for evs in by_user.values() for e in evs)
    item_index = {item: i for i, item in enumerate(item_ids)}
    return Interactions(
        name=name,
        user_ids=user_ids,
        item_ids=item_ids,
        sequences=[[item_index[e.item] for e in by_user[u]] for u in user_ids],
        timestamps=[[float(e.timestamp) for e in by_user[u]] for u in user_ids] if timed else None,  # type: ignore[arg-type]
        item_text=[item_text.get(i, "") for i in item_ids] if item_text is not None else None,
    )


def kcore_filter(data: Interactions, k: int) -> Interactions:
    """Iteratively drop interactions of users and items with fewer than ``k`` interactions until stable.

    Repeat interactions count each time. ``k`` of 0 or 1 returns ``data`` unchanged. Users left with
    no interactions are dropped; surviving items keep their relative order in ``item_ids``.
    """
    if k <= 1:
        return data
    keep = [[True] * len(seq) for seq in data.sequences]
    changed = True
    while changed:
        changed = False
        user_counts = [sum(flags) for flags in keep]
        item_counts: Counter[int] = Counter()
        for seq, flags in zip(data.sequences, keep, strict=True):
            item_counts.update(i for i, f in zip(seq, flags, strict=True) if f)
        for u, (seq, flags) in enumerate(zip(data.sequences, keep, strict=True)):
            for j, item in enumerate(seq):
                if flags[j] and (user_counts[u] < k or item_counts[item] < k):
                    flags[j] = False
                    changed = True
    return _subset(data, keep)


def _subset(data: Interactions, keep: list[list[bool]]) -> Interactions:
    """The interactions flagged in ``keep``, with empty users and unused items removed and indices compacted."""
    users = [u for u, flags in enumerate(keep) if any(flags)]
    used = sorted({i for u in users for i, f in zip(data.sequences[u], keep[u], strict=True) if f})
    new_index = {old: new for new, old in enumerate(used)}

    def pick(rows: list[list[int]] | list[list[float]] | None) -> list | None:
        if rows is None:
            return None
        return [[x for x, f in zip(rows[u], keep[u], strict=True) if f] for u in users]

    return Interactions(
        name=data.name,
        user_ids=[data.user_ids[u] for u in users],
        item_ids=[data.item_ids[i] for i in used],
        sequences=[[new_index[i] for i in seq] for seq in pick(data.sequences) or []],
        timestamps=pick(data.timestamps),
        periods=pick(data.periods),
        item_text=[data.item_text[i] for i in used] if data.item_text is not None else None,
    )
