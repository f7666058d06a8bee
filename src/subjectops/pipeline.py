"""The whole DAG in-process on one machine: each planned stage once, in order, each into RUN/<stage>/; the base
pipeline is loaded once for the stages that take it."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from subjectops.config import Params
from subjectops.console import timed
from subjectops.data.subject import check_class_word, load_subject
from subjectops.models.loading import training_resolution
from subjectops.preflight import require_writable
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
        for planned in plan(params).stages:
            stage, target = get_stage(planned.name), out / planned.name
            if stage.tracked:  # registration needs the tracker's server (a NullTracker has none: said at the end)
                if isinstance(tracker, NullTracker):
                    continue
                with timed(f"stage {stage.command}"):
                    if tracker.register_model(stage_catalog().register, out, target):
                        dirs[stage.name] = target
                continue
            with timed(f"stage {stage.command}"), tracker.stage(stage.name, target):
                # one load of the base pipeline serves the stages that take it, in plan order
                ctx = StageContext(params, {name: dirs[name] for name in planned.inputs}, target,
                                   pipe=base_pipeline() if stage.takes_pipe else None,
                                   args={"subject_dir": Path(subject_dir), "class_word": class_word})
                stage.run(ctx)
            dirs[stage.name] = target
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
