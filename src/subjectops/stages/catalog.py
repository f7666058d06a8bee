"""The stage registry as the tracker reads it (`subjectops.tracking.StageCatalog`): tracking imports no stage, so
the orchestrators hand it this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from subjectops.stages.base import StageContext
from subjectops.stages.plan import plan
from subjectops.stages.registry import all_stages, get_stage


@dataclass(frozen=True)
class StageCatalog:
    """What the tracker reads of the registry (`subjectops.tracking.StageCatalog`; tracking imports no stage)."""

    order: tuple[str, ...]

    def describe(self, stage: str) -> Callable | None:
        return get_stage(stage).record if stage in self.order else None

    def register(self, params, run_dir: Path, out: Path, **tracking) -> dict:
        """The tracked stage (registration), as the tracker calls it."""
        [tracked] = [s for s in all_stages() if s.tracked]
        return tracked.run(StageContext(params, {}, Path(out), args={"run_dir": Path(run_dir), **tracking}))

    def wants_registration(self, params) -> bool:
        return any(plan(params).has(s.name) for s in all_stages() if s.tracked)


def stage_catalog() -> StageCatalog:
    return StageCatalog(tuple(s.name for s in all_stages()))
