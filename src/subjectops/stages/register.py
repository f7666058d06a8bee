"""register stage: the run's finetune becomes a version of a registered MLflow model, alias `challenger`.

`register(params, run_dir, out)` reads `RUN/finetune` and `RUN/infer/manifest.json` (required: the model
serves the inference spec infer recorded) and `RUN/evaluate/metrics.json` (optional: what promotion
compares), logs an MLflow pyfunc model and the evaluation summary to an MLflow run (`run_id`, or a new
run in `tracking.experiment`), creates a model version, sets the alias `challenger`, and writes
`RUN/register/registration.json` and `manifest.json`.
Promotion to `champion` is a separate, gated step: `subjectops promote`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from subjectops.config import Params
from subjectops.errors import SubjectopsError
from subjectops.stages.base import REGISTRATION, Stage
from subjectops.stages.common import stage_output, write_manifest


def register(
    params: Params,
    run_dir: Path,
    out: Path,
    *,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    model_name: str | None = None,
    client=None,
) -> dict:
    from subjectops.tracking.client import (
        TrackingError,
        describe_error,
        mlflow_client,
        resolve_tracking_uri,
        setup_environment,
    )
    from subjectops.tracking.registry import register_version

    run_dir, out = Path(run_dir), Path(out)
    method_json = run_dir / "finetune" / "method.json"
    if not method_json.is_file():
        raise SubjectopsError(f"{run_dir}/finetune has no method.json: nothing to register",
                              fix="run the finetune stage first")
    setup_environment()
    uri = resolve_tracking_uri(tracking_uri)
    if client is None:
        client = mlflow_client(uri)
    try:
        if run_id is None:
            exp = client.get_experiment_by_name(params.tracking.experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(params.tracking.experiment)
            run = client.create_run(exp_id, run_name=f"register {run_dir.name}",
                                    tags={"subjectops.stage": "register",
                                          "subjectops.run_dir": str(run_dir.resolve())})
            run_id = run.info.run_id
            own_run = True
        else:
            own_run = False
        info = register_version(client, params, run_dir, run_id, model_name)
        if own_run:
            client.set_terminated(run_id, "FINISHED")
    except SubjectopsError:
        raise
    except Exception as exc:  # noqa: BLE001
        if type(exc).__name__ in ("MlflowException", "RestException", "ConnectionError"):
            raise TrackingError(
                f"cannot register {run_dir} in MLflow at {uri}: {describe_error(exc, uri)}",
                fix="check that the tracking server is up (MLFLOW_TRACKING_URI) and run `subjectops register` again",
            ) from None
        raise

    info = dict(info, tracking_uri=uri, registered_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    metrics = run_dir / "evaluate" / "metrics.json"
    with stage_output(out) as work:
        (work / "registration.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        write_manifest(work, "register", params,
                       {"method.json": method_json, "metrics.json": metrics if metrics.is_file() else None},
                       model_name=info["model_name"], version=info["version"])
    return info


STAGE = Stage(
    name="register",
    help="Register the run's model in MLflow with alias `challenger`.",
    # the tracker runs it against its server (`args`: run_dir, and tracking_uri, run_id, client from the tracker)
    run=lambda ctx: register(ctx.params, ctx.args["run_dir"], ctx.out,
                             **{k: v for k, v in ctx.args.items() if k != "run_dir"}),
    reads=("refine", "finetune", "infer", "evaluate"),
    brought_by=REGISTRATION,
    absent_because="registry.auto_register is false",
    params=("registry", "tracking"),
    artifact="Artifact",
    tracked=True,
)
