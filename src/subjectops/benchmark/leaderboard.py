"""The benchmark pipeline's leaderboard: which (method, subject) pairs it runs, and the leaderboard of what they
registered, built by `selection.compare` and recorded in MLflow.

The pipeline's personalize runs reach the aggregation step only as registered versions (`name/version`), so the
files `compare.load_run` reads are fetched back from the version's MLflow runs: the version's source run is the
pipeline run (or a child of it), whose stage runs hold each stage's files under `<stage>/`
(tracking.record.stage_record).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from subjectops.errors import SubjectopsError
from subjectops.selection.compare import RUN_FILES, Leaderboard, leaderboard, write_leaderboard

LEADERBOARD_STAGE = "benchmark-leaderboard"


def benchmark_pairs(methods: Sequence[str], subjects: Sequence[Mapping]) -> list[dict]:
    """Every (method, subject) pair as one loop item `{"method", "uri", "class_word"}`; unknown methods and empty
    lists are refused before any subject starts."""
    from subjectops.methods import get_method

    if not methods or not subjects:
        raise SubjectopsError(f"the benchmark needs methods and subjects, got {len(methods)} method(s) and "
                              f"{len(subjects)} subject(s)", fix="pass at least one of each")
    for method in methods:
        get_method(method)
    return [{"method": m, "uri": s["uri"], "class_word": s["class_word"]} for m in dict.fromkeys(methods)
            for s in subjects]


def fetch_registered_run(client, model_name: str, version: str, dest: Path) -> Path:
    """The files `compare.load_run` reads, from the MLflow runs of one registered version, as a run directory."""
    mv = client.get_model_version(model_name, version)
    source_run = client.get_run(mv.run_id)
    # a pipeline run logs its model on itself; `subjectops register` on its own run, a child of the pipeline run
    parent = (mv.run_id if source_run.data.tags.get("subjectops.kind") == "pipeline"
              else source_run.data.tags.get("mlflow.parentRunId"))
    if parent is None:
        raise SubjectopsError(f"{model_name} version {version} was not registered by a pipeline run (run {mv.run_id} "
                              "has no parent), so its stage outputs cannot be found",
                              fix="register versions through `subjectops run` or the personalize pipeline")
    stage_runs = client.search_runs([source_run.info.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    wanted = {rel.split("/", 1)[0]: rel for rel in RUN_FILES}
    run_dir = Path(dest) / f"{model_name}-v{version}"
    for run in stage_runs:
        stage = run.data.tags.get("subjectops.stage")
        rel = wanted.pop(stage, None)
        if rel is not None:  # a file downloads into the given folder under its own name
            client.download_artifacts(run.info.run_id, rel, str(run_dir / stage))
    if wanted:
        raise SubjectopsError(f"{model_name} version {version}: the pipeline run {parent} has no "
                              f"{', '.join(sorted(wanted))} run", fix="let every stage of the run finish and sync")
    return run_dir


def log_leaderboard(board_dir: Path, experiment: str, run_name: str, tracking_uri: Optional[str] = None,
                    skip: Sequence[str] = ()) -> str:
    """One MLflow run holding the leaderboard's files under `leaderboard/` (but the entries named in `skip`: the
    local benchmark's run folders); returns its id."""
    from subjectops.tracking.client import resolve_tracking_uri
    from subjectops.tracking.mlflow_tracker import MlflowTracker

    uri = resolve_tracking_uri(tracking_uri)
    tracker = MlflowTracker(tracking_uri=uri)
    experiment_id = tracker.connect(uri, experiment)
    run = tracker.client.create_run(experiment_id, run_name=run_name, tags={"subjectops.stage": LEADERBOARD_STAGE})
    for entry in sorted(Path(board_dir).iterdir()):
        if entry.name in skip:
            continue
        if entry.is_dir():
            tracker.client.log_artifacts(run.info.run_id, str(entry), f"leaderboard/{entry.name}")
        else:
            tracker.client.log_artifact(run.info.run_id, str(entry), "leaderboard")
    tracker.client.set_terminated(run.info.run_id)
    return run.info.run_id


def benchmark_leaderboard(registrations: Sequence[Mapping], out: Path, experiment: str, run_name: str,
                          tracking_uri: Optional[str] = None) -> Leaderboard:
    """The leaderboard of the registered versions (refused unless comparable), written to `out` and to MLflow.

    `out/runs/` keeps the fetched files the intervals were computed from, one folder per version."""
    from subjectops.tracking.client import mlflow_client, resolve_tracking_uri, setup_environment

    setup_environment()
    client = mlflow_client(resolve_tracking_uri(tracking_uri))
    board = leaderboard([fetch_registered_run(client, r["model_name"], str(r["version"]), Path(out) / "runs")
                         for r in registrations])
    write_leaderboard(board, out)
    log_leaderboard(out, experiment, run_name, tracking_uri)
    return board
