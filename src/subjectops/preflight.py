"""Checks that run before any work: a folder a run will write is writable, found by writing to it."""

from __future__ import annotations

import errno
import os
import re
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


# No space, a file past `ulimit -f` (Python ignores SIGXFSZ, so the write fails), a quota; safetensors reports the
# same errors as text ("... (os error 28)").
OUT_OF_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
OUT_OF_SPACE_TEXT = re.compile(r"os error ({})\b".format("|".join(str(e) for e in OUT_OF_SPACE)))


def out_of_space(exc: BaseException, out: Path, work: Path, work_kept: bool) -> SubjectopsError | None:
    """The error to show when `exc` is a write that found no room, naming the folder and what is kept; else None."""
    if not (isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE) and not OUT_OF_SPACE_TEXT.search(str(exc)):
        return None
    kept = [f"the earlier complete {out}" if out.exists() else None,
            f"the work so far in {work} (the next attempt resumes from it)" if work_kept and work.exists() else None]
    kept_text = " and ".join(k for k in kept if k) or "nothing of this attempt (its partial output was removed)"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    return SubjectopsError(f"no room to write {out.name} in {out.parent}: {reason}; kept: {kept_text}",
                           fix=f"free space where {out.parent} lives (`df -h {out.parent}`), raise the file size "
                               "limit (`ulimit -f`), or pass --out on another disk; then run the same command again")
