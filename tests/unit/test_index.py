"""Item index: validation, duplicate identifiers, index-file round trips, and the real Beauty index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atspeed.data.index_file import read_index, write_index
from atspeed.errors import DataError
from atspeed.items.index import ItemIndex, parse_token

BEAUTY_INDEX = Path(__file__).resolve().parents[3] / "shared/data/amazon-beauty/beauty.LCRec-1e-3lr.json"
needs_beauty = pytest.mark.skipif(not BEAUTY_INDEX.is_file(), reason="shared Beauty data not available")


def _mapping() -> dict[str, list[str]]:
    return {
        "0": ["<a_1>", "<b_5>", "<c_2>"],
        "1": ["<a_1>", "<b_5>", "<c_0>"],
        "2": ["<a_3>", "<b_0>", "<c_2>"],
    }


def test_from_mapping_keeps_order_and_exposes_tokens() -> None:
    index, changed = ItemIndex.from_mapping(_mapping(), "test.json")
    assert changed == 0
    assert len(index) == 3 and index.levels == 3
    assert index.item_ids == ("0", "1", "2")
    assert index.families == ("a", "b", "c")
    assert index.level_tokens() == [["<a_1>", "<a_3>"], ["<b_0>", "<b_5>"], ["<c_0>", "<c_2>"]]
    assert index.all_tokens() == ["<a_1>", "<a_3>", "<b_0>", "<b_5>", "<c_0>", "<c_2>"]
    assert index.to_mapping() == _mapping()
    assert index.position("2") == 2
    with pytest.raises(KeyError, match="'7'"):
        index.position("7")


def test_level_tokens_sort_by_number_not_text() -> None:
    index, _ = ItemIndex.from_mapping({"x": ["<a_10>"], "y": ["<a_9>"], "z": ["<a_100>"]}, "t")
    assert index.level_tokens() == [["<a_9>", "<a_10>", "<a_100>"]]


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({}, "empty"),
        ({"0": ["<a_1>", "<b_2>"], "1": ["<a_1>"]}, r"item '1' has 1 tokens, expected 2"),
        ({"0": ["<a_1>", "<b_2>"], "1": ["<a_1>", "b_3"]}, r"item '1'.*'b_3'.*<family_number>"),
        ({"0": ["<a_1>", "<b_2>"], "1": ["<a_1>", "<B_3>"]}, r"item '1'.*'<B_3>'"),
        ({"0": ["<a_1>", "<b_2>"], "1": ["<a_1>", "<c_3>"]}, r"item '1'.*level 1 is of family 'c'.*uses family 'b'"),
        ({"0": ["<a_1>", "<a_2>"]}, "distinct token families"),
        ({"0": []}, "empty identifier"),
        ({"0": "<a_1>"}, r"item '0': expected a list of tokens"),
    ],
)
def test_from_mapping_rejects_bad_input(mapping: dict, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        ItemIndex.from_mapping(mapping, "bad.json")
    assert "bad.json" in str(info.value)


def test_duplicates_error_names_source_count_groups_and_the_fix() -> None:
    mapping = {
        "0": ["<a_1>", "<b_1>"],
        "1": ["<a_1>", "<b_1>"],
        "2": ["<a_2>", "<b_0>"],
        "3": ["<a_2>", "<b_0>"],
        "4": ["<a_1>", "<b_1>"],
        "5": ["<a_3>", "<b_3>"],
    }
    with pytest.raises(DataError) as info:
        ItemIndex.from_mapping(mapping, "dup.json", on_duplicate="error")
    message = str(info.value)
    assert message.startswith("dup.json:")
    assert "5 items" in message and "2 groups" in message
    assert "'0', '1', '4' -> <a_1> <b_1>" in message
    assert "'2', '3' -> <a_2> <b_0>" in message
    assert "data.on_duplicate_ids: resolve" in message


def test_duplicates_error_shows_only_the_first_groups() -> None:
    mapping = {str(i): [f"<a_{i // 2}>"] for i in range(20)}
    with pytest.raises(DataError, match="and 7 more groups"):
        ItemIndex.from_mapping(mapping, "many.json")


def test_resolve_changes_exactly_the_later_duplicates_deterministically() -> None:
    mapping = {
        "0": ["<a_1>", "<b_1>"],
        "1": ["<a_1>", "<b_0>"],
        "2": ["<a_1>", "<b_1>"],  # duplicate of "0": <b_0>, <b_1> taken -> <b_2>
        "3": ["<a_2>", "<b_7>"],
        "4": ["<a_1>", "<b_1>"],  # next free: <b_3>
        "5": ["<a_2>", "<b_7>"],  # duplicate of "3": lowest free under <a_2> is <b_0>
    }
    index, changed = ItemIndex.from_mapping(mapping, "dup.json", on_duplicate="resolve")
    assert changed == 3
    assert len(set(index.codes)) == len(index) == 6
    expected = dict(mapping, **{"2": ["<a_1>", "<b_2>"], "4": ["<a_1>", "<b_3>"], "5": ["<a_2>", "<b_0>"]})
    assert index.to_mapping() == expected
    assert ItemIndex.from_mapping(mapping, "dup.json", on_duplicate="resolve") == (index, 3)


def test_resolve_reports_a_full_prefix() -> None:
    mapping = {str(i): ["<a_0>", f"<b_{i}>"] for i in range(256)}
    mapping["dup"] = ["<a_0>", "<b_3>"]
    with pytest.raises(DataError, match="all 256 last-level tokens under prefix <a_0> are taken"):
        ItemIndex.from_mapping(mapping, "full.json", on_duplicate="resolve")


def test_resolve_can_use_codes_above_255_when_the_index_does() -> None:
    mapping = {str(i): ["<a_0>", f"<b_{i}>"] for i in range(256)}
    mapping["high"] = ["<a_0>", "<b_400>"]
    mapping["dup"] = ["<a_0>", "<b_3>"]
    index, changed = ItemIndex.from_mapping(mapping, "big.json", on_duplicate="resolve")
    assert changed == 1
    assert index.to_mapping()["dup"] == ["<a_0>", "<b_256>"]


def test_item_index_constructor_rejects_duplicates() -> None:
    with pytest.raises(DataError, match=r"data\.on_duplicate_ids"):
        ItemIndex(("x", "y"), (("<a_1>",), ("<a_1>",)))


def test_parse_token() -> None:
    assert parse_token("<abc_012>") == ("abc", 12)
    with pytest.raises(ValueError, match="<a_>"):
        parse_token("<a_>")


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    write_index(path, _mapping())
    assert read_index(path) == _mapping()
    assert list(read_index(path)) == ["0", "1", "2"]
    assert path.read_text() == json.dumps(_mapping())
    assert path.read_text().startswith('{"0": ["<a_1>", "<b_5>", "<c_2>"], "1": ')


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_text("old")
    path.chmod(0o640)
    write_index(path, _mapping())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
    assert read_index(path) == _mapping()
    assert path.stat().st_mode & 0o777 == 0o640


def test_write_failure_keeps_old_file_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    write_index(path, _mapping())
    with pytest.raises(TypeError):
        write_index(path, {"0": [object()]})  # not JSON-serialisable: fails before any file is touched
    with pytest.raises(IsADirectoryError):
        write_index(tmp_path, _mapping())  # os.replace onto a directory fails after the temp file is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
    assert read_index(path) == _mapping()


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.json: index file not found"):
        read_index(tmp_path / "nope.json")


def test_read_invalid_json_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"0": ["<a_1>"],\n "1": ["<a_2>",]}')
    with pytest.raises(DataError, match=r"broken\.json:2:16: invalid JSON"):
        read_index(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('["<a_1>"]', "expected a JSON object"),
        ('{"0": ["<a_1>"], "7": "<a_2>"}', r"item '7': expected a list of token strings"),
        ('{"0": ["<a_1>"], "8": ["<a_2>", 3]}', r"item '8'"),
    ],
)
def test_read_wrong_structure_names_the_key(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "wrong.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        read_index(path)
    assert str(path) in str(info.value)


@needs_beauty
def test_beauty_index_resolve_gives_distinct_identifiers() -> None:
    mapping = read_index(BEAUTY_INDEX)
    index, changed = ItemIndex.from_mapping(mapping, str(BEAUTY_INDEX), on_duplicate="resolve")
    assert len(index) == 12_035 and index.levels == 4
    assert len(set(index.codes)) == 12_035
    assert changed == 12 == len(mapping) - len({tuple(code) for code in mapping.values()})
    differing = [i for i, item_id in enumerate(index.item_ids) if list(index.codes[i]) != mapping[item_id]]
    assert len(differing) == changed
    for i in differing:  # only the last token moves, within the level's family and range
        original = mapping[index.item_ids[i]]
        assert list(index.codes[i][:3]) == original[:3]
        family, number = parse_token(index.codes[i][3])
        assert family == "d" and 0 <= number <= 255
    assert [len(tokens) for tokens in index.level_tokens()] == [91, 256, 256, 256]


@needs_beauty
def test_beauty_index_error_mode_raises() -> None:
    with pytest.raises(DataError, match=r"21 items share an identifier.*9 groups"):
        ItemIndex.from_mapping(read_index(BEAUTY_INDEX), str(BEAUTY_INDEX))
