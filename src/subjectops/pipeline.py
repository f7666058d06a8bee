"""The whole DAG in-process on one machine: each planned stage once, in order, each into RUN/<stage>/; the base
pipeline is loaded once for the stages that take it."""

from __future__ import annotations

import importlib
import secrets
import time
from pathlib import Path
from typing import Callable

from subjectops.config import Params
from subjectops.data.subject import check_class_word, load_subject
from subjectops.methods.plan import plan
from subjectops.models.loading import training_resolution
from subjectops.preflight import require_writable
from subjectops.runlock import run_lock
from subjectops.tracking import NullTracker, Tracker

# How each stage function takes the run's inputs: (function, params, subject dir, class word, the planned
# inputs' directories, output directory, keyword arguments). An input that is not planned is passed as None.
CALLS: dict[str, Callable] = {
    "refine": lambda fn, p, subject, cls, i, out, **kw: fn(p, subject, cls, out, **kw),
    "priors": lambda fn, p, subject, cls, i, out, **kw: fn(p, i["refine"], out, **kw),
    "pretrain_disc": lambda fn, p, subject, cls, i, out, **kw: fn(p, i["refine"], i.get("priors"), out, **kw),
    "finetune": lambda fn, p, subject, cls, i, out, **kw: fn(p, i["refine"], i.get("priors"), out,
                                                             i.get("pretrain_disc"), **kw),
    "infer": lambda fn, p, subject, cls, i, out, **kw: fn(p, i["refine"], i["finetune"], out, **kw),
    "sweep": lambda fn, p, subject, cls, i, out, **kw: fn(p, i["refine"], i["finetune"], out, **kw),
    "evaluate": lambda fn, p, subject, cls, i, out, **kw: fn(p, i["refine"], i["infer"], out, i.get("sweep"), **kw),
}
# Stages that take the base pipeline as `pipe=`: one load serves them all, in plan order. finetune trains it in
# place, so it is the last that may receive it.
TAKE_BASE_PIPELINE = ("priors", "finetune")


def stage_function(name: str) -> Callable:
    """`subjectops.stages.<name>.<name>`, imported when the stage runs (torch and diffusers load slowly)."""
    return getattr(importlib.import_module(f"subjectops.stages.{name}"), name)


def default_run_dir(subject_dir: Path, params: Params, root: Path = Path("runs")) -> Path:
    """`runs/<time>-<random>-<subject>-<method>`: the 48 random bits keep two runs started in the same second
    (on one machine or many sharing a volume) apart; the time keeps the folders in order."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{secrets.token_hex(6)}-{Path(subject_dir).resolve().name}-{params.finetune.method}"


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
    base: list = []  # the base pipeline, once a stage has needed it

    def base_pipeline():
        if not base:
            from subjectops.models.loading import load_pipeline

            base.append(load_pipeline(params.model))
        return base[0]

    with run_lock(out), tracker.pipeline(params, out):  # one writer per run folder, for the whole run
        for stage in plan(params).stages:
            target = out / stage.name
            inputs = {name: dirs[name] for name in stage.inputs}
            if stage.name == "register":
                if tracker.register_model(stage_function("register"), out, target):
                    dirs["register"] = target
                continue
            with tracker.stage(stage.name, target):
                shared = {"pipe": base_pipeline()} if stage.name in TAKE_BASE_PIPELINE else {}
                CALLS[stage.name](stage_function(stage.name), params, subject_dir, class_word, inputs, target, **shared)
            dirs[stage.name] = target
    return dirs
