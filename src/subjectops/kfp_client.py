"""The laptop's side of the KFP API: the pipeline definitions (a checkout, or SUBJECTOPS_KFP_HOME in the image),
compiled per submission, and a `kfp.Client` that either sends or, for `--dry-run`, records.

The dry run changes nothing global: the recorder is installed on the one `kfp_server_api.ApiClient` instance the
dry-run client owns (before kfp's constructor makes its first call), so the JSON it prints is the exact request,
path and body, that a real submission sends, and nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional

from subjectops.kfp_cron import SubmitError, validate_cron


# -------------------------------------------------------------------------------- pipelines home
def kfp_home() -> Path:
    """The folder holding `components/` and `pipelines/` (a checkout, or SUBJECTOPS_KFP_HOME in the image)."""
    candidates = [os.environ.get("SUBJECTOPS_KFP_HOME"), Path.cwd(), Path(__file__).resolve().parents[2]]
    for c in candidates:
        if c and all((Path(c) / part).is_file() for part in ("pipelines/personalize.py", "components/stages.py")):
            return Path(c).resolve()
    raise SubmitError("cannot find the pipeline definitions (pipelines/ and components/)",
                      fix="run from a checkout of the subjectops repository, or set SUBJECTOPS_KFP_HOME to one")


def pipelines_module():
    home = str(kfp_home())
    if home not in sys.path:
        sys.path.insert(0, home)
    import pipelines.compile as compile_mod

    return compile_mod


def compile_package(name: str, directory: Path, *, cpu_image: Optional[str], trainer_image: Optional[str],
                    parallelism: Optional[int] = None) -> Path:
    pc = pipelines_module()
    kw: dict[str, Any] = {}
    if cpu_image:
        kw["cpu_image"] = cpu_image
    if trainer_image:
        kw["trainer_image"] = trainer_image
    if parallelism is not None:
        kw["parallelism"] = parallelism
    return pc.compile_pipeline(name, Path(directory) / f"{name}.yaml", **kw)


# ------------------------------------------------------------------------------------- recorder
@dataclass
class Recorder:
    """Stands in for the KFP REST API: records each call kfp.Client makes and answers it plausibly."""

    host: str
    requests: List[dict] = field(default_factory=list)

    def call_api(self, api_client, resource_path, method, path_params=None, query_params=None, header_params=None,
                 body=None, post_params=None, files=None, response_type=None, **_kw):
        import kfp_server_api

        path = resource_path
        for k, v in (path_params or {}).items():
            path = path.replace("{" + k + "}", str(v))
        self.requests.append({
            "method": method,
            "url": self.host.rstrip("/") + path,
            "path": path,
            "query": {k: v for k, v in (query_params or [])},
            "body": api_client.sanitize_for_serialization(body) if body is not None else None,
        })
        if response_type is None:
            return None
        if response_type == "V2beta1GetHealthzResponse":
            return kfp_server_api.V2beta1GetHealthzResponse(multi_user=False)
        if response_type == "V2beta1ListExperimentsResponse":
            return kfp_server_api.V2beta1ListExperimentsResponse(experiments=[], total_size=0)
        obj = getattr(kfp_server_api, response_type)()
        for attr, value in (("experiment_id", "DRY-RUN-EXPERIMENT-ID"), ("run_id", "DRY-RUN-RUN-ID"),
                            ("recurring_run_id", "DRY-RUN-RECURRING-RUN-ID")):
            if hasattr(obj, attr) and getattr(obj, attr) is None:
                setattr(obj, attr, value)
        return obj


def _record_calls(api_client, recorder: Recorder) -> None:
    """Answer every call of this one ApiClient instance from the recorder."""

    def call_api(resource_path, method, *args, **kwargs):
        names = ["path_params", "query_params", "header_params", "body", "post_params", "files", "response_type"]
        kwargs.update(dict(zip(names, args)))
        return recorder.call_api(api_client, resource_path, method, **kwargs)

    api_client.call_api = call_api


def _dry_run_client(recorder: Recorder, **kwargs):
    import kfp

    class DryRunClient(kfp.Client):
        def get_kfp_healthz(self, *args, **kw):  # kfp's constructor may ask the server before it returns
            _record_calls(self._healthz_api.api_client, recorder)
            return super().get_kfp_healthz(*args, **kw)

    client = DryRunClient(**kwargs)
    _record_calls(client._run_api.api_client, recorder)  # every API object of the client shares this ApiClient
    return client


@contextlib.contextmanager
def kfp_client(host: str, namespace: Optional[str], token: Optional[str],
               dry_run: bool) -> Iterator[tuple[Any, Optional[Recorder]]]:
    import kfp

    if not re.match(r"^https?://[^/\s]+", host or ""):
        raise SubmitError(f"--host {host!r} is not an http(s) URL",
                          fix="pass the KFP API URL, e.g. --host http://localhost:8080")
    if not dry_run:
        yield kfp.Client(host=host, namespace=namespace, existing_token=token), None
        return
    recorder = Recorder(host)
    with contextlib.redirect_stdout(sys.stderr):  # kfp prints links; stdout carries only the request
        client = _dry_run_client(recorder, host=host, namespace=namespace, existing_token=token)
    yield client, recorder


# ---------------------------------------------------------------------------------- submission
@dataclass(frozen=True)
class Submission:
    """Where and how a pipeline is sent: the KFP API and the run's settings, shared by every submitting command."""

    host: str
    namespace: Optional[str] = None
    token: Optional[str] = None
    service_account: Optional[str] = None
    caching: Optional[bool] = None
    pipeline_root: Optional[str] = None
    cpu_image: Optional[str] = None
    trainer_image: Optional[str] = None
    dry_run: bool = False
    output: Optional[Path] = None


