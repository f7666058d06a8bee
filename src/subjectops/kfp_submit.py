"""Kubeflow submission from a laptop or CI: `subjectops submit` and `subjectops benchmark ...` (what runs inside
the pods is `subjectops.kfp_pod`).

Every request goes through `kfp.Client`. With `--dry-run` the same client code runs against a recorder
that stands in for the KFP REST API (`kfp_server_api.ApiClient.call_api`), so the JSON it prints is the
exact request, path and body, that a real submission sends; nothing leaves the machine.

Everything that can be checked here is checked before anything is sent: the subject URI, the method and
every params.yaml value (validated exactly as the pipeline's `configure` step will), the cron expression
(KFP's has six fields, seconds first) and the placement options.
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

import typer

from subjectops.cli_common import MethodOpt, ParamsOpt, SetOpt, user_errors
from subjectops.errors import SubjectopsError

DEFAULT_EXPERIMENT = "subjectops"
BENCHMARK_EXPERIMENT = "subjectops-benchmark"


class SubmitError(SubjectopsError):
    pass


# ------------------------------------------------------------------------------------------ cron
_CRON_FIELDS = (
    ("seconds", 0, 59, None),
    ("minutes", 0, 59, None),
    ("hours", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]),
    ("day of week", 0, 6, ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]),
)
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _cron_value(text: str, lo: int, hi: int, names: Optional[list[str]], what: str, expr: str) -> int:
    if names and text.upper() in names:
        return names.index(text.upper()) + lo
    if not text.isdigit():
        raise SubmitError(f"cron {expr!r}: {what} value {text!r} is not a number"
                          + (f" or one of {', '.join(names)}" if names else ""))
    v = int(text)
    if not lo <= v <= hi:
        raise SubmitError(f"cron {expr!r}: {what} value {v} is outside {lo}-{hi}")
    return v


def validate_cron(expr: str) -> str:
    """Check a KFP recurring-run cron expression: six fields, seconds first (robfig/cron syntax).

    Accepts `*`, `?` (day fields), numbers, names (JAN-DEC, SUN-SAT), ranges `a-b`, steps `*/n` and
    `a-b/n`, lists `a,b`, and the descriptors `@daily`, `@every 1h30m`, .... Returns the expression.
    """
    expr = (expr or "").strip()
    if not expr:
        raise SubmitError("the cron expression is empty", fix="pass --cron '0 0 3 * * *' (every day at 03:00:00)")
    if expr.startswith("@"):
        if expr in _DESCRIPTORS:
            return expr
        if expr.startswith("@every "):
            if _DURATION.match(expr[len("@every "):].strip()):
                return expr
            raise SubmitError(f"cron {expr!r}: '@every' needs a Go duration such as 1h30m",
                              fix="e.g. --cron '@every 24h'")
        raise SubmitError(f"cron {expr!r}: unknown descriptor",
                          fix=f"use one of {', '.join(_DESCRIPTORS)} or '@every DURATION'")
    parts = expr.split()
    if len(parts) != 6:
        fix = "KFP's cron has six fields: seconds minutes hours day-of-month month day-of-week"
        if len(parts) == 5:
            fix += f"; for this five-field expression write '0 {expr}'"
        raise SubmitError(f"cron {expr!r} has {len(parts)} fields, KFP needs 6 (seconds first)", fix=fix)
    for part, (what, lo, hi, names) in zip(parts, _CRON_FIELDS):
        for item in part.split(","):
            if not item:
                raise SubmitError(f"cron {expr!r}: empty list item in the {what} field")
            base, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                raise SubmitError(f"cron {expr!r}: step {step!r} in the {what} field must be a positive number")
            if base in ("*", "?"):
                if base == "?" and what not in ("day of month", "day of week"):
                    raise SubmitError(f"cron {expr!r}: '?' is allowed only in the day fields, not in {what}")
                continue
            a, dash, b = base.partition("-")
            first = _cron_value(a, lo, hi, names, what, expr)
            if dash:
                last = _cron_value(b, lo, hi, names, what, expr)
                if last < first:
                    raise SubmitError(f"cron {expr!r}: range {base!r} in the {what} field runs backwards")
    return expr


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


@contextlib.contextmanager
def kfp_client(host: str, namespace: Optional[str], token: Optional[str],
               dry_run: bool) -> Iterator[tuple[Any, Optional[Recorder]]]:
    import kfp
    import kfp_server_api

    if not re.match(r"^https?://[^/\s]+", host or ""):
        raise SubmitError(f"--host {host!r} is not an http(s) URL",
                          fix="pass the KFP API URL, e.g. --host http://localhost:8080")
    if not dry_run:
        yield kfp.Client(host=host, namespace=namespace, existing_token=token), None
        return
    recorder = Recorder(host)
    original = kfp_server_api.ApiClient.call_api

    def fake(self, resource_path, method, *args, **kwargs):
        names = ["path_params", "query_params", "header_params", "body", "post_params", "files", "response_type"]
        kwargs.update(dict(zip(names, args)))
        return recorder.call_api(self, resource_path, method, **kwargs)

    kfp_server_api.ApiClient.call_api = fake
    try:
        with contextlib.redirect_stdout(sys.stderr):  # kfp prints links; stdout carries only the request
            client = kfp.Client(host=host, namespace=namespace, existing_token=token)
        yield client, recorder
    finally:
        kfp_server_api.ApiClient.call_api = original


# ----------------------------------------------------------------------------------- arguments
@dataclass
class Placement:
    accelerator_type: str
    gpu_count: int
    gpu_node_selector: dict
    gpu_tolerations: list
    model_cache_pvc: str
    mlflow_secret: str
    s3_secret: str
    priors_cache_dir: str

    def arguments(self) -> dict:
        return dict(self.__dict__)


def _json_option(text: str, what: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SubmitError(f"{what} is not valid JSON: {exc}",
                          fix=f"pass JSON, e.g. {what} "
                          + ("'{\"pool\": \"gpu\"}'" if kind is dict
                             else "'[{\"key\": \"nvidia.com/gpu\", \"operator\": \"Exists\", \"effect\": "
                             "\"NoSchedule\"}]'")) from None
    if not isinstance(value, kind):
        raise SubmitError(f"{what} must be a JSON {'object' if kind is dict else 'list'}, got {type(value).__name__}")
    return value


_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def make_placement(accelerator_type: str, gpu_count: int, node_selector: str, tolerations: str, model_cache_pvc: str,
                   mlflow_secret: str, s3_secret: str, priors_cache_dir: str) -> Placement:
    sel = _json_option(node_selector, "--gpu-node-selector", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in sel.items()):
        raise SubmitError("--gpu-node-selector must map label names to string values",
                          fix="quote values: '{\"gpu\": \"true\"}'")
    tols = _json_option(tolerations, "--gpu-tolerations", list)
    for t in tols:
        if not isinstance(t, dict) or set(t) - _TOLERATION_KEYS:
            raise SubmitError(f"toleration {t!r} is not a Kubernetes toleration",
                              fix=f"use only the keys {', '.join(sorted(_TOLERATION_KEYS))}")
        effects = ("NoSchedule", "PreferNoSchedule", "NoExecute")
        if t.get("operator", "Equal") not in ("Equal", "Exists") or t.get("effect", "NoSchedule") not in effects:
            raise SubmitError(f"toleration {t!r}: operator must be Equal or Exists, effect NoSchedule, "
                              "PreferNoSchedule or NoExecute")
    if gpu_count < 1:
        raise SubmitError(f"--gpu-count {gpu_count} must be at least 1")
    for what, name in (("--model-cache-pvc", model_cache_pvc), ("--mlflow-secret", mlflow_secret),
                       ("--s3-secret", s3_secret)):
        if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", name or ""):
            raise SubmitError(f"{what} {name!r} is not a Kubernetes object name",
                              fix="lower-case letters, digits, '-' and '.'")
    return Placement(accelerator_type, gpu_count, sel, tols, model_cache_pvc, mlflow_secret, s3_secret,
                     priors_cache_dir)


def read_params_text(params_path: Path) -> str:
    """The params.yaml sent with the run (empty: the image's built-in defaults)."""
    if params_path.is_file():
        return params_path.read_text()
    if params_path != Path("params.yaml"):
        raise SubmitError(f"params file {params_path} does not exist", fix="pass --params PATH to an existing file")
    return ""


def check_params(params_yaml: str, overrides: list[str], method: str, model: str):
    """Validate exactly as the pipeline's `configure` step will: a bad value fails before anything is sent."""
    from subjectops.kfp_pod import resolve_params

    return resolve_params(params_yaml, overrides, method=method, model=model)


def check_subject(uri: str) -> dict:
    from subjectops.kfp_pod import parse_subject_uri

    spec = parse_subject_uri(uri)
    if spec["kind"] == "local":
        raise SubmitError(
            f"subject {uri!r} is a path on this machine, which the cluster cannot read",
            fix="upload the photos (subjectops data push DIR s3://subjectops-data/subjects/NAME) and pass the s3:// "
                "URI, or pass dvc://PATH with --dvc-repo",
        )
    from subjectops.data.subject import check_subject_name

    check_subject_name(spec["name"])
    return spec


# ---------------------------------------------------------------------------------- submission
def _emit(recorder: Recorder, output: Optional[Path], kind: str) -> dict:
    doc = {"dry_run": True, "kind": kind, "host": recorder.host, "requests": recorder.requests}
    text = json.dumps(doc, indent=2, sort_keys=True)
    if output:
        output.write_text(text + "\n")
    else:
        print(text)
    return doc


def submit_run(*, pipeline: str, host: str, arguments: dict, run_name: str, experiment: str, namespace: Optional[str],
               token: Optional[str], service_account: Optional[str], enable_caching: Optional[bool],
               pipeline_root: Optional[str], cpu_image: Optional[str], trainer_image: Optional[str],
               parallelism: Optional[int] = None, dry_run: bool = False, output: Optional[Path] = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="subjectops-kfp-") as tmp:
        package = compile_package(pipeline, Path(tmp), cpu_image=cpu_image, trainer_image=trainer_image,
                                  parallelism=parallelism)
        with kfp_client(host, namespace, token, dry_run) as (client, recorder):
            with contextlib.redirect_stdout(sys.stderr):
                exp = client.create_experiment(name=experiment, namespace=namespace)
                run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=run_name,
                                          pipeline_package_path=str(package), params=arguments,
                                          enable_caching=enable_caching, service_account=service_account,
                                          pipeline_root=pipeline_root)
    if recorder is not None:
        return _emit(recorder, output, "run")
    return {"run_id": run.run_id, "experiment_id": exp.experiment_id,
            "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}


def schedule_run(*, pipeline: str, host: str, arguments: dict, name: str, cron: str, experiment: str,
                 namespace: Optional[str], token: Optional[str], service_account: Optional[str],
                 enable_caching: Optional[bool], pipeline_root: Optional[str], cpu_image: Optional[str],
                 trainer_image: Optional[str], parallelism: Optional[int] = None, dry_run: bool = False,
                 output: Optional[Path] = None) -> dict:
    cron = validate_cron(cron)
    with tempfile.TemporaryDirectory(prefix="subjectops-kfp-") as tmp:
        package = compile_package(pipeline, Path(tmp), cpu_image=cpu_image, trainer_image=trainer_image,
                                  parallelism=parallelism)
        with kfp_client(host, namespace, token, dry_run) as (client, recorder):
            with contextlib.redirect_stdout(sys.stderr):
                exp = client.create_experiment(name=experiment, namespace=namespace)
                rr = client.create_recurring_run(
                    experiment_id=exp.experiment_id, job_name=name,
                    description="subjectops benchmark (DreamBench), scheduled by `subjectops benchmark schedule`",
                    cron_expression=cron, max_concurrency=1, no_catchup=True, params=arguments,
                    pipeline_package_path=str(package), enabled=True, pipeline_root=pipeline_root,
                    enable_caching=enable_caching, service_account=service_account)
    if recorder is not None:
        return _emit(recorder, output, "recurring_run")
    return {"recurring_run_id": rr.recurring_run_id, "experiment_id": exp.experiment_id}


# ------------------------------------------------------------------------------------------ CLI
def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _common(params_path: Path, sets: Optional[List[str]], method: Optional[str], model: Optional[str]):
    params_yaml = read_params_text(params_path)
    overrides = list(sets or [])
    p = check_params(params_yaml, overrides, method or "", model or "")
    return params_yaml, overrides, p


HostOpt = typer.Option(..., "--host", envvar="KFP_HOST", help="KFP API URL, e.g. http://localhost:8080 (or $KFP_HOST)")
NamespaceOpt = typer.Option(None, "--namespace", help="Kubeflow profile namespace (multi-user)")
TokenOpt = typer.Option(None, "--token", envvar="KFP_TOKEN", help="bearer token for the KFP API (or $KFP_TOKEN)")
SAOpt = typer.Option(None, "--service-account", help="ServiceAccount of the run's pods (the chart's pipeline runner)")
ModelOpt = typer.Option(None, "--model", help="hub id or directory on the model cache (= model.base)")
DryRunOpt = typer.Option(False, "--dry-run", help="print the exact KFP API requests as JSON instead of sending them")
OutputOpt = typer.Option(None, "--output", help="with --dry-run: write the requests to this file instead of stdout")
CachingOpt = typer.Option(None, "--caching/--no-caching", help="override the steps' caching for this run")
RootOpt = typer.Option(None, "--pipeline-root", help="artifact root (default: the KFP deployment's)")
CpuImageOpt = typer.Option(None, "--cpu-image", envvar="SUBJECTOPS_CPU_IMAGE", help="image of the CPU steps")
TrainerImageOpt = typer.Option(None, "--trainer-image", envvar="SUBJECTOPS_TRAINER_IMAGE",
                               help="image of the GPU steps")
AccelOpt = typer.Option("nvidia.com/gpu", "--accelerator-type", help="GPU resource name")
GpuCountOpt = typer.Option(1, "--gpu-count", help="GPUs per GPU step; above 1, finetune runs through accelerate")
NodeSelOpt = typer.Option('{"nvidia.com/gpu.present": "true"}', "--gpu-node-selector",
                          help="GPU node pool labels (JSON object)")
TolOpt = typer.Option('[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]', "--gpu-tolerations",
                      help="GPU node pool tolerations (JSON list)")
PvcOpt = typer.Option("subjectops-model-cache", "--model-cache-pvc", help="model-cache PVC mounted at /models")
MlflowSecretOpt = typer.Option("subjectops-mlflow", "--mlflow-secret",
                               help="Secret with MLFLOW_TRACKING_URI/USERNAME/PASSWORD")
S3SecretOpt = typer.Option("subjectops-s3", "--s3-secret",
                           help="Secret with AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY/ENDPOINT_URL")
PriorsCacheOpt = typer.Option("/models/cache/priors", "--priors-cache-dir",
                              help="class-prior cache (on the model cache)")
DvcRepoOpt = typer.Option("", "--dvc-repo", help="git URL of the DVC repository for dvc:// subjects")
DvcRevOpt = typer.Option("", "--dvc-rev", help="revision of --dvc-repo")


@user_errors
def submit(
    subject: str = typer.Argument(..., help="s3://bucket/prefix of the photos, or dvc://path[@rev] with --dvc-repo"),
    class_word: str = typer.Option(..., "--class", help="the subject's class, e.g. teapot"),
    host: str = HostOpt, method: Optional[str] = MethodOpt, model: Optional[str] = ModelOpt,
    params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt,
    run_name: Optional[str] = typer.Option(None, "--run-name", help="default: personalize-<subject>-<method>"),
    experiment: str = typer.Option(DEFAULT_EXPERIMENT, "--experiment"),
    namespace: Optional[str] = NamespaceOpt, token: Optional[str] = TokenOpt, service_account: Optional[str] = SAOpt,
    dvc_repo: str = DvcRepoOpt, dvc_rev: str = DvcRevOpt,
    accelerator_type: str = AccelOpt, gpu_count: int = GpuCountOpt, gpu_node_selector: str = NodeSelOpt,
    gpu_tolerations: str = TolOpt, model_cache_pvc: str = PvcOpt, mlflow_secret: str = MlflowSecretOpt,
    s3_secret: str = S3SecretOpt, priors_cache_dir: str = PriorsCacheOpt,
    cpu_image: Optional[str] = CpuImageOpt, trainer_image: Optional[str] = TrainerImageOpt,
    caching: Optional[bool] = CachingOpt, pipeline_root: Optional[str] = RootOpt,
    dry_run: bool = DryRunOpt, output: Optional[Path] = OutputOpt,
):
    """Submit a `personalize` run of one subject to Kubeflow Pipelines."""
    spec = check_subject(subject)
    if not class_word.strip():
        raise SubmitError("the class word is empty",
                          fix="pass --class with the subject's category, e.g. --class teapot")
    if spec["kind"] == "dvc" and not dvc_repo:
        raise SubmitError(f"subject {subject} is a DVC path but --dvc-repo is not given",
                          fix="pass --dvc-repo GIT_URL")
    params_yaml, overrides, p = _common(params_path, sets, method, model)
    placement = make_placement(accelerator_type, gpu_count, gpu_node_selector, gpu_tolerations, model_cache_pvc,
                               mlflow_secret, s3_secret, priors_cache_dir)
    arguments = {"subject_uri": subject, "class_word": class_word.strip(), "method": p.finetune.method,
                 "model": model or "", "overrides": overrides, "params_yaml": params_yaml,
                 "dvc_repo": dvc_repo, "dvc_rev": dvc_rev, **placement.arguments()}
    name = run_name or f"personalize-{spec['name']}-{p.finetune.method}"
    result = submit_run(pipeline="personalize", host=host, arguments=arguments, run_name=name, experiment=experiment,
                        namespace=namespace, token=token, service_account=service_account, enable_caching=caching,
                        pipeline_root=pipeline_root, cpu_image=cpu_image, trainer_image=trainer_image,
                        dry_run=dry_run, output=output)
    if not dry_run:
        _echo(f"submitted run {result['run_id']}: {result['url']}")


benchmark_app = typer.Typer(no_args_is_help=True,
                            help="The DreamBench benchmark on Kubeflow: submit, schedule, aggregate.")


def _subjects(subjects_file: Optional[Path], subjects_root: str) -> list[dict]:
    pipelines_module()  # puts the pipeline definitions on sys.path
    from pipelines.benchmark import dreambench_subjects

    if subjects_file is None:
        return dreambench_subjects(subjects_root)
    try:
        items = json.loads(subjects_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SubmitError(f"cannot read subjects from {subjects_file}: {exc}",
                          fix='write a JSON list of {"uri": ..., "class_word": ...}') from None
    if not isinstance(items, list) or not items:
        raise SubmitError(f"{subjects_file} must hold a non-empty JSON list of subjects")
    for it in items:
        if not isinstance(it, dict) or set(it) != {"uri", "class_word"}:
            raise SubmitError(f"subject {it!r} must have exactly the keys uri and class_word")
        check_subject(it["uri"])
    return items


def _benchmark_arguments(subjects_file, subjects_root, method, model, params_path, sets, fail_on_refused, dvc_repo,
                         dvc_rev,
                         accelerator_type, gpu_count, gpu_node_selector, gpu_tolerations, model_cache_pvc,
                         mlflow_secret, s3_secret, priors_cache_dir, parallelism) -> dict:
    if parallelism < 1:
        raise SubmitError(f"--parallelism {parallelism} must be at least 1")
    params_yaml, overrides, p = _common(params_path, sets, method, model)
    placement = make_placement(accelerator_type, gpu_count, gpu_node_selector, gpu_tolerations, model_cache_pvc,
                               mlflow_secret, s3_secret, priors_cache_dir)
    return {"subjects": _subjects(subjects_file, subjects_root), "methods": [p.finetune.method], "model": model or "",
            "overrides": overrides, "params_yaml": params_yaml, "fail_on_refused": fail_on_refused,
            "dvc_repo": dvc_repo, "dvc_rev": dvc_rev, **placement.arguments()}


SubjectsFileOpt = typer.Option(None, "--subjects", help='JSON list of {"uri", "class_word"} (default: DreamBench)')
SubjectsRootOpt = typer.Option("s3://subjectops-data/dreambench", "--subjects-root",
                               help="where the DreamBench subjects are")
ParallelismOpt = typer.Option(4, "--parallelism", help="subjects trained at once")
FailRefusedOpt = typer.Option(False, "--fail-on-refused", help="also fail when the numbers cannot be compared")


@benchmark_app.command("submit")
@user_errors
def benchmark_submit(
    host: str = HostOpt, method: Optional[str] = MethodOpt, model: Optional[str] = ModelOpt,
    params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt,
    subjects_file: Optional[Path] = SubjectsFileOpt, subjects_root: str = SubjectsRootOpt,
    parallelism: int = ParallelismOpt, fail_on_refused: bool = FailRefusedOpt,
    run_name: Optional[str] = typer.Option(None, "--run-name", help="default: benchmark-<method>"),
    experiment: str = typer.Option(BENCHMARK_EXPERIMENT, "--experiment"),
    namespace: Optional[str] = NamespaceOpt, token: Optional[str] = TokenOpt, service_account: Optional[str] = SAOpt,
    dvc_repo: str = DvcRepoOpt, dvc_rev: str = DvcRevOpt,
    accelerator_type: str = AccelOpt, gpu_count: int = GpuCountOpt, gpu_node_selector: str = NodeSelOpt,
    gpu_tolerations: str = TolOpt, model_cache_pvc: str = PvcOpt, mlflow_secret: str = MlflowSecretOpt,
    s3_secret: str = S3SecretOpt, priors_cache_dir: str = PriorsCacheOpt,
    cpu_image: Optional[str] = CpuImageOpt, trainer_image: Optional[str] = TrainerImageOpt,
    caching: Optional[bool] = CachingOpt, pipeline_root: Optional[str] = RootOpt,
    dry_run: bool = DryRunOpt, output: Optional[Path] = OutputOpt,
):
    """Submit one `benchmark` run now (the Helm chart's CronJob calls this)."""
    arguments = _benchmark_arguments(subjects_file, subjects_root, method, model, params_path, sets, fail_on_refused,
                                     dvc_repo, dvc_rev, accelerator_type, gpu_count, gpu_node_selector,
                                     gpu_tolerations,
                                     model_cache_pvc, mlflow_secret, s3_secret, priors_cache_dir, parallelism)
    result = submit_run(pipeline="benchmark", host=host, arguments=arguments,
                        run_name=run_name or f"benchmark-{arguments['methods'][0]}",
                        experiment=experiment, namespace=namespace, token=token, service_account=service_account,
                        enable_caching=caching, pipeline_root=pipeline_root, cpu_image=cpu_image,
                        trainer_image=trainer_image, parallelism=parallelism, dry_run=dry_run, output=output)
    if not dry_run:
        _echo(f"submitted benchmark run {result['run_id']}: {result['url']}")


@benchmark_app.command("schedule")
@user_errors
def benchmark_schedule(
    cron: str = typer.Option(..., "--cron", help="KFP cron, six fields (seconds first), e.g. '0 0 3 * * *'"),
    host: str = HostOpt, method: Optional[str] = MethodOpt, model: Optional[str] = ModelOpt,
    params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt,
    subjects_file: Optional[Path] = SubjectsFileOpt, subjects_root: str = SubjectsRootOpt,
    parallelism: int = ParallelismOpt, fail_on_refused: bool = FailRefusedOpt,
    name: Optional[str] = typer.Option(None, "--name",
                                       help="recurring run name (default: benchmark-<method>-nightly)"),
    experiment: str = typer.Option(BENCHMARK_EXPERIMENT, "--experiment"),
    namespace: Optional[str] = NamespaceOpt, token: Optional[str] = TokenOpt, service_account: Optional[str] = SAOpt,
    dvc_repo: str = DvcRepoOpt, dvc_rev: str = DvcRevOpt,
    accelerator_type: str = AccelOpt, gpu_count: int = GpuCountOpt, gpu_node_selector: str = NodeSelOpt,
    gpu_tolerations: str = TolOpt, model_cache_pvc: str = PvcOpt, mlflow_secret: str = MlflowSecretOpt,
    s3_secret: str = S3SecretOpt, priors_cache_dir: str = PriorsCacheOpt,
    cpu_image: Optional[str] = CpuImageOpt, trainer_image: Optional[str] = TrainerImageOpt,
    caching: Optional[bool] = CachingOpt, pipeline_root: Optional[str] = RootOpt,
    dry_run: bool = DryRunOpt, output: Optional[Path] = OutputOpt,
):
    """Create a KFP recurring run of the benchmark: one run at a time (max_concurrency=1), no catch-up."""
    validate_cron(cron)
    arguments = _benchmark_arguments(subjects_file, subjects_root, method, model, params_path, sets, fail_on_refused,
                                     dvc_repo, dvc_rev, accelerator_type, gpu_count, gpu_node_selector,
                                     gpu_tolerations,
                                     model_cache_pvc, mlflow_secret, s3_secret, priors_cache_dir, parallelism)
    result = schedule_run(pipeline="benchmark", host=host, arguments=arguments,
                          name=name or f"benchmark-{arguments['methods'][0]}-nightly",
                          cron=cron, experiment=experiment, namespace=namespace, token=token,
                          service_account=service_account, enable_caching=caching, pipeline_root=pipeline_root,
                          cpu_image=cpu_image, trainer_image=trainer_image, parallelism=parallelism,
                          dry_run=dry_run, output=output)
    if not dry_run:
        _echo(f"created recurring run {result['recurring_run_id']} ({cron})")


@benchmark_app.command("aggregate")
@user_errors
def benchmark_aggregate(
    registrations: List[str] = typer.Argument(..., help="registered versions as MODEL_NAME/VERSION"),
    params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow (default: $MLFLOW_TRACKING_URI)"),
    fail_on_refused: bool = FailRefusedOpt,
    output: Optional[Path] = typer.Option(None, "--output", help="write the aggregate and the decision as JSON"),
):
    """Aggregate registered versions' evaluations and gate them against their champions (the pipeline's last step)."""
    from subjectops.config import load_params
    from subjectops.kfp_pod import benchmark_aggregate as aggregate
    from subjectops.kfp_pod import check_benchmark, parse_registration, registry_summaries

    p = load_params(params_path, list(sets or []))
    rows = registry_summaries([parse_registration(r) for r in registrations], tracking_uri=tracking_uri)
    result, decision = aggregate(rows, p.registry)
    text = json.dumps(result, indent=2, default=str)
    if output:
        output.write_text(text + "\n")
    else:
        print(text)
    _echo(decision.summary())
    check_benchmark(decision, fail_on_refused=fail_on_refused)
