"""One run per output directory: a run holds a lock on each directory it writes, so a second run into one of them stops
at once with one line naming the directory and the process that holds it, before it builds or writes anything.

The lock is ``filelock``'s (an OS lock, ``flock`` on Unix) on a file beside the outputs: ``<dir>/.atspeed.lock`` for a
directory the run writes into (a stage's ``trainer.default_root_dir``, a sweep, a pipeline's run directory),
``<parent>/.<name>.atspeed.lock`` for a directory that is replaced whole (``export --out``) or holds data files alone
(teacher data). The OS drops
it when the process ends, however it ends (SIGKILL too), so a lock is never stale; the file itself stays, empty. The
holder writes its pid and host into the file for the message. Locks are reentrant within one process: a pipeline's
stages run in its process and may lock the pipeline's own directory again. Under a launcher that starts several
processes for one run (torchrun, Slurm, Lightning's DDP), only the first process (rank 0 of node 0) locks; the others
share its directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

from filelock import FileLock, Timeout

from atspeed.errors import DataError
from atspeed.preflight import check_output_dir

LOCK_NAME = ".atspeed.lock"
# set by launchers to the process's place in a run of several processes; "0" or unset in the run's first process
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def leads_run(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is the one of its run that locks (not a further rank of a multi-process launch)."""
    return all(env.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def lock_file(directory: str | Path) -> Path:
    """The lock file of a directory the run writes into."""
    return Path(directory) / LOCK_NAME


def sibling_lock_file(path: str | Path) -> Path:
    """The lock file of a directory that is replaced whole (a lock inside would go with it) or holds data alone."""
    path = Path(path)
    return path.parent / f".{path.name}{LOCK_NAME}"


def holder(path: Path) -> str:
    """Who holds the lock file ``path``, as its holder wrote it (``pid N, host H``)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {int(info['pid'])}, host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid and host not recorded yet"


def _write_holder(path: Path, text: str) -> None:
    # a second descriptor: the lock is advisory, so writing through it neither takes nor drops the lock
    with open(path, "r+", encoding="utf-8") as handle:
        handle.truncate()
        handle.write(text)


@contextlib.contextmanager
def locked(directory: str | Path, key: str, path: str | Path | None = None) -> Iterator[None]:
    """Hold the lock of ``directory`` (its ``lock_file`` unless ``path`` names another) while the block runs; another
    process holding it raises DataError naming ``key``, ``directory`` and the holder. ``directory`` (or the lock
    file's directory) is created, after checking that it can be."""
    directory = Path(directory)
    path = Path(path) if path is not None else lock_file(directory)
    check_output_dir(path.parent, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, is_singleton=True, thread_local=False)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise DataError(
            f"{key}: {directory} is in use by another atspeed run ({holder(path)}); wait until it ends or give this "
            "run another directory"
        ) from None
    except OSError as err:
        raise DataError(f"{key}: cannot create the lock file {path}: {err.strerror}") from None
    try:
        if lock.lock_counter == 1:
            _write_holder(path, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        yield
    finally:
        if lock.lock_counter == 1:
            with contextlib.suppress(OSError):
                _write_holder(path, "")
        lock.release()