def _emit(recorder: Recorder, output: Optional[Path], kind: str) -> dict:
    doc = {"dry_run": True, "kind": kind, "host": recorder.host, "requests": recorder.requests}
    text = json.dumps(doc, indent=2, sort_keys=True)
    if output:
        output.write_text(text + "\n")
    else:
        print(text)
    return doc


@contextlib.contextmanager
def _compiled_and_connected(to: Submission, pipeline: str, experiment: str, parallelism: Optional[int]):
    """The pipeline compiled into a temporary package, a client, and the experiment to file the run under."""
    with tempfile.TemporaryDirectory(prefix="subjectops-kfp-") as tmp:
        package = compile_package(pipeline, Path(tmp), cpu_image=to.cpu_image, trainer_image=to.trainer_image,
                                  parallelism=parallelism)
        with kfp_client(to.host, to.namespace, to.token, to.dry_run) as (client, recorder):
            with contextlib.redirect_stdout(sys.stderr):
                exp = client.create_experiment(name=experiment, namespace=to.namespace)
                yield client, recorder, exp, package


def submit_run(to: Submission, *, pipeline: str, arguments: dict, run_name: str, experiment: str,
               parallelism: Optional[int] = None) -> dict:
    with _compiled_and_connected(to, pipeline, experiment, parallelism) as (client, recorder, exp, package):
        run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=run_name,
                                  pipeline_package_path=str(package), params=arguments,
                                  enable_caching=to.caching, service_account=to.service_account,
                                  pipeline_root=to.pipeline_root)
    if recorder is not None:
        return _emit(recorder, to.output, "run")
    return {"run_id": run.run_id, "experiment_id": exp.experiment_id,
            "url": f"{to.host.rstrip('/')}/#/runs/details/{run.run_id}"}


def schedule_run(to: Submission, *, pipeline: str, arguments: dict, name: str, cron: str, experiment: str,
                 parallelism: Optional[int] = None) -> dict:
    cron = validate_cron(cron)
    with _compiled_and_connected(to, pipeline, experiment, parallelism) as (client, recorder, exp, package):
        rr = client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=name,
            description="subjectops benchmark (DreamBench), scheduled by `subjectops benchmark schedule`",
            cron_expression=cron, max_concurrency=1, no_catchup=True, params=arguments,
            pipeline_package_path=str(package), enabled=True, pipeline_root=to.pipeline_root,
            enable_caching=to.caching, service_account=to.service_account)
    if recorder is not None:
        return _emit(recorder, to.output, "recurring_run")
    return {"recurring_run_id": rr.recurring_run_id, "experiment_id": exp.experiment_id}
