"""The whole DAG in-process on one machine: each planned stage once, in order, each into RUN/<stage>/ (kept when
nothing it is made from changed); the base pipeline is loaded once for the stages that take it."""

from __future__ import annotations

import secrets
import time
from dataclasses import replace
from pathlib import Path

from subjectops.config import Params
from subjectops.console import console, timed
from subjectops.data.subject import check_class_word, load_subject
from subjectops.models.loading import training_resolution
from subjectops.preflight import require_ready
from subjectops.run_folder import check_out_folder, write_run_record
from subjectops.runlock import run_lock
from subjectops.stages.base import StageContext
from subjectops.stages.catalog import stage_catalog
from subjectops.stages.incremental import NO_OUTPUT, ContentHashes, reason_to_run, run_stage
from subjectops.stages.plan import plan
from subjectops.stages.registry import get_stage
from subjectops.stopping import sigterm_requests_stop, stop_if_requested
from subjectops.tracking import NullTracker, Tracker


def default_run_dir(subject_dir: Path, params: Params, root: Path = Path("runs")) -> Path:
    """`runs/<time>-<random>-<subject>-<method>`: the 48 random bits keep two runs started in the same second
    (on one machine or many sharing a volume) apart; the time keeps the folders in order."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{secrets.token_hex(6)}-{Path(subject_dir).resolve().name}-{params.finetune.method}"


def run(params: Params, subject_dir: Path, class_word: str, out: Path,
        tracker: Tracker | None = None, force: bool = False) -> dict[str, Path]:
    """Run every stage of `plan(params)`; returns the output directory of each stage.

    A stage whose finished output in `out` was made from the same inputs, params and code is kept
    (`stages/incremental.py`), and the run says so. `force` writes into an `out` that is not this subject's run.
    `register` runs through the tracker, which knows the MLflow server; a NullTracker (`--no-track`)
    has none, so registration is left to `subjectops sync RUN` (or `subjectops register RUN`).
    """
    # Every input check first (refine repeats them; it takes a second), so a bad photo or a typo fails
    # before minutes of work, before the run folder exists and before a tracking run is opened; then the
    # preflight: every weight the plan loads, every folder it writes, the tracking server, all listed at once.
    check_class_word(class_word)
    out = Path(out)
    planned_stages = plan(params).stages
    check_out_folder(out, subject_dir, class_word, [s.name for s in planned_stages], force)
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

    hashes = ContentHashes()
    with run_lock(out), tracker.pipeline(params, out), sigterm_requests_stop():  # one writer per run folder
        write_run_record(out, params, subject_dir, class_word)
        for planned in planned_stages:
            stage, target = get_stage(planned.name), out / planned.name
            if stage.tracked:  # registration needs the tracker's server (a NullTracker has none: said at the end)
                if isinstance(tracker, NullTracker):
                    continue
                with timed(f"stage {stage.command}"):
                    if tracker.register_model(stage_catalog().register, out, target):
                        dirs[stage.name] = target
                continue
            with timed(f"stage {stage.command}"), tracker.stage(stage.name, target):
                ctx = StageContext(params, {name: dirs[name] for name in planned.inputs}, target,
                                   args={"subject_dir": Path(subject_dir), "class_word": class_word})
                reason = reason_to_run(stage, ctx, hashes)
                if reason is None:
                    console.print(f"{stage.command}: kept from the earlier run (inputs, params and code unchanged)",
                                  highlight=False, soft_wrap=True)
                else:
                    if reason != NO_OUTPUT:
                        console.print(f"{stage.command}: runs again ({reason})", highlight=False, soft_wrap=True)
                    # one load of the base pipeline serves the stages that take it, in plan order
                    run_stage(stage, replace(ctx, pipe=base_pipeline() if stage.takes_pipe else None), hashes)
            dirs[stage.name] = target
            stop_if_requested("the run", f"after {stage.command} finished")
    return dirs


def summary(run_dir: Path) -> list[str]:
    """What a finished run comes to, as the lines `subjectops run` ends its log with: the identifier that stands for
    the subject in prompts, each evaluated mean (marked when its backbone is random: plumbing, not quality), the
    registered model's URI and the report."""
    import json

    from subjectops.metrics.schema import read_metrics

    run_dir = Path(run_dir)
    lines = []
    method = run_dir / "finetune" / "method.json"
    if method.is_file():
        info = json.loads(method.read_text())
        lines.append(f"identifier: {info['identifier']} (prompt: \"{info['instance_prompt']}\", method "
                     f"{info['method']}, base {info['base_model']})")
    metrics = run_dir / "evaluate" / "metrics.json"
    if metrics.is_file():
        for r in read_metrics(metrics)["metrics"]:
            if r.get("mean") is not None:
                mean = f"{r['mean']:.4f}" if isinstance(r["mean"], (int, float)) else str(r["mean"])
                random = " (random backbone: plumbing only)" if r.get("pretrained") is False else ""
                lines.append(f"metric {r['prompt_set']}/{r['key']}: {mean}{random}")
    registration = run_dir / "register" / "registration.json"
    if registration.is_file():
        info = json.loads(registration.read_text())
        lines.append(f"model: {info['model_uri']} (alias {info['alias_uri']})")
    if (run_dir / "evaluate" / "report.html").is_file():
        lines.append(f"report: {run_dir / 'evaluate' / 'report.html'}")
    return lines
