"""Experiment tracking. The pipeline driver talks to a `Tracker`; MLflow is one implementation."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Protocol

from subjectops.config import Params


class StageCatalog(Protocol):
    """What a tracker reads of the stage registry (`subjectops.stages.catalog.stage_catalog()`): tracking imports
    no stage, so it is handed this."""

    order: tuple[str, ...]  # the run order; `sync` uploads in it

    def describe(self, stage: str) -> Callable | None:
        """The stage's `record(out_dir, rec, grids)`, or None (its small files are logged as they are)."""
        ...

    def register(self, params: Params, run_dir: Path, out: Path, **tracking) -> dict:
        """The registration stage, run against the tracker's server."""
        ...

    def wants_registration(self, params: Params) -> bool: ...


class Tracker(Protocol):
    def pipeline(self, params: Params, run_dir: Path) -> contextlib.AbstractContextManager: ...

    def stage(self, name: str, out_dir: Path) -> contextlib.AbstractContextManager: ...

    def register_model(self, register: Callable[..., dict], run_dir: Path, out: Path) -> bool:
        """Run the register stage against the tracking server; True once the model is registered."""
        ...


class NullTracker:
    """Tracks nothing: the run directory alone is the record."""

    tracks = False  # no server for the preflight to reach

    @contextlib.contextmanager
    def pipeline(self, params: Params, run_dir: Path) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def stage(self, name: str, out_dir: Path) -> Iterator[None]:
        yield

    def register_model(self, register: Callable[..., dict], run_dir: Path, out: Path) -> bool:
        return False  # no tracking server: `subjectops sync RUN` registers later
