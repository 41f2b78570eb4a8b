"""The item index: item id -> identifier tokens (``["<a_47>", "<b_103>", "<c_234>", "<d_99>"]``).

An identifier has L tokens, one token *family* per level (level 0 uses ``<a_*>``, level 1 ``<b_*>``, ...).
The index guarantees that identifiers are well formed, of one length and pairwise distinct, so a
decoded identifier names exactly one item. Index files are read and written by
``atspeed.data.index_file``; this module does no file I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from atspeed.errors import DataError

TOKEN_PATTERN = re.compile(r"<([a-z]+)_(\d+)>")
"""A code token: ``<family_number>``, e.g. ``<a_12>``."""

MIN_CODEBOOK = 256
"""Duplicates are moved to codes 0..max(MIN_CODEBOOK - 1, highest code seen) at the last level."""

_SHOWN_GROUPS = 3

OnDuplicate = Literal["error", "resolve"]


def parse_token(token: str) -> tuple[str, int]:
    """Split ``"<a_12>"`` into ``("a", 12)``; raise ValueError if it is not a code token."""
    match = TOKEN_PATTERN.fullmatch(token) if isinstance(token, str) else None
    if match is None:
        raise ValueError(f"token {token!r} is not of the form <family_number>, e.g. <a_12>")
    return match.group(1), int(match.group(2))


def format_token(family: str, number: int) -> str:
    """The inverse of :func:`parse_token`."""
    return f"<{family}_{number}>"


def _check_codes(item_ids: Sequence[str], codes: Sequence[Sequence[str]], source: str) -> tuple[str, ...]:
    """Validate shape, token syntax and per-level families; return the family of each level."""
    if len(item_ids) == 0:
        raise DataError(f"{source}: the item index is empty")
    if len(item_ids) != len(codes):
        raise DataError(f"{source}: {len(item_ids)} item ids but {len(codes)} identifiers")
    if len(set(item_ids)) != len(item_ids):
        raise DataError(f"{source}: item ids are not unique")
    first_id, levels = item_ids[0], len(codes[0])
    if levels == 0:
        raise DataError(f"{source}: item {first_id!r} has an empty identifier")
    families: list[str] = []
    for item_id, code in zip(item_ids, codes, strict=True):
        if len(code) != levels:
            raise DataError(
                f"{source}: item {item_id!r} has {len(code)} tokens, expected {levels} (as item {first_id!r})"
            )
        for level, token in enumerate(code):
            try:
                family, _ = parse_token(token)
            except ValueError as err:
                raise DataError(f"{source}: item {item_id!r}: {err}") from None
            if level == len(families):
                families.append(family)
            elif family != families[level]:
                raise DataError(
                    f"{source}: item {item_id!r}: token {token!r} at level {level} is of family {family!r}, "
                    f"but level {level} uses family {families[level]!r} (item {first_id!r})"
                )
    if len(set(families)) != len(families):
        raise DataError(f"{source}: levels must use distinct token families, got {families}")
    return tuple(families)


def _duplicate_groups(codes: Sequence[tuple[str, ...]]) -> list[list[int]]:
    """Positions of items sharing an identifier, one list per shared identifier, in index order."""
    by_code: dict[tuple[str, ...], list[int]] = {}
    for position, code in enumerate(codes):
        by_code.setdefault(code, []).append(position)
    return [group for group in by_code.values() if len(group) > 1]


def _duplicates_message(
    source: str, item_ids: Sequence[str], codes: Sequence[tuple[str, ...]], groups: list[list[int]]
) -> str:
    n_items = sum(len(group) for group in groups)
    shown = "; ".join(
        f"items {', '.join(repr(item_ids[p]) for p in group)} -> {' '.join(codes[group[0]])}"
        for group in groups[:_SHOWN_GROUPS]
    )
    more = f"; and {len(groups) - _SHOWN_GROUPS} more groups" if len(groups) > _SHOWN_GROUPS else ""
    return (
        f"{source}: {n_items} items share an identifier with another item ({len(groups)} groups): {shown}{more}. "
        "Decoded identifiers must name one item: set `data.on_duplicate_ids: resolve` to give each item after "
        "the first in a group a distinct identifier (its last-level token is changed)."
    )


def _resolve_duplicates(
    codes: list[tuple[str, ...]], groups: list[list[int]], last_family: str, source: str
) -> list[tuple[str, ...]]:
    """Give every item after the first of each group the lowest free last-level token under its prefix."""
    highest = max(parse_token(code[-1])[1] for code in codes)
    max_code = max(MIN_CODEBOOK - 1, highest)
    used = set(codes)
    resolved = list(codes)
    for group in groups:
        prefix = codes[group[0]][:-1]
        for position in group[1:]:
            free = (code for n in range(max_code + 1) if (code := (*prefix, format_token(last_family, n))) not in used)
            candidate = next(free, None)
            if candidate is None:
                raise DataError(
                    f"{source}: cannot resolve duplicates: all {max_code + 1} last-level tokens under prefix "
                    f"{' '.join(prefix)} are taken"
                )
            used.add(candidate)
            resolved[position] = candidate
    return resolved


@dataclass(frozen=True)
class ItemIndex:
    """Aligned item ids and their (distinct, equal-length) identifiers; positions are the item index."""

    item_ids: tuple[str, ...]
    codes: tuple[tuple[str, ...], ...]
    _positions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "item_ids", tuple(self.item_ids))
        object.__setattr__(self, "codes", tuple(tuple(code) for code in self.codes))
        _check_codes(self.item_ids, self.codes, "ItemIndex")
        groups = _duplicate_groups(self.codes)
        if groups:
            raise DataError(_duplicates_message("ItemIndex", self.item_ids, self.codes, groups))
        object.__setattr__(self, "_positions", {item_id: p for p, item_id in enumerate(self.item_ids)})

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Sequence[str]], source: str, on_duplicate: OnDuplicate = "error"
    ) -> tuple[ItemIndex, int]:
        """Build the index from ``{item_id: [token, ...]}`` (the index-JSON layout), keeping its order.

        ``source`` names the origin (a file path) in error messages. Returns the index and the number of
        items whose identifier was changed to resolve duplicates (0 with ``on_duplicate="error"``).
        """
        if on_duplicate not in ("error", "resolve"):
            raise ValueError(f"on_duplicate must be 'error' or 'resolve', got {on_duplicate!r}")
        if not mapping:
            raise DataError(f"{source}: the item index is empty")
        item_ids = [str(item_id) for item_id in mapping]
        codes: list[tuple[str, ...]] = []
        for item_id, code in mapping.items():
            if isinstance(code, str) or not isinstance(code, Sequence):
                raise DataError(f"{source}: item {item_id!r}: expected a list of tokens, got {type(code).__name__}")
            codes.append(tuple(code))
        families = _check_codes(item_ids, codes, source)
        groups = _duplicate_groups(codes)
        if groups and on_duplicate == "error":
            raise DataError(_duplicates_message(source, item_ids, codes, groups))
        changed = sum(len(group) - 1 for group in groups)
        if groups:
            codes = _resolve_duplicates(codes, groups, families[-1], source)
        return cls(tuple(item_ids), tuple(codes)), changed

    @property
    def levels(self) -> int:
        """L, the number of tokens per identifier."""
        return len(self.codes[0])

    @property
    def families(self) -> tuple[str, ...]:
        """The token family of each level, e.g. ``("a", "b", "c", "d")``."""
        return tuple(parse_token(token)[0] for token in self.codes[0])

    def __len__(self) -> int:
        return len(self.item_ids)

    def level_tokens(self) -> list[list[str]]:
        """Per level, the distinct tokens used there, sorted by number."""
        return [
            sorted({code[level] for code in self.codes}, key=lambda token: parse_token(token)[1])
            for level in range(self.levels)
        ]

    def all_tokens(self) -> list[str]:
        """Every distinct code token, level by level (the tokens to add to a tokenizer)."""
        return [token for tokens in self.level_tokens() for token in tokens]

    def to_mapping(self) -> dict[str, list[str]]:
        """``{item_id: [token, ...]}`` in index order (the index-JSON layout)."""
        return {item_id: list(code) for item_id, code in zip(self.item_ids, self.codes, strict=True)}

    def position(self, item_id: str) -> int:
        """The item index (position) of ``item_id``; KeyError if unknown."""
        try:
            return self._positions[item_id]
        except KeyError:
            raise KeyError(f"item {item_id!r} is not in the item index") from None
