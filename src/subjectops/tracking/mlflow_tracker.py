"""MLflow implementation of the `Tracker` protocol, with a local record that survives a dead server.

One parent run per pipeline run, one nested run per stage. Everything logged is derived from the run
directory (`subjectops.tracking.record`), and each upload step is checked off in `RUN/tracking/state.json`
(`run_state.RunState`). When the tracking server is down or stops answering (`tracking.timeout_seconds` per
request), every call is retried by one policy (`retry.retry_policy`); after the last try the run goes on
without the server, says so, and `subjectops sync RUN` (`tracking.sync`) uploads whatever is not checked off
yet, later, with the original start and end times, through this tracker's public methods (`resume`, the
`upload_*` steps, `register_model`). Nothing is logged twice.
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
from subjectops.tracking.client import (
    TrackingError,
    default_tracking_uri,
    describe_error,
    error_code,
    is_client_error,
    local_artifact_root,
    mlflow_client,
    resolve_tracking_uri,
    run_page,
    setup_environment,
)
from subjectops.tracking.retry import retry_policy
from subjectops.tracking.run_state import RunState, now_ms

METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
# The experiment's kind: "custom_model_development" ("Machine learning") rather than GenAI, for MLflow's UI when its
# GenAI / Model-training toggle is off and for tools that read the tag (the 3.17 UI with the toggle on follows the
# browser's last choice, so the links subjectops prints carry workflowType=machine_learning: client.run_page).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class _Offline(Exception):
    """Internal: the tracker is recording locally only."""


class ConnectFailed(Exception):
    """The tracking server could not be reached (after retries)."""


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

    tracks = True  # the preflight checks that its server answers before the run starts

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

    def connect(self, uri: str, experiment: str) -> str:
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
                if EXPERIMENT_KIND_TAG not in exp.tags:  # a kind someone chose in the UI stays
                    self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return exp.experiment_id
            try:
                return self.client.create_experiment(experiment, artifact_location=local_artifact_root(uri),
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception as exc:
                if error_code(exc) == "RESOURCE_ALREADY_EXISTS":  # created concurrently
                    return self.client.get_experiment_by_name(experiment).experiment_id
                raise

        try:
            return self._retrying(f"connecting to MLflow at {uri}")(get_or_create)
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001
            if is_client_error(exc):
                raise TrackingError(f"MLflow at {uri}: {describe_error(exc, uri)}",
                                    fix="check MLFLOW_TRACKING_URI and the credentials") from None
            raise ConnectFailed(describe_error(exc, uri)) from None

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
            st.data["experiment_id"] = self.connect(self.uri, experiment)
        except ConnectFailed as exc:
            self._go_offline(f"cannot reach the tracking server: {exc}")
        st.save()
        if not self.offline:
            self.echo(f"tracking to {self.uri}, experiment {experiment!r}")
        self.upload_parent_start()
        outcome = {"status": "FINISHED"}
        try:
            with _record_outcome(outcome):
                yield self
        finally:
            status = outcome["status"]
            st.data["parent"]["end"] = now_ms()
            st.data["parent"]["status"] = status
            st.save()
            self.upload_parent_end()
            st.data["pending"] = not st.everything_uploaded()
            st.save()
            if st.data["pending"]:
                self.echo(f"run recorded locally in {run_dir} (not all of it reached MLflow); upload it with "
                          f"`subjectops sync {run_dir}`")
            else:
                self.echo(f"run {st.data['parent']['run_id']} logged to {self.uri}; open it: "
                          f"{run_page(self.uri, st.data['experiment_id'], st.data['parent']['run_id'])}")

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
            self.upload_stage(name)

    # ---- a recorded run, uploaded later (`subjectops sync`) --------------------------------------
    def resume(self, st: RunState) -> None:
        """Take over a run directory's record to upload what it holds: connect to the tracking URI (the argument,
        else MLFLOW_TRACKING_URI, else the recorded one, else the default), forget run ids that mean nothing on
        that server, and leave the offline state. Raises TrackingError when the server is unreachable (after
        retries), leaving the record as it was."""
        self.params = Params.model_validate(st.data["params"])
        self.uri = (self.explicit_uri or os.environ.get("MLFLOW_TRACKING_URI") or st.data.get("tracking_uri")
                    or default_tracking_uri())
        experiment = st.data.get("experiment") or self.params.tracking.experiment
        try:
            exp_id = self.connect(self.uri, experiment)
        except ConnectFailed as exc:
            raise TrackingError(
                f"cannot reach MLflow at {self.uri}: {exc}; nothing was uploaded and {st.run_dir} is unchanged",
                fix="start the tracking server (or set MLFLOW_TRACKING_URI) and run `subjectops sync` again",
            ) from None
        if st.data.get("tracking_uri") != self.uri or st.data.get("experiment_id") != exp_id:
            # another server or experiment: the old run ids mean nothing there
            if st.data.get("tracking_uri") and st.data.get("tracking_uri") != self.uri:
                st.forget_runs()
            st.data.update(tracking_uri=self.uri, experiment_id=exp_id, experiment=experiment)
        st.data["offline"] = False
        st.data["offline_reason"] = None
        self.state = st
        self._forget_missing_runs()
        st.save()

    def _forget_missing_runs(self) -> None:
        """Run ids recorded before a server was wiped or replaced are dropped and their runs re-created."""
        st = self.state
        rid = st.data["parent"]["run_id"]
        if not rid:
            return
        try:
            self.client.get_run(rid)
        except Exception as exc:  # noqa: BLE001
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                st.forget_runs()
            elif not is_client_error(exc):
                raise TrackingError(f"cannot reach MLflow at {self.uri}: {describe_error(exc, self.uri)}",
                                    fix="start the tracking server and run `subjectops sync` again") from None

    # ---- upload steps (shared with sync) -----------------------------------------------------
    def _step(self, done: list, key: str, what: str, fn: Callable[[], Any]) -> None:
        if key in done:
            return
        self._call(what, fn)
        done.append(key)
        self.state.save()

    def upload_parent_start(self) -> None:
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

    def upload_parent_end(self) -> None:
        st = self.state
        parent = st.data["parent"]
        try:
            if not parent["run_id"]:
                self.upload_parent_start()
                if not parent["run_id"]:
                    return
            from mlflow.entities import Metric, RunTag

            tags: dict[str, str] = {}
            metrics: list[R.MetricPoint] = []
            artifacts: list[tuple[Path, str]] = []
            scratch = st.run_dir / "tracking"
            for name in st.data["order"]:
                rec = R.stage_record(name, Path(st.stage(name)["out_dir"]), scratch / name, self.stages.describe(name))
                tags.update(rec.parent_tags)
                metrics += rec.parent_metrics
                artifacts += rec.parent_artifacts
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
            for local, dest in artifacts:
                self._step(parent["done"], f"artifact:{dest}/{local.name}", f"uploading {local.name}",
                           lambda local=local, dest=dest: self.client.log_artifact(parent["run_id"], str(local),
                                                                                   dest or None))
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

    def upload_stage(self, name: str) -> None:
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
        imports no stage) inside a nested `register` run, against this tracker's server, logging the model to the
        pipeline run; True once registered.

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
                # the model and its evaluation summary go on the pipeline run, beside the report and the loss
                # curve: the version's source run is the run a user opens, not the register step's
                rid = st.data["parent"]["run_id"]
                if rid is None or st.stage("register")["run_id"] is None:
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


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("subjectops")
    except Exception:
        return "unknown"


