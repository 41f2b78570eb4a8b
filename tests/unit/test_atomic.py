"""Outputs appear whole or not at all."""

import pytest

from atspeed.atomic import atomic_directory, write_text_atomic


def test_atomic_directory_replaces_a_previous_output_whole(tmp_path) -> None:
    out = tmp_path / "export"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failed_export_leaves_the_previous_output_and_no_temporary(tmp_path) -> None:
    out = tmp_path / "export"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_write_text_atomic_creates_parents(tmp_path) -> None:
    write_text_atomic(tmp_path / "a" / "b.json", "{}")
    assert (tmp_path / "a" / "b.json").read_text() == "{}"
