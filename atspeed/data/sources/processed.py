"""The paper authors' processed layout: ``sequential_{train,valid,test}.txt``, already split by time.

Each line is ``user_id item item ...`` (a user may have no items in a period). Every user has one
line in each of the three files. A user's sequence is train + valid + test items, with ``periods``
0 / 1 / 2 marking which file each came from; there are no timestamps, ratings or item text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jsonargparse.typing import NonNegativeInt

from atspeed.data.schema import Interactions
from atspeed.data.sources.common import KEY, SourceOptions, iter_lines, line_error, require_dir, require_file, sort_ids
from atspeed.errors import DataError

PERIOD_FILES = ("sequential_train.txt", "sequential_valid.txt", "sequential_test.txt")
"""The three files, in period order 0 / 1 / 2."""

UserLines = dict[str, tuple[int, list[str]]]
"""Per user id, the line number it was read from and its item ids."""


@dataclass(frozen=True, kw_only=True)
class ProcessedOptions(SourceOptions):
    """The authors' processed layout (e.g. their Amazon Beauty release): a directory of ``sequential_*.txt``."""

    path: str
    """Directory holding ``sequential_{train,valid,test}.txt`` (and, optionally, one item index ``*.json``)."""
    name: str | None = None
    """Dataset name; default: the directory name."""
    kcore: NonNegativeInt = 0
    """Iteratively drop users and items with fewer interactions than this; 0 or 1 = off."""

    def check(self) -> None:
        require_dir(Path(self.path), f"{KEY}.path")

    def bundled_index(self) -> Path | None:
        """The directory's one ``*.json`` (the release's item index), if it holds one; several is an error."""
        found = sorted(Path(self.path).glob("*.json"))
        if len(found) > 1:
            raise DataError(f"data.index_file: {self.path} holds several index JSON files; name one")
        return found[0] if found else None


def load_processed(options: ProcessedOptions) -> Interactions:
    """Read a directory in the processed layout (any dataset, not only Beauty)."""
    directory = require_dir(Path(options.path), f"{KEY}.path")
    paths = [require_file(directory / f, f"{KEY}.path") for f in PERIOD_FILES]
    parts = [_read_period_file(p) for p in paths]
    _check_same_users(paths, parts)
    user_ids = sort_ids(parts[0])
    item_ids = sort_ids(item for part in parts for _, items in part.values() for item in items)
    item_index = {item: i for i, item in enumerate(item_ids)}
    sequences: list[list[int]] = []
    periods: list[list[int]] = []
    for user in user_ids:
        seq: list[int] = []
        per: list[int] = []
        for period, part in enumerate(parts):
            items = part[user][1]
            seq.extend(item_index[i] for i in items)
            per.extend([period] * len(items))
        sequences.append(seq)
        periods.append(per)
    return Interactions(
        name=options.name or directory.name,
        user_ids=user_ids,
        item_ids=item_ids,
        sequences=sequences,
        periods=periods,
    )


def _read_period_file(path: Path) -> UserLines:
    """Parse one period file; blank lines are skipped, a repeated user is an error."""
    users: UserLines = {}
    for lineno, line in iter_lines(path):
        fields = line.split()
        if not fields:
            continue
        user, items = fields[0], fields[1:]
        bad = next((item for item in fields if not item.isdigit()), None)
        if bad is not None:
            raise line_error(path, lineno, f"ids in this layout are non-negative integers, got {bad!r}")
        if user in users:
            raise line_error(path, lineno, f"user {user!r} already appeared on line {users[user][0]}")
        users[user] = (lineno, items)
    return users


def _check_same_users(paths: list[Path], parts: list[UserLines]) -> None:
    """Every user must have a line in all three files; name the first file and line that breaks this."""
    reference_path, reference = paths[0], parts[0]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        for user, (lineno, _) in part.items():
            if user not in reference:
                raise line_error(path, lineno, f"user {user!r} has no line in {reference_path.name}")
        for user, (lineno, _) in reference.items():
            if user not in part:
                raise line_error(reference_path, lineno, f"user {user!r} has no line in {path.name}")
