"""The whole DAG in-process on one machine: each planned stage once, in order, each into RUN/<stage>/; the base
pipeline is loaded once for the stages that take it."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from subjectops.config import Params
from subjectops.data.subject import check_class_word, load_subject
from subjectops.models.loading import training_resolution
from subjectops.preflight import require_ready
from subjectops.runlock import run_lock
from subjectops.stages.base import StageContext
from subjectops.stages.catalog import stage_catalog
from subjectops.stages.plan import plan
from subjectops.stages.registry import get_stage
from subjectops.tracking import NullTracker, Tracker


def default_run_dir(subject_dir: Path, params: Params, root: Path = Path("runs")) -> Path:
    """`runs/<time>-<random>-<subject>-<method>`: the 48 random bits keep two runs started in the same second
    (on one machine or many sharing a volume) apart; the time keeps the folders in order."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{secrets.token_hex(6)}-{Path(subject_dir).resolve().name}-{params.finetune.method}"


def run(params: Params, subject_dir: Path, class_word: str, out: Path,
        tracker: Tracker | None = None) -> dict[str, Path]:
    """Run every stage of `plan(params)`; returns the output directory of each stage that ran.

    `register` runs through the tracker, which knows the MLflow server; a NullTracker (`--no-track`)
    has none, so registration is left to `subjectops sync RUN` (or `subjectops register RUN`).
    """
    # Every input check first (refine repeats them; it takes a second), so a bad photo or a typo fails
    # before minutes of work, before the run folder exists and before a tracking run is opened; then the
    # preflight: every weight the plan loads, every folder it writes, the tracking server, all listed at once.
    check_class_word(class_word)
    out = Path(out)
    tracker = tracker or NullTracker()
    require_ready(params, out, track=getattr(tracker, "tracks", False),
                  tracking_uri=getattr(tracker, "explicit_uri", None))
    load_subject(Path(subject_dir), params.subject, training_resolution(params))
    dirs: dict[str, Path] = {}
    base: list = []  # the base pipeline, once a stage has needed it

    def base_pipeline():
        if not base:
            from subjectops.models.loading import load_pipeline

            base.append(load_pipeline(params.model))
        return base[0]

    with run_lock(out), tracker.pipeline(params, out):  # one writer per run folder, for the whole run
        for planned in plan(params).stages:
            stage, target = get_stage(planned.name), out / planned.name
            if stage.tracked:  # registration needs the tracker's server
                if tracker.register_model(stage_catalog().register, out, target):
                    dirs[stage.name] = target
                continue
            with tracker.stage(stage.name, target):
                # one load of the base pipeline serves the stages that take it, in plan order
                ctx = StageContext(params, {name: dirs[name] for name in planned.inputs}, target,
                                   pipe=base_pipeline() if stage.takes_pipe else None,
                                   args={"subject_dir": Path(subject_dir), "class_word": class_word})
                stage.run(ctx)
            dirs[stage.name] = target
    return dirs
