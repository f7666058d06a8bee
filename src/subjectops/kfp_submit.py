"""Kubeflow submission from a laptop or CI: `subjectops submit` and `subjectops benchmark submit|schedule|aggregate`
(what runs inside the pods is `subjectops.kfp_pod`; the KFP API side, dry run included, is
`subjectops.kfp_client`).

The three submitting commands share one options object (`SubmitOptions`: the KFP API, the run's settings, the
GPU placement, the params and the DVC source), declared once and added to each command's own parameters.
Everything that can be checked here is checked before anything is sent: the subject URI, the method and
every params.yaml value (validated exactly as the pipeline's `configure` step will), the cron expression
(KFP's has six fields, seconds first) and the placement options.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from subjectops.cli_common import MethodOpt, ParamsOpt, SetOpt, user_errors
from subjectops.kfp_client import Recorder, Submission, pipelines_module, schedule_run, submit_run  # noqa: F401
from subjectops.kfp_cron import SubmitError, validate_cron  # noqa: F401  (validate_cron: part of this API)

DEFAULT_EXPERIMENT = "subjectops"
BENCHMARK_EXPERIMENT = "subjectops-benchmark"


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
    from subjectops.config import load_params

    return load_params(text=params_yaml, overrides=overrides, method=method, model=model)


def check_subject(uri: str) -> dict:
    from subjectops.data.sources import parse_subject_uri

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


# ----------------------------------------------------------------------------- shared options
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


@dataclass(frozen=True)
class SubmitOptions:
    """What `submit`, `benchmark submit` and `benchmark schedule` share: declared once (`with_submit_options`)."""

    host: str
    method: Optional[str]
    model: Optional[str]
    params_path: Path
    sets: Optional[List[str]]
    namespace: Optional[str]
    token: Optional[str]
    service_account: Optional[str]
    dvc_repo: str
    dvc_rev: str
    accelerator_type: str
    gpu_count: int
    gpu_node_selector: str
    gpu_tolerations: str
    model_cache_pvc: str
    mlflow_secret: str
    s3_secret: str
    priors_cache_dir: str
    cpu_image: Optional[str]
    trainer_image: Optional[str]
    caching: Optional[bool]
    pipeline_root: Optional[str]
    dry_run: bool
    output: Optional[Path]

    def submission(self) -> Submission:
        return Submission(**{f.name: getattr(self, f.name) for f in fields(Submission)})

    def placement(self) -> Placement:
        return make_placement(self.accelerator_type, self.gpu_count, self.gpu_node_selector, self.gpu_tolerations,
                              self.model_cache_pvc, self.mlflow_secret, self.s3_secret, self.priors_cache_dir)

    def params(self):
        """(params.yaml text, overrides, validated params), checked as the `configure` step will."""
        params_yaml = read_params_text(self.params_path)
        overrides = list(self.sets or [])
        return params_yaml, overrides, check_params(params_yaml, overrides, self.method or "", self.model or "")


# The typer declaration of each SubmitOptions field (the field's annotation is its type).
_OPTIONS = {"host": HostOpt, "method": MethodOpt, "model": ModelOpt, "params_path": ParamsOpt, "sets": SetOpt,
            "namespace": NamespaceOpt, "token": TokenOpt, "service_account": SAOpt, "dvc_repo": DvcRepoOpt,
            "dvc_rev": DvcRevOpt, "accelerator_type": AccelOpt, "gpu_count": GpuCountOpt,
            "gpu_node_selector": NodeSelOpt, "gpu_tolerations": TolOpt, "model_cache_pvc": PvcOpt,
            "mlflow_secret": MlflowSecretOpt, "s3_secret": S3SecretOpt, "priors_cache_dir": PriorsCacheOpt,
            "cpu_image": CpuImageOpt, "trainer_image": TrainerImageOpt, "caching": CachingOpt,
            "pipeline_root": RootOpt, "dry_run": DryRunOpt, "output": OutputOpt}


def with_submit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command(opts: SubmitOptions, **own)` as a typer command: its own parameters, then every shared option."""
    own = [p for name, p in inspect.signature(command).parameters.items() if name != "opts"]
    hints = {name: hint for name, hint in command.__annotations__.items() if name != "opts"}
    types = {f.name: f.type for f in fields(SubmitOptions)}
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=types[name])
              for name, option in _OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        opts = SubmitOptions(**{name: kwargs.pop(name) for name in _OPTIONS})
        return command(opts, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + shared)
    wrapper.__annotations__ = {**hints, **types}
    del wrapper.__wrapped__  # typer reads the signature above, not the command's
    return wrapper



def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


