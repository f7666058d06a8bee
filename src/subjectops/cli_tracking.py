"""`subjectops register | promote | sync`: the registry and tracking commands, added to the main app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from subjectops.cli_common import (
    ModelNameOpt,
    ParamsOpt,
    RunOpt,
    SetOpt,
    TrackingUriOpt,
    build_params,
    console,
    done,
    run_folder,
    user_errors,
)


def make_tracker(params, tracking_uri: Optional[str] = None):
    """The tracker `subjectops run` uses: MLflow, falling back to a local record when the server is down."""
    from subjectops.stages.catalog import stage_catalog
    from subjectops.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(tracking_uri=tracking_uri, cfg=params.tracking, stages=stage_catalog())


def add_tracking_commands(app: typer.Typer) -> None:
    """`sync`, `register` and `promote` as commands of the main app."""
    for command in (sync, register, promote):
        app.command()(command)


@user_errors
def sync(run_dir: Optional[Path] = typer.Argument(None, help="run directory recorded while MLflow was unreachable "
                                                            "(or without tracking), or --run"),
         run: Optional[Path] = RunOpt, tracking_uri: Optional[str] = TrackingUriOpt):
    """Upload a run directory's tracking record to MLflow: what did not reach the server, nothing twice."""
    from subjectops.stages.catalog import stage_catalog
    from subjectops.tracking.sync import sync as do_sync

    run_dir = run_folder(run_dir, run)
    out = do_sync(run_dir, stage_catalog(), tracking_uri=tracking_uri,
                  echo=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    done("pipeline run", Path(out["parent_run_id"]))
    for stage, rid in out["stages"].items():
        console.print(f"  {stage}: {rid}", highlight=False)
    if out["registered"]:
        done("registered", Path(f"models:/{out['registered']['model_name']}/{out['registered']['version']}"))
    typer.echo(json.dumps(out, sort_keys=True))


@user_errors
def register(run_dir: Optional[Path] = typer.Argument(None, help="run directory with finetune/ (and evaluate/, "
                                                                "infer/), or --run"),
             run: Optional[Path] = RunOpt,
             name: Optional[str] = ModelNameOpt,
             tracking_uri: Optional[str] = TrackingUriOpt, params_path: Path = ParamsOpt,
             sets: Optional[List[str]] = SetOpt):
    """Register RUN's finetuned model as a new version with alias `challenger` (writes RUN/register/)."""
    from subjectops.stages.register import register as register_stage

    run_dir = run_folder(run_dir, run)
    params = build_params(params_path, sets)
    info = register_stage(params, run_dir, Path(run_dir) / "register", tracking_uri=tracking_uri, model_name=name)
    done("registered", Path(f"models:/{info['model_name']}/{info['version']}"))
    typer.echo(json.dumps({k: info[k] for k in ("model_name", "version", "run_id", "alias_uri")}, sort_keys=True))


@user_errors
def promote(name: str = typer.Argument(..., help="registered model name"),
            version: Optional[str] = typer.Option(None, "--version",
                                                  help="version to promote (default: alias challenger)"),
            tracking_uri: Optional[str] = TrackingUriOpt, params_path: Path = ParamsOpt,
            sets: Optional[List[str]] = SetOpt):
    """Move alias `champion` to the challenger only if every gate in params.yaml (registry.gates) passes.

    Exit 0: promoted; 1: not promoted (a gate failed, or the numbers are not comparable). The decision
    and its numbers are written to the version's tags (promotion.*).
    """
    from subjectops.tracking.client import mlflow_client, resolve_tracking_uri, setup_environment
    from subjectops.tracking.registry import promote as do_promote

    params = build_params(params_path, sets)
    setup_environment()
    result = do_promote(mlflow_client(resolve_tracking_uri(tracking_uri)), name, params.registry, version)
    for g in result.decision.gates:
        mark = "[green]pass[/]" if g.passed else "[red]fail[/]"
        console.print(f"  {mark} {g.metric} on {g.prompt_set} ({g.backbone}): {g.reason}", highlight=False,
                      soft_wrap=True)
    against = f"champion v{result.champion_before}" if result.champion_before else "no champion yet"
    if result.promoted:
        console.print(f"[bold green]promoted[/] {name} v{result.version} to champion (against {against})",
                      highlight=False)
    else:
        console.print(f"[bold red]not promoted[/] {name} v{result.version} ({against}): "
                      f"{result.decision.summary()}",
                      highlight=False, soft_wrap=True)
    typer.echo(json.dumps(result.to_dict(), sort_keys=True, default=str))
    if not result.promoted:
        raise typer.Exit(1)
