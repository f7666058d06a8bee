"""MLflow implementation of the `Tracker` protocol, with a local record that survives a dead server.

One parent run per pipeline run, one nested run per stage. Everything logged is derived from the run
directory (`subjectops.tracking.record`), and each upload step is checked off in
`RUN/tracking/state.json`. When the tracking server is down or stops answering (`tracking.timeout_seconds`
per request), every call is retried by one policy (`retry_policy`: `tracking.retries` tries with exponential
backoff from `tracking.backoff_seconds`); after the last try the
run goes on without the server, says so, and `subjectops sync RUN` uploads whatever is not checked
off yet, later, with the original start and end times. Nothing is logged twice.

Tracking URI: the `tracking_uri` argument, else `MLFLOW_TRACKING_URI`, else `sqlite:///mlruns.db`
in the current (project) directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import tenacity

from subjectops.config import Params, TrackingCfg
from subjectops.errors import SubjectopsError
from subjectops.tracking import StageCatalog
from subjectops.tracking import record as R

STATE_FILE = "tracking/state.json"
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
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


class _Offline(Exception):
    """Internal: the tracker is recording locally only."""


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


def now_ms() -> int:
    return int(time.time() * 1000)


def retry_policy(cfg: TrackingCfg, what: str, uri: str | None, echo: Callable[[str], None],
                 sleep: Callable[[float], None] = time.sleep) -> tenacity.Retrying:
    """The one retry policy for MLflow calls: `tracking.retries` tries, waits of `tracking.backoff_seconds`
    doubling after each failure, no retry of what retrying cannot fix (our own errors, 4xx answers)."""

    def retryable(exc: BaseException) -> bool:
        return not isinstance(exc, SubjectopsError) and not _is_client_error(exc)

    def announce(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception()
        echo(f"{what} failed ({describe_error(exc, uri)}); retry {state.attempt_number}/{cfg.retries - 1} "
             f"in {state.next_action.sleep:g} s")

    return tenacity.Retrying(stop=tenacity.stop_after_attempt(cfg.retries),
                             wait=tenacity.wait_exponential(multiplier=cfg.backoff_seconds, exp_base=2),
                             retry=tenacity.retry_if_exception(retryable), before_sleep=announce, sleep=sleep,
                             reraise=True)


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _is_client_error(exc: BaseException) -> bool:
    code = _error_code(exc)
    if code in CLIENT_ERRORS:
        return True
    try:
        status = exc.get_http_status_code()  # type: ignore[attr-defined]
    except Exception:
        return False
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def describe_error(exc: BaseException, uri: str) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    code = _error_code(exc)
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or " 401" in text or " 403" in text:
        return (
            f"the MLflow server at {uri} refused the credentials ({text}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
        )
    return text


class RunState:
    """`RUN/tracking/state.json`: which MLflow runs exist for this run directory and what is uploaded."""

    def __init__(self, run_dir: Path, data: dict | None = None):
        self.run_dir = Path(run_dir)
        self.data = data or {
            "version": 1,
            "tracking_uri": None,
            "experiment": None,
            "experiment_id": None,
            "params": {},
            "parent": {"run_id": None, "start": None, "end": None, "status": "RUNNING", "done": []},
            "stages": {},
            "order": [],
            "offline": False,
            "offline_reason": None,
            "register": {"wanted": False, "done": False},
            "pending": True,
        }

    @property
    def path(self) -> Path:
        return self.run_dir / STATE_FILE

    @classmethod
    def load(cls, run_dir: Path) -> RunState | None:
        p = Path(run_dir) / STATE_FILE
        if not p.is_file():
            return None
        try:
            return cls(run_dir, json.loads(p.read_text()))
        except ValueError as exc:
            raise TrackingError(f"{p} is not valid JSON ({exc})",
                                fix="delete it and run `subjectops sync` to rebuild the record") from None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def stage(self, name: str) -> dict:
        return self.data["stages"][name]

    def add_stage(self, name: str, out_dir: Path) -> dict:
        st = self.data["stages"].get(name)
        if st is None or st.get("end") is not None:
            # a stage re-run inside the same run directory gets a fresh record
            st = {"out_dir": str(Path(out_dir).resolve()), "run_id": None, "start": now_ms(), "end": None,
                  "status": "RUNNING", "done": []}
            self.data["stages"][name] = st
            if name in self.data["order"]:
                self.data["order"].remove(name)
            self.data["order"].append(name)
        return st

    def everything_uploaded(self) -> bool:
        parent = self.data["parent"]
        if "end" not in parent["done"]:
            return False
        if any("end" not in s["done"] for s in self.data["stages"].values()):
            return False
        reg = self.data["register"]
        return not (reg.get("wanted") and not reg.get("done"))



@contextlib.contextmanager
def _record_outcome(outcome: dict) -> Iterator[None]:
    """Set outcome["status"] to how the body ended: FINISHED, KILLED (Ctrl-C) or FAILED (MLflow's terms)."""
    try:
        yield
    except KeyboardInterrupt:
        outcome["status"] = "KILLED"
        raise
    except BaseException:
        outcome["status"] = "FAILED"
        raise

class MlflowTracker:
    """Tracker for `subjectops.pipeline.run`: parent run + one nested run per stage, local fallback."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        cfg: TrackingCfg | None = None,
        echo: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        *,
        stages: StageCatalog | None = None,  # None: a tracker that records no stage (the leaderboard's run)
    ):
        setup_environment()
        self.stages = stages
        self.explicit_uri = tracking_uri
        self.cfg = cfg
        self.experiment = experiment
        self.echo = echo or (lambda msg: print(f"[tracking] {msg}", file=sys.stderr, flush=True))
        self.sleep = sleep
        self.uri: str | None = None
        self.client = None
        self.state: RunState | None = None
        self.params: Params | None = None

    # ---- connection and retries -------------------------------------------------------------
    @property
    def offline(self) -> bool:
        return bool(self.state and self.state.data["offline"])

    def _cfg(self) -> TrackingCfg:
        return self.cfg or (self.params.tracking if self.params else TrackingCfg())

    def _retrying(self, what: str) -> tenacity.Retrying:
        return retry_policy(self._cfg(), what, self.uri, self.echo, self.sleep)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.offline or self.client is None:
            raise _Offline()
        try:
            return self._retrying(what)(fn)
        except Exception as exc:  # noqa: BLE001 - any failure of the server or network
            if isinstance(exc, SubjectopsError) and not isinstance(exc, TrackingError):
                raise  # a problem with the run itself (e.g. nothing to register), not the server's
            self._go_offline(f"{what}: {describe_error(exc, self.uri)}")
            raise _Offline() from None

    def _go_offline(self, reason: str) -> None:
        if self.state is None or self.state.data["offline"]:
            return
        self.state.data["offline"] = True
        self.state.data["offline_reason"] = reason
        self.state.save()
        self.echo(
            f"MLflow at {self.uri} is unavailable ({reason}). The run continues and is recorded locally in "
            f"{self.state.path}; upload it later with `subjectops sync {self.state.run_dir}`"
        )

    def _connect(self, uri: str, experiment: str) -> str:
        # MLflow reads its HTTP timeout from the environment on every request.
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self._cfg().timeout_seconds)
        self.client = mlflow_client(uri)

        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"MLflow experiment {experiment!r} at {uri} is deleted",
                        fix="restore it (`mlflow experiments restore`) or set tracking.experiment to another name",
                    )
                return exp.experiment_id
            try:
                return self.client.create_experiment(experiment, artifact_location=local_artifact_root(uri))
            except Exception as exc:
                if _error_code(exc) == "RESOURCE_ALREADY_EXISTS":  # created concurrently
                    return self.client.get_experiment_by_name(experiment).experiment_id
                raise

        try:
            return self._retrying(f"connecting to MLflow at {uri}")(get_or_create)
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001
            if _is_client_error(exc):
                raise TrackingError(f"MLflow at {uri}: {describe_error(exc, uri)}",
                                    fix="check MLFLOW_TRACKING_URI and the credentials") from None
            raise _ConnectFailed(describe_error(exc, uri)) from None

    # ---- Tracker protocol --------------------------------------------------------------------
    @contextlib.contextmanager
    def pipeline(self, params: Params, run_dir: Path) -> Iterator[MlflowTracker]:
        run_dir = Path(run_dir)
        self.params = params
        self.uri = resolve_tracking_uri(self.explicit_uri)
        experiment = self.experiment or params.tracking.experiment
        st = RunState(run_dir)
        st.data.update(tracking_uri=self.uri, experiment=experiment, params=params.model_dump(mode="json"))
        st.data["parent"]["start"] = now_ms()
        self.state = st
        st.save()
        try:
            st.data["experiment_id"] = self._connect(self.uri, experiment)
        except _ConnectFailed as exc:
            self._go_offline(f"cannot reach the tracking server: {exc}")
        st.save()
        if not self.offline:
            self.echo(f"tracking to {self.uri}, experiment {experiment!r}")
        self._upload_parent_start()
        outcome = {"status": "FINISHED"}
        try:
            with _record_outcome(outcome):
                yield self
        finally:
            status = outcome["status"]
            st.data["parent"]["end"] = now_ms()
            st.data["parent"]["status"] = status
            st.save()
            self._upload_parent_end()
            st.data["pending"] = not st.everything_uploaded()
            st.save()
            if st.data["pending"]:
                self.echo(f"run recorded locally in {run_dir} (not all of it reached MLflow); upload it with "
                          f"`subjectops sync {run_dir}`")
            else:
                self.echo(f"run {st.data['parent']['run_id']} logged to {self.uri}")

    @contextlib.contextmanager
    def stage(self, name: str, out_dir: Path) -> Iterator[MlflowTracker]:
        assert self.state is not None, "stage() must be used inside pipeline()"
        st = self.state.add_stage(name, out_dir)
        self.state.save()
        self._ensure_stage_run(name)
        outcome = {"status": "FINISHED"}
        try:
            with _record_outcome(outcome):
                yield self
        finally:
            st["end"] = now_ms()
            st["status"] = outcome["status"]
            self.state.save()
            self._upload_stage(name)

    # ---- upload steps (shared with sync) -----------------------------------------------------
    def _step(self, done: list, key: str, what: str, fn: Callable[[], Any]) -> None:
        if key in done:
            return
        self._call(what, fn)
        done.append(key)
        self.state.save()

    def _upload_parent_start(self) -> None:
        st = self.state
        parent = st.data["parent"]
        try:
            if not parent["run_id"]:
                run = self._call("creating the pipeline run", lambda: self.client.create_run(
                    st.data["experiment_id"], start_time=parent["start"], run_name=st.run_dir.name,
                    tags={"subjectops.run_dir": str(st.run_dir.resolve()), "subjectops.kind": "pipeline",
                          "mlflow.source.name": "subjectops", "subjectops.version": _version()}))
                parent["run_id"] = run.info.run_id
                parent["done"].append("create")
                st.save()
            from mlflow.entities import Param

            flat = sorted((k, R.param_value(v)) for k, v in R.flatten(st.data["params"]).items())
            for i in range(0, len(flat), PARAMS_PER_BATCH):
                chunk = flat[i : i + PARAMS_PER_BATCH]
                self._step(parent["done"], f"params:{i}", "logging params", lambda chunk=chunk: self.client.log_batch(
                    parent["run_id"], params=[Param(k, v[:6000]) for k, v in chunk], synchronous=True))
        except _Offline:
            pass

    def _upload_parent_end(self) -> None:
        st = self.state
        parent = st.data["parent"]
        try:
            if not parent["run_id"]:
                self._upload_parent_start()
                if not parent["run_id"]:
                    return
            from mlflow.entities import Metric, RunTag

            tags: dict[str, str] = {}
            metrics: list[R.MetricPoint] = []
            scratch = st.run_dir / "tracking"
            for name in st.data["order"]:
                rec = R.stage_record(name, Path(st.stage(name)["out_dir"]), scratch / name, self.stages.describe(name))
                tags.update(rec.parent_tags)
                metrics += rec.parent_metrics
            params_json = scratch / "params.json"
            params_json.write_text(json.dumps(st.data["params"], indent=1, sort_keys=True))
            self._step(parent["done"], "tags", "tagging the pipeline run", lambda: self.client.log_batch(
                parent["run_id"], tags=[RunTag(k, v[:5000]) for k, v in tags.items()], synchronous=True) if tags
                       else None)
            ts = parent["end"] or now_ms()
            for i in range(0, len(metrics), METRICS_PER_BATCH):
                chunk = metrics[i : i + METRICS_PER_BATCH]
                self._step(parent["done"], f"metrics:{i}", "logging pipeline metrics",
                           lambda chunk=chunk: self.client.log_batch(
                    parent["run_id"], metrics=[Metric(p.key, p.value, ts, p.step) for p in chunk], synchronous=True))
            self._step(parent["done"], "params.json", "uploading params.json",
                       lambda: self.client.log_artifact(parent["run_id"], str(params_json)))
            if parent["status"] != "RUNNING":
                self._step(parent["done"], "end", "ending the pipeline run", lambda: self.client.set_terminated(
                    parent["run_id"], status=parent["status"], end_time=parent["end"]))
        except _Offline:
            pass

    def _ensure_stage_run(self, name: str) -> None:
        st = self.state
        s = st.stage(name)
        parent = st.data["parent"]
        if s["run_id"] or not parent["run_id"]:
            return
        try:
            run = self._call(f"creating the {name} run", lambda: self.client.create_run(
                st.data["experiment_id"], start_time=s["start"], run_name=name,
                tags={"mlflow.parentRunId": parent["run_id"], "subjectops.stage": name, "subjectops.kind": "stage",
                      "subjectops.run_dir": str(st.run_dir.resolve())}))
            s["run_id"] = run.info.run_id
            s["done"].append("create")
            st.save()
        except _Offline:
            pass

    def _upload_stage(self, name: str) -> None:
        from mlflow.entities import Metric, RunTag

        st = self.state
        s = st.stage(name)
        try:
            if not s["run_id"]:
                self._ensure_stage_run(name)
                if not s["run_id"]:
                    raise _Offline()
            rec = R.stage_record(name, Path(s["out_dir"]), st.run_dir / "tracking" / name, self.stages.describe(name))
            rid = s["run_id"]
            tags = dict(rec.tags)
            self._step(s["done"], "tags", f"tagging the {name} run", lambda: self.client.log_batch(
                rid, tags=[RunTag(k, v[:5000]) for k, v in tags.items()], synchronous=True))
            ts = s["end"] or now_ms()
            for i in range(0, len(rec.metrics), METRICS_PER_BATCH):
                chunk = rec.metrics[i : i + METRICS_PER_BATCH]
                self._step(s["done"], f"metrics:{i}", f"logging {name} metrics",
                           lambda chunk=chunk: self.client.log_batch(
                    rid, metrics=[Metric(p.key, p.value, p.timestamp or ts, p.step) for p in chunk], synchronous=True))
            for local, dest in rec.artifacts:
                key = f"artifact:{dest}/{local.name}"

                def up(local=local, dest=dest):
                    if local.is_dir():
                        self.client.log_artifacts(rid, str(local), dest)
                    else:
                        self.client.log_artifact(rid, str(local), dest)

                self._step(s["done"], key, f"uploading {local.name} of {name}", up)
            if s["status"] != "RUNNING":
                self._step(s["done"], "end", f"ending the {name} run",
                           lambda: self.client.set_terminated(rid, status=s["status"], end_time=s["end"]))
        except _Offline:
            pass

    def register_model(self, register: Callable[..., dict], run_dir: Path, out: Path) -> bool:
        """Run the `register` stage function (`subjectops.stages.register.register`, passed in: the tracker
        imports no stage) inside a nested `register` run, against this tracker's server; True once registered.

        Registration is recorded as wanted first, so when the server is down (or registering fails) the
        run still completes and `subjectops sync RUN` registers it later.
        """
        st = self.state
        st.data["register"]["wanted"] = True
        st.save()
        if self.offline:
            self.echo("model registration deferred until `subjectops sync` (MLflow unavailable)")
            return False
        try:
            with self.stage("register", out):
                rid = st.stage("register")["run_id"]
                if rid is None:
                    raise _Offline()
                params = self.params or Params.model_validate(st.data["params"])
                info = self._call("registering the model", lambda: register(
                    params, run_dir, out, tracking_uri=self.uri, run_id=rid, client=self.client))
                st.data["register"].update(done=True, model_name=info["model_name"], version=info["version"])
                st.save()
                self.echo(f"registered {info['model_name']} version {info['version']} (alias challenger)")
                return True
        except _Offline:
            self.echo("model registration deferred until `subjectops sync` (MLflow unavailable)")
        except Exception as exc:  # noqa: BLE001 - the run's results are safe; say why and keep it pending
            st.data["register"]["error"] = str(exc).splitlines()[0][:500]
            st.save()
            self.echo(f"model registration failed: {exc}; the run is complete, retry with `subjectops sync {run_dir}`")
        return False


class _ConnectFailed(Exception):
    pass


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("subjectops")
    except Exception:
        return "unknown"


def sync(run_dir: Path, stages: StageCatalog, tracking_uri: str | None = None,
         echo: Callable[[str], None] | None = None) -> dict:
    """Upload what a run directory recorded locally (or a run made without tracking) to MLflow, and
    register its model with `stages.register` when the run wants it and has not.

    Returns a summary: parent run id, stages uploaded, registration. Raises TrackingError when the
    server is still unreachable (after retries); the local record is left as it was.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrackingError(f"run directory {run_dir} does not exist",
                            fix="pass the folder `subjectops run --out` wrote")
    st = RunState.load(run_dir)
    if st is None:
        st = _state_from_directory(run_dir, stages)
    tr = MlflowTracker(tracking_uri=tracking_uri, echo=echo, stages=stages)
    tr.params = Params.model_validate(st.data["params"])
    tr.uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or st.data.get("tracking_uri")
              or default_tracking_uri())
    experiment = st.data.get("experiment") or tr.params.tracking.experiment
    try:
        exp_id = tr._connect(tr.uri, experiment)
    except _ConnectFailed as exc:
        raise TrackingError(
            f"cannot reach MLflow at {tr.uri}: {exc}; nothing was uploaded and {run_dir} is unchanged",
            fix="start the tracking server (or set MLFLOW_TRACKING_URI) and run `subjectops sync` again",
        ) from None
    if st.data.get("tracking_uri") != tr.uri or st.data.get("experiment_id") != exp_id:
        # another server or experiment: the old run ids mean nothing there
        if st.data.get("tracking_uri") and st.data.get("tracking_uri") != tr.uri:
            _forget_runs(st)
        st.data.update(tracking_uri=tr.uri, experiment_id=exp_id, experiment=experiment)
    st.data["offline"] = False
    st.data["offline_reason"] = None
    tr.state = st
    _forget_missing_runs(tr, st)
    st.save()
    tr._upload_parent_start()
    for name in list(st.data["order"]):
        if name == "register" and not (run_dir / "register" / "registration.json").is_file():
            continue
        tr._ensure_stage_run(name)
        tr._upload_stage(name)
    reg = st.data["register"]
    if (
        not tr.offline
        and reg.get("wanted")
        and not reg.get("done")
        and st.data["parent"]["status"] == "FINISHED"
        and (run_dir / "finetune" / "method.json").is_file()
    ):
        tr.register_model(stages.register, run_dir, run_dir / "register")
    tr._upload_parent_end()
    st.data["pending"] = not st.everything_uploaded()
    st.save()
    if tr.offline or st.data["pending"]:
        raise TrackingError(
            f"sync of {run_dir} stopped before the end ({st.data.get('offline_reason') or 'incomplete'}); what was "
            "uploaded is recorded",
            fix="run `subjectops sync` again when the server is reachable",
        )
    return {
        "tracking_uri": tr.uri,
        "parent_run_id": st.data["parent"]["run_id"],
        "stages": {n: st.stage(n)["run_id"] for n in st.data["order"]},
        "registered": {k: reg.get(k) for k in ("model_name", "version") if reg.get(k)},
    }


