"""The whole DAG in-process on one machine: each stage once, in order, each into RUN/<stage>/."""

from __future__ import annotations

import time
from pathlib import Path

from subjectops.config import Params
from subjectops.data.subject import check_class_word, load_subject
from subjectops.models.loading import training_resolution
from subjectops.methods import needs_discriminator, uses_priors
from subjectops.tracking import NullTracker, Tracker

STAGES = ("refine", "priors", "pretrain_disc", "finetune", "infer", "evaluate")


def default_run_dir(subject_dir: Path, params: Params, root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{Path(subject_dir).resolve().name}-{params.finetune.method}"


def planned_stages(params: Params) -> list[str]:
    method = params.finetune.method
    return [s for s in STAGES
            if (s != "priors" or uses_priors(params)) and (s != "pretrain_disc" or needs_discriminator(method))]


def run(params: Params, subject_dir: Path, class_word: str, out: Path, tracker: Tracker | None = None) -> dict[str, Path]:
    """Run every stage the method needs; returns the output directory of each."""
    # Every input check first (refine repeats them; it takes a second), so a bad photo or a typo fails
    # before minutes of work, before the run folder exists and before a tracking run is opened.
    check_class_word(class_word)
    load_subject(Path(subject_dir), params.subject, training_resolution(params))
    from subjectops.stages.evaluate import evaluate
    from subjectops.stages.finetune import finetune
    from subjectops.stages.infer import infer
    from subjectops.stages.priors import priors
    from subjectops.stages.refine import refine

    tracker = tracker or NullTracker()
    out = Path(out)
    dirs = {s: out / s for s in planned_stages(params)}
    with tracker.pipeline(params, out):
        with tracker.stage("refine", dirs["refine"]):
            refine(params, subject_dir, class_word, dirs["refine"])
        if "priors" in dirs:
            with tracker.stage("priors", dirs["priors"]):
                priors(params, dirs["refine"], dirs["priors"])
        if "pretrain_disc" in dirs:
            from subjectops.stages.pretrain_disc import pretrain_disc

            with tracker.stage("pretrain_disc", dirs["pretrain_disc"]):
                pretrain_disc(params, dirs["refine"], dirs.get("priors"), dirs["pretrain_disc"])
        with tracker.stage("finetune", dirs["finetune"]):
            finetune(params, dirs["refine"], dirs.get("priors"), dirs["finetune"], dirs.get("pretrain_disc"))
        with tracker.stage("infer", dirs["infer"]):
            infer(params, dirs["refine"], dirs["finetune"], dirs["infer"])
        with tracker.stage("evaluate", dirs["evaluate"]):
            evaluate(params, dirs["refine"], dirs["infer"], dirs["evaluate"])
    return dirs
