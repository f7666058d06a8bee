"""One writer per run folder: an OS file lock (`fcntl.flock`) held for the whole run.

The kernel drops the lock when its process ends, however it ends (SIGKILL, OOM, a preempted node), so a lock is
never left stale; the holder's pid, host and start time are written into the lock file only to tell a second
run who holds the folder. flock is advisory and works across processes of one host (and on NFS v4 / most
cluster volumes, where the kernel maps it to a byte-range lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from subjectops.errors import SubjectopsError

LOCK_FILE = ".subjectops.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold `run_dir`'s lock while the block runs; a second holder is refused at once, naming the first."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise SubjectopsError(
                f"run folder {run_dir} is in use by another run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')})",
                fix="wait for that run to finish, or give this run another --out (without --out every run gets its "
                    "own folder)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # the holder is between truncating and writing
        return {}