def _forget_runs(st: RunState) -> None:
    st.data["parent"].update(run_id=None, done=[])
    for s in st.data["stages"].values():
        s.update(run_id=None, done=[])
    if st.data["register"].get("done"):
        st.data["register"]["done"] = False


def _forget_missing_runs(tr: MlflowTracker, st: RunState) -> None:
    """Run ids recorded before a server was wiped or replaced are dropped and their runs re-created."""
    rid = st.data["parent"]["run_id"]
    if not rid:
        return
    try:
        tr.client.get_run(rid)
    except Exception as exc:  # noqa: BLE001
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            _forget_runs(st)
        elif not _is_client_error(exc):
            raise TrackingError(f"cannot reach MLflow at {tr.uri}: {describe_error(exc, tr.uri)}",
                                fix="start the tracking server and run `subjectops sync` again") from None


def _state_from_directory(run_dir: Path, stages: StageCatalog) -> RunState:
    """A record for a run directory made without a tracker: its stages, from their manifests."""
    st = RunState(run_dir)
    params = None
    for name in stages.order:
        m = run_dir / name / "manifest.json"
        if not m.is_file():
            continue
        manifest = json.loads(m.read_text())
        params = params or manifest.get("params")
        mtime = int(m.stat().st_mtime * 1000)
        created = manifest.get("created")
        st.data["stages"][name] = {"out_dir": str((run_dir / name).resolve()), "run_id": None, "start": mtime,
                                   "end": mtime,
                                   "status": "FINISHED", "done": [], "created": created}
        st.data["order"].append(name)
    if not st.data["order"]:
        raise TrackingError(f"{run_dir} holds no stage output (no */manifest.json)",
                            fix="pass a run directory written by `subjectops run`")
    p = Params.model_validate(params or {})
    st.data["params"] = p.model_dump(mode="json")
    starts = [s["start"] for s in st.data["stages"].values()]
    st.data["parent"].update(start=min(starts), end=max(starts), status="FINISHED")
    st.data["register"]["wanted"] = stages.wants_registration(p) and "register" not in st.data["order"]
    st.data["experiment"] = p.tracking.experiment
    return st
