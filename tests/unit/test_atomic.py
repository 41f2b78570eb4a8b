"""Outputs appear whole or not at all, replace only what atspeed wrote, and get the umask's permissions."""

import os
import socket
import stat
import subprocess
import sys

import pytest

from atspeed.atomic import OWNER_MARKER, atomic_directory, remove_stale_temporaries, write_text_atomic
from atspeed.errors import DataError


def _names(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_atomic_directory_replaces_a_previous_output_whole(tmp_path) -> None:
    out = tmp_path / "export"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert _names(out) == sorted([OWNER_MARKER, "b.txt"])
    assert _names(tmp_path) == ["export"]


def test_a_failed_export_leaves_the_previous_output_and_no_temporary(tmp_path) -> None:
    out = tmp_path / "export"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert _names(out) == sorted([OWNER_MARKER, "a.txt"])
    assert _names(tmp_path) == ["export"]


@pytest.mark.parametrize("kind", ["user_directory", "empty_directory", "file", "symlink"])
def test_what_atspeed_did_not_write_is_refused_before_any_work(tmp_path, kind) -> None:
    out = tmp_path / "out"
    if kind == "user_directory":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif kind == "empty_directory":
        out.mkdir()
    elif kind == "file":
        out.write_text("years of work")
    else:
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    worked = []
    with pytest.raises(DataError, match=r"my\.key: .*out.*refusing to replace it"), atomic_directory(out, "my.key"):
        worked.append(True)
    assert not worked, "refused before the caller did any work"
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_outputs_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "export") as tmp:
            (tmp / "a.txt").write_text("x")
        write_text_atomic(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path) -> None:
    out = tmp_path / "export"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".export.{host}-{int(dead.stdout)}.abc.tmp"
    live = tmp_path / f".export.{host}-{os.getpid()}.def.tmp"
    other_host = tmp_path / f".export.elsewhere-{int(dead.stdout)}.ghi.tmp"
    for path in (stale, live, other_host):
        path.mkdir()
        (path / "model.safetensors").write_text("half")
    assert remove_stale_temporaries(out) == 1
    assert not stale.exists() and live.exists() and other_host.exists()
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("x")
    assert _names(tmp_path) == sorted(["export", live.name, other_host.name])


def test_write_text_atomic_creates_parents(tmp_path) -> None:
    write_text_atomic(tmp_path / "a" / "b.json", "{}")
    assert (tmp_path / "a" / "b.json").read_text() == "{}"
