"""SIGTERM ends every stage the same way: the unit of work in progress finishes (a training step and its
checkpoint, a batch of class images, one generated image, one operating point), the stage stops with `Stopped`
and the command exits EXIT_STOPPED = 75 (sysexits' EX_TEMPFAIL: "try again later"), saying how to resume.

SIGTERM is what Kubernetes sends a preempted pod `terminationGracePeriodSeconds` before SIGKILL; Python's default
for it is to die at once with exit 143 and no word. A stage's loops call `stop_if_requested` between units of
work; the orchestrators (`subjectops run`, a stage command) hold `sigterm_requests_stop` around the stages.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from subjectops.errors import SubjectopsError

EXIT_STOPPED = 75

_requested = threading.Event()


class Stopped(SubjectopsError):
    """A stage stopped on SIGTERM after its unit of work; running the same command again resumes."""

    exit_code = EXIT_STOPPED


def _on_sigterm(signum, frame) -> None:
    _requested.set()


@contextlib.contextmanager
def sigterm_requests_stop() -> Iterator[threading.Event]:
    """The event SIGTERM sets while the block runs. Nested blocks share it (a stage inside `subjectops run`);
    the outermost restores the previous handler. Signals reach only the main thread: elsewhere (a test's worker
    thread) nothing is installed and the event stays as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _on_sigterm:
        yield _requested
        return
    _requested.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield _requested
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested.clear()


def stop_if_requested(stage: str, done: str) -> None:
    """Raise `Stopped` when SIGTERM came; `done` says what was finished (e.g. "after image 12 of 40")."""
    if _requested.is_set():
        raise Stopped(f"{stage} stopped by SIGTERM {done}",
                      fix="run the same command again (same --out, params and inputs): finished stages are kept, "
                          f"{stage} starts again; a retried pipeline task does so by itself")
