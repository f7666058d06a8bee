"""Checks that run before any work: a folder a run will write is writable, found by writing to it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from subjectops.errors import SubjectopsError


def require_writable(directory: Path, what: str) -> None:
    """`directory` (made later if absent) can be created and written, else a SubjectopsError naming it.

    Mode bits do not tell (root writes through them) and os.access cannot say why: a probe file is written and
    removed in the nearest existing folder, which leaves nothing behind and gives the system's own reason.
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SubjectopsError(f"{what} {directory} cannot be created: {existing} is a file, not a folder",
                              fix=f"choose another location for {what}, or move {existing} away")
    try:
        fd, probe = tempfile.mkstemp(prefix=".subjectops-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
        return
    except OSError as exc:
        reason = exc.strerror or str(exc)  # "Read-only file system", "Permission denied", "No space left on device"
    where = "" if existing == directory else f" (in {existing})"
    raise SubjectopsError(f"{what} {directory} is not writable: {reason}{where}",
                          fix=f"choose a writable location for {what}, or make {existing} writable")
