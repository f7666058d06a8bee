"""The stage registry: every module of this package that declares a `STAGE` is a stage of the DAG.

The order is the run order: each stage after the stages it reads, ties broken by name. Adding a stage is
writing its module; the plan, `subjectops run`, the CLI, the Kubeflow components, the multi-GPU launch,
dvc.yaml and the tracker's records all read this registry.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from subjectops.errors import SubjectopsError
from subjectops.stages.base import Stage


@functools.cache
def all_stages() -> tuple[Stage, ...]:
    """Every stage, in run order. Found on first use, so that a stage module may import this one."""
    import subjectops.stages as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        stage = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "STAGE", None)
        if isinstance(stage, Stage):
            found[stage.name] = stage
    ordered: list[Stage] = []
    while len(ordered) < len(found):
        done = {s.name for s in ordered}
        ready = sorted(n for n, s in found.items() if n not in done and set(s.reads) <= done)
        if not ready:
            raise SubjectopsError(f"the stages {sorted(set(found) - done)} read stages that never run before them")
        ordered.append(found[ready[0]])
    return tuple(ordered)


def get_stage(name: str) -> Stage:
    for stage in all_stages():
        if stage.name == name:
            return stage
    raise SubjectopsError(f"unknown stage {name!r}", fix=f"choose one of: {', '.join(s.name for s in all_stages())}")

