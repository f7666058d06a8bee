"""Experiment tracking. The pipeline driver talks to a `Tracker`; MLflow is one implementation."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Protocol

from subjectops.config import Params


class Tracker(Protocol):
    def pipeline(self, params: Params, run_dir: Path) -> contextlib.AbstractContextManager: ...

    def stage(self, name: str, out_dir: Path) -> contextlib.AbstractContextManager: ...

    def register_model(self, register: Callable[..., dict], run_dir: Path, out: Path) -> bool:
        """Run the register stage against the tracking server; True once the model is registered."""
        ...


class NullTracker:
    """Tracks nothing: the run directory alone is the record."""

    @contextlib.contextmanager
    def pipeline(self, params: Params, run_dir: Path) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def stage(self, name: str, out_dir: Path) -> Iterator[None]:
        yield

    def register_model(self, register: Callable[..., dict], run_dir: Path, out: Path) -> bool:
        return False  # no tracking server: `subjectops sync RUN` registers later
