"""The types a checkpoint's hyper-parameters may hold, read from the typed signatures of the classes that save them.

Lightning pickles each module's and the data module's ``__init__`` arguments into the checkpoint; ``torch.load`` with
``weights_only=True`` refuses any class it was not told about. The arguments are exactly what the signatures say
(the CLI parses them from those types), so the allow-list is derived from them here, never kept by hand: a new
options dataclass or ``jsonargparse`` range type in a signature is allowed as soon as it is written.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Iterable

_BUILTIN = (bool, int, float, str, bytes, complex, type(None))


def _allowed(kind: object) -> bool:
    """A class ``torch.load`` must be told about: a dataclass, an enum, or a subclass of a builtin scalar (the
    ``PositiveInt`` kind)."""
    if not isinstance(kind, type) or kind in _BUILTIN:
        return False
    return dataclasses.is_dataclass(kind) or issubclass(kind, (enum.Enum, *_BUILTIN))


def _walk(hint: object, found: dict[type, None]) -> None:
    """Add the classes in type ``hint`` (through unions, containers and dataclass fields) to ``found``."""
    for arg in typing.get_args(hint):
        _walk(arg, found)
    if not _allowed(hint) or hint in found:
        return
    found[hint] = None
    if dataclasses.is_dataclass(hint):
        for field_hint in typing.get_type_hints(hint).values():
            _walk(field_hint, found)


def checkpoint_types(classes: Iterable[type]) -> list[type]:
    """Every class ``torch.load(weights_only=True)`` needs for the saved ``__init__`` arguments of ``classes``."""
    found: dict[type, None] = {}
    for cls in classes:
        for hint in typing.get_type_hints(cls.__init__).values():
            _walk(hint, found)
    return list(found)
