"""Another process holding an atspeed run lock (``atspeed.run_lock``), as a second run meets it: a bare Python
process that takes the lock with ``filelock`` and records its pid and host the way a run does."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_HOLD = """
import json, os, socket, sys
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
with open(sys.argv[1], "w") as handle:
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held_by_another_process(lock_file: Path) -> Iterator[int]:
    """Hold ``lock_file`` in a child process while the block runs; yields the child's pid."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()


def is_free(lock_file: Path) -> bool:
    """Whether no process holds ``lock_file`` (asked as another process would: a lock of this process's own would
    answer yes here, being reentrant)."""
    probe = "import sys; from filelock import FileLock, Timeout\ntry:\n FileLock(sys.argv[1]).acquire(blocking=False)\n"
    probe += "except Timeout:\n sys.exit(1)"
    return subprocess.run([sys.executable, "-c", probe, str(lock_file)], timeout=30).returncode == 0