# ------------------------------------------------------------------------------------------ CLI
@user_errors
@with_submit_options
def submit(
    opts: SubmitOptions,
    subject: str = typer.Argument(..., help="s3://bucket/prefix of the photos, or dvc://path[@rev] with --dvc-repo"),
    class_word: str = typer.Option(..., "--class", help="the subject's class, e.g. teapot"),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="default: personalize-<subject>-<method>"),
    experiment: str = typer.Option(DEFAULT_EXPERIMENT, "--experiment", help="KFP experiment the run is filed under"),
):
    """Submit a `personalize` run of one subject to Kubeflow Pipelines."""
    spec = check_subject(subject)
    if not class_word.strip():
        raise SubmitError("the class word is empty",
                          fix="pass --class with the subject's category, e.g. --class teapot")
    if spec["kind"] == "dvc" and not opts.dvc_repo:
        raise SubmitError(f"subject {subject} is a DVC path but --dvc-repo is not given",
                          fix="pass --dvc-repo GIT_URL")
    params_yaml, overrides, p = opts.params()
    arguments = {"subject_uri": subject, "class_word": class_word.strip(), "method": p.finetune.method,
                 "model": opts.model or "", "overrides": overrides, "params_yaml": params_yaml,
                 "dvc_repo": opts.dvc_repo, "dvc_rev": opts.dvc_rev, **opts.placement().arguments()}
    name = run_name or f"personalize-{spec['name']}-{p.finetune.method}"
    result = submit_run(opts.submission(), pipeline="personalize", arguments=arguments, run_name=name,
                        experiment=experiment)
    if not opts.dry_run:
        _echo(f"submitted run {result['run_id']}: {result['url']}")


benchmark_app = typer.Typer(no_args_is_help=True,
                            help="The benchmark: run it here (`run`), or on Kubeflow (submit, schedule, aggregate).")


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


def _benchmark_arguments(opts: SubmitOptions, subjects_file: Optional[Path], subjects_root: str,
                         fail_on_refused: bool, parallelism: int) -> dict:
    if parallelism < 1:
        raise SubmitError(f"--parallelism {parallelism} must be at least 1")
    params_yaml, overrides, p = opts.params()
    placement = opts.placement()
    return {"subjects": _subjects(subjects_file, subjects_root), "methods": [p.finetune.method],
            "model": opts.model or "", "overrides": overrides, "params_yaml": params_yaml,
            "fail_on_refused": fail_on_refused, "dvc_repo": opts.dvc_repo, "dvc_rev": opts.dvc_rev,
            **placement.arguments()}


SubjectsFileOpt = typer.Option(None, "--subjects", help='JSON list of {"uri", "class_word"} (default: DreamBench)')
SubjectsRootOpt = typer.Option("s3://subjectops-data/dreambench", "--subjects-root",
                               help="where the DreamBench subjects are")
ParallelismOpt = typer.Option(4, "--parallelism", help="subjects trained at once")
FailRefusedOpt = typer.Option(False, "--fail-on-refused", help="also fail when the numbers cannot be compared")


@benchmark_app.command("submit")
@user_errors
@with_submit_options
def benchmark_submit(
    opts: SubmitOptions,
    subjects_file: Optional[Path] = SubjectsFileOpt, subjects_root: str = SubjectsRootOpt,
    parallelism: int = ParallelismOpt, fail_on_refused: bool = FailRefusedOpt,
    run_name: Optional[str] = typer.Option(None, "--run-name", help="default: benchmark-<method>"),
    experiment: str = typer.Option(BENCHMARK_EXPERIMENT, "--experiment",
                                   help="KFP experiment the benchmark runs are filed under"),
):
    """Submit one `benchmark` run now (the Helm chart's CronJob calls this)."""
    arguments = _benchmark_arguments(opts, subjects_file, subjects_root, fail_on_refused, parallelism)
    result = submit_run(opts.submission(), pipeline="benchmark", arguments=arguments,
                        run_name=run_name or f"benchmark-{arguments['methods'][0]}", experiment=experiment,
                        parallelism=parallelism)
    if not opts.dry_run:
        _echo(f"submitted benchmark run {result['run_id']}: {result['url']}")


@benchmark_app.command("schedule")
@user_errors
@with_submit_options
def benchmark_schedule(
    opts: SubmitOptions,
    cron: str = typer.Option(..., "--cron", help="KFP cron, six fields (seconds first), e.g. '0 0 3 * * *'"),
    subjects_file: Optional[Path] = SubjectsFileOpt, subjects_root: str = SubjectsRootOpt,
    parallelism: int = ParallelismOpt, fail_on_refused: bool = FailRefusedOpt,
    name: Optional[str] = typer.Option(None, "--name",
                                       help="recurring run name (default: benchmark-<method>-nightly)"),
    experiment: str = typer.Option(BENCHMARK_EXPERIMENT, "--experiment",
                                   help="KFP experiment the benchmark runs are filed under"),
):
    """Create a KFP recurring run of the benchmark: one run at a time (max_concurrency=1), no catch-up."""
    validate_cron(cron)
    arguments = _benchmark_arguments(opts, subjects_file, subjects_root, fail_on_refused, parallelism)
    result = schedule_run(opts.submission(), pipeline="benchmark", arguments=arguments,
                          name=name or f"benchmark-{arguments['methods'][0]}-nightly", cron=cron,
                          experiment=experiment, parallelism=parallelism)
    if not opts.dry_run:
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
    from subjectops.benchmark.aggregate import benchmark_aggregate as aggregate
    from subjectops.benchmark.aggregate import check_benchmark, parse_registration, registry_summaries
    from subjectops.config import load_params

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
