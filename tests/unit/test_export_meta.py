"""``ExportMeta``: the one reader and writer of an export's ``atspeed.json``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from atspeed.data.export_dir import META_FILE, ExportMeta
from atspeed.errors import DataError

# the keys ExportHuggingFace has written since exports carry an export_id
WRITTEN = {
    "prompt": "History: {history}. Next:", "max_history": 20, "levels": 3, "constraint": "exact",
    "dataset": "Beauty", "split": "global_time", "global_step": 8, "export_id": "0f" * 16,
}  # fmt: skip


def export_dir(root: Path, meta: dict | None = None) -> Path:
    """A directory that passes the export checks apart from its ``atspeed.json`` (written if ``meta``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}")
    (root / "index.json").write_text(json.dumps({"0": ["<a_0>"]}))
    if meta is not None:
        (root / META_FILE).write_text(json.dumps(meta))
    return root


def test_save_then_load_gives_the_same_metadata(tmp_path) -> None:
    meta = ExportMeta(**WRITTEN)
    meta.save(export_dir(tmp_path / "e"))
    assert ExportMeta.load(tmp_path / "e") == meta
    assert json.loads((tmp_path / "e" / META_FILE).read_text()) == WRITTEN


@pytest.mark.parametrize("drop", [(), ("dataset", "split", "global_step", "export_id")])
def test_exports_written_before_load_and_unknown_keys_are_ignored(tmp_path, drop) -> None:
    old = {k: v for k, v in WRITTEN.items() if k not in drop} | {"added_later": [1, 2]}
    meta = ExportMeta.load(export_dir(tmp_path / "e", old))
    assert (meta.levels, meta.prompt, meta.max_history, meta.constraint) == (3, WRITTEN["prompt"], 20, "exact")
    assert meta.export_id == old.get("export_id")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"levels": "two"}, "levels"),
        ({"levels": True}, "levels"),
        ({"levels": 0}, "levels"),
        ({"max_history": 2.5}, "max_history"),
        ({"constraint": "fuzzy"}, "constraint"),
        ({"prompt": None}, "prompt"),
        ({"global_step": -1}, "global_step"),
    ],
)
def test_a_bad_value_names_the_file_and_key(tmp_path, change, key) -> None:
    root = export_dir(tmp_path / "e", WRITTEN | change)
    with pytest.raises(DataError, match=f"^{re.escape(str(root / META_FILE))}: {key}: ") as err:
        ExportMeta.load(root)
    assert "\n" not in str(err.value)


def test_missing_keys_are_named_together(tmp_path) -> None:
    root = export_dir(tmp_path / "e", {"max_history": 20, "constraint": "exact"})
    with pytest.raises(DataError, match=r"prompt: Field required; levels: Field required$"):
        ExportMeta.load(root)


@pytest.mark.parametrize("content", ["[1, 2]", '"levels"'])
def test_not_an_object_is_refused(tmp_path, content) -> None:
    root = export_dir(tmp_path / "e")
    (root / META_FILE).write_text(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(root / META_FILE))}: top level: "):
        ExportMeta.load(root)
