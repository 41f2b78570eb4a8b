"""Reading and writing index JSON files: ``{"0": ["<a_47>", "<b_103>", "<c_234>", "<d_99>"], ...}``.

This is the layout the paper's authors release (one JSON object, item id -> list of code tokens).
Structure is checked here; token syntax, lengths and duplicates are checked by
:meth:`atspeed.items.index.ItemIndex.from_mapping`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from atspeed.atomic import write_text_atomic
from atspeed.data.json_file import read_json
from atspeed.errors import DataError


def read_index(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read an index JSON file into ``{item_id: [token, ...]}`` (file order kept).

    Raises DataError naming the path for a missing file, invalid JSON (with line and column), a duplicate item
    key (with its line) or a wrong structure (naming the offending key).
    """
    path = Path(path)
    data = read_json(path, "index file")
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected a JSON object mapping item id to a list of tokens, got {type(data).__name__}"
        )
    for key, tokens in data.items():
        if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
            raise DataError(f"{path}: item {key!r}: expected a list of token strings, got {json.dumps(tokens)[:80]}")
    return data


def write_index(path: str | os.PathLike[str], mapping: Mapping[str, Sequence[str]]) -> None:
    """Write ``{item_id: [token, ...]}`` atomically (temp file in the same directory, then ``os.replace``)."""
    write_text_atomic(path, json.dumps({str(key): list(tokens) for key, tokens in mapping.items()}))
