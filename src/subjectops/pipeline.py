"""The whole DAG in-process on one machine: each planned stage once, in order, each into RUN/<stage>/."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Callable

from subjectops.config import Params
from subjectops.data.subject import check_class_word, load_subject
from subjectops.methods.plan import plan
from subjectops.models.loading import training_resolution
from subjectops.preflight import require_writable
from subjectops.tracking import NullTracker, Tracker

# How each stage function takes the run's inputs: (function, params, subject dir, class word, the planned
# inputs' directories, output directory). An input that is not planned is passed as None.
CALLS: dict[str, Callable] = {
    "refine": lambda fn, p, subject, cls, i, out: fn(p, subject, cls, out),
    "priors": lambda fn, p, subject, cls, i, out: fn(p, i["refine"], out),
    "pretrain_disc": lambda fn, p, subject, cls, i, out: fn(p, i["refine"], i.get("priors"), out),
    "finetune": lambda fn, p, subject, cls, i, out: fn(p, i["refine"], i.get("priors"), out, i.get("pretrain_disc")),
    "infer": lambda fn, p, subject, cls, i, out: fn(p, i["refine"], i["finetune"], out),
    "sweep": lambda fn, p, subject, cls, i, out: fn(p, i["refine"], i["finetune"], out),
    "evaluate": lambda fn, p, subject, cls, i, out: fn(p, i["refine"], i["infer"], out, i.get("sweep")),
}


def stage_function(name: str) -> Callable:
    """`subjectops.stages.<name>.<name>`, imported when the stage runs (torch and diffusers load slowly)."""
    return getattr(importlib.import_module(f"subjectops.stages.{name}"), name)


def default_run_dir(subject_dir: Path, params: Params, root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{Path(subject_dir).resolve().name}-{params.finetune.method}"


def run(params: Params, subject_dir: Path, class_word: str, out: Path, tracker: Tracker | None = None) -> dict[str, Path]:
    """Run every stage of `plan(params)`; returns the output directory of each stage that ran.

    `register` runs through the tracker, which knows the MLflow server; a NullTracker (`--no-track`)
    has none, so registration is left to `subjectops sync RUN` (or `subjectops register RUN`).
    """
    # Every input check first (refine repeats them; it takes a second), so a bad photo or a typo fails
    # before minutes of work, before the run folder exists and before a tracking run is opened.
    check_class_word(class_word)
    load_subject(Path(subject_dir), params.subject, training_resolution(params))
    out = Path(out)
    require_writable(out, "the run folder (--out)")
    if plan(params).has("priors"):
        require_writable(Path(params.priors.cache_dir), "the class-image cache (priors.cache_dir)")
    tracker = tracker or NullTracker()
    dirs: dict[str, Path] = {}
    with tracker.pipeline(params, out):
        for stage in plan(params).stages:
            target = out / stage.name
            inputs = {name: dirs[name] for name in stage.inputs}
            if stage.name == "register":
                if tracker.register_model(stage_function("register"), out, target):
                    dirs["register"] = target
                continue
            with tracker.stage(stage.name, target):
                CALLS[stage.name](stage_function(stage.name), params, subject_dir, class_word, inputs, target)
            dirs[stage.name] = target
    return dirs
