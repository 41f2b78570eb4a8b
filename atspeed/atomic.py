"""Atomic outputs: a file or directory appears whole under its final name, or not at all.

A directory is only ever replaced when atspeed wrote it (it holds the ``OWNER_MARKER`` file): whatever else is
at the path (a user's folder, a run directory, a file) is refused before any work starts. Outputs get the
permissions the umask gives, as any other file the user creates. Temporary siblings left by a killed process
(``.<name>.<host>-<pid>.*.tmp``) are removed when this host's process ``pid`` is gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from atspeed.errors import DataError

log = logging.getLogger(__name__)

OWNER_MARKER = ".atspeed-output"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` (keeping that file's mode,
    else the umask's), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp makes the file private (0600)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_file``), flushed to disk before it takes the final name."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def check_replaceable(path: str | Path, key: str) -> None:
    """DataError unless ``path`` is absent or a directory atspeed wrote (so replacing it loses nothing else)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise DataError(f"{key}: {path} exists and is not a directory atspeed wrote; refusing to replace it")
    if not (path / OWNER_MARKER).is_file():
        raise DataError(
            f"{key}: {path} exists and was not written by atspeed (no {OWNER_MARKER}); refusing to replace it: "
            "choose another path, or remove it yourself"
        )


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> int:
    """Remove the temporary siblings of ``path`` whose writing process (on this host) is gone; return how many."""
    path = Path(path)
    prefix = _tmp_prefix(path)
    removed = 0
    for candidate in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = candidate.name[len(prefix) :].split(".", 1)[0]
        if candidate.suffix in (".tmp", ".old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d temporary directories left by killed runs beside %s", removed, path)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | Path, key: str = "output") -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces ``path``, on error it is removed.

    ``path`` must be absent or a directory atspeed wrote (``check_replaceable``; ``key`` names the setting in the
    message); the new directory carries ``OWNER_MARKER`` so a later run may replace it in turn.
    """
    path = Path(path)
    check_replaceable(path, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    prefix = f"{_tmp_prefix(path)}{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
    try:
        yield tmp
        (tmp / OWNER_MARKER).write_text(json.dumps({"written_by": "atspeed"}) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        check_replaceable(path, key)  # still ours after the work
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".old"))
        os.replace(path, old / "previous")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
