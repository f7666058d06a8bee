"""Experiment tracking. The pipeline driver talks to a `Tracker`; MLflow is one implementation."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Protocol

from subjectops.config import Params


class Tracker(Protocol):
    def pipeline(self, params: Params, run_dir: Path) -> contextlib.AbstractContextManager: ...

    def stage(self, name: str, out_dir: Path) -> contextlib.AbstractContextManager: ...


class NullTracker:
    """Tracks nothing: the run directory alone is the record."""

    @contextlib.contextmanager
    def pipeline(self, params: Params, run_dir: Path) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def stage(self, name: str, out_dir: Path) -> Iterator[None]:
        yield
