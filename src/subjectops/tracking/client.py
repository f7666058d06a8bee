"""The MLflow client side of tracking: which server (the tracking URI), a client that is safe to open from
several processes on a fresh sqlite store, and what an MLflow error means (retrying cannot fix a client error;
refused credentials are named as such).

Tracking URI: the `tracking_uri` argument, else `MLFLOW_TRACKING_URI`, else `sqlite:///mlruns.db` in the current
(project) directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from subjectops.errors import SubjectopsError

# MLflow error codes that retrying cannot fix.
CLIENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "BAD_REQUEST",
    "INVALID_STATE",
}


class TrackingError(SubjectopsError):
    """The tracking server cannot be used (and retrying will not help)."""


def setup_environment() -> None:
    """Telemetry off; MLflow's own HTTP retries short, since the tracker retries with backoff itself."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def default_tracking_uri(project_dir: Path | None = None) -> str:
    return f"sqlite:///{(project_dir or Path.cwd()).resolve() / 'mlruns.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI; None for a server or another database."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve()


def local_artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts go next to the database (`mlruns/` beside `mlruns.db`), not into
    whatever directory the run happened to start in; a server decides for itself (None)."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "mlruns").as_uri()


def run_page(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to open a run in the MLflow UI: the server's page, or for a local store the `mlflow ui` command and
    the page it serves. MLflow 3's UI shows the GenAI views unless the browser last chose "Model training" (the
    experiment's kind tag does not override that toggle); `workflowType=machine_learning` opens the training view."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{path}"


def mlflow_client(uri: str):
    """An `MlflowClient` for `uri`, safe to open from several processes at once on a fresh sqlite store.

    The client opens its store on construction, and MLflow's SQL stores create a missing schema right there
    (tables, then every alembic migration) without a lock, so two processes opening a new `mlruns.db` at once
    (the parallel register steps of a benchmark under kfp.local, two `subjectops run`s) both create tables and
    one fails. Opening the first store under an exclusive lock beside the database serialises that creation;
    later opens find the schema complete and only wait for the lock briefly. A retry instead would rerun
    migrations over another process's half-built schema; creating the store in a pipeline's first step would
    give that step MLflow credentials and leave every other entry point racing. A tracking server needs nothing
    here: it creates its schema once at start-up, before any client connects, so server URIs skip the lock.
    """
    from mlflow.tracking import MlflowClient

    from subjectops.runlock import wait_for_lock

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    with wait_for_lock(db.with_name(db.name + ".lock")):
        return MlflowClient(tracking_uri=uri)


def resolve_tracking_uri(uri: str | None = None, project_dir: Path | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(project_dir)


def error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def is_client_error(exc: BaseException) -> bool:
    code = error_code(exc)
    if code in CLIENT_ERRORS:
        return True
    try:
        status = exc.get_http_status_code()  # type: ignore[attr-defined]
    except Exception:
        return False
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def describe_error(exc: BaseException, uri: str) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    code = error_code(exc)
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or " 401" in text or " 403" in text:
        return (
            f"the MLflow server at {uri} refused the credentials ({text}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
        )
    return text
