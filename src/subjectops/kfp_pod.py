"""What runs inside the Kubeflow pods around the stage functions, and nothing the stages already do (what
submits runs from a laptop is `subjectops.kfp_submit`).

The components in `components/` are lightweight KFP components: their bodies import a stage function
from `subjectops.stages` and call it, exactly as the CLI does. The glue they share lives here, in the
installed package, so that the bodies stay a few lines long:

- `resolve_params`: params.yaml text + `--set` overrides -> validated `Params`, written once by the
  `configure` step and read by every later step (a bad value fails before any GPU is requested);
- `fetch_subject`: an S3 prefix, a DVC path or a local directory -> a directory of the subject's photos;
- `assemble_run_dir`: the steps' artifact directories -> a `RUN/<stage>/` tree for `tracking.sync`;
- `run_step`, `register_step`: the bodies of the stages' components (components/);
- `launch_argv`: the `accelerate launch` command of a multi-GPU stage;
- `run_checkpoint_dir`: where finetune keeps its checkpoints so that a retried pod finds them;
- `aggregate_summaries` / `benchmark_decision`: the benchmark's aggregate and its gate against the champion.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from subjectops.config import ConfigError, Params, apply_overrides, parse_yaml, validate_params
from subjectops.data import objectstore
from subjectops.data.objectstore import S3Location, check_uri_segments
from subjectops.data.subject import subject_files
from subjectops.digest import digest_json
from subjectops.errors import SubjectError, SubjectopsError

PARAMS_FILE = "params.yaml"
MODEL_CACHE_MOUNT = "/models"  # where the GPU steps mount the model-cache volume (pipelines/placement.py)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------- params
def resolve_params(
    params_yaml: str = "",
    overrides: Sequence[str] = (),
    *,
    method: str = "",
    model: str = "",
    priors_cache_dir: str = "",
) -> Params:
    """The validated config of one pipeline run.

    `params_yaml` is the text of a params.yaml (empty: the built-in defaults), `overrides` are
    `key.path=value` strings; `method`, `model` and `priors_cache_dir` are shortcuts applied before the
    overrides (empty: unchanged), like `--method` and `--model` on the CLI.
    """
    data: Any = {}
    if params_yaml.strip():
        data = parse_yaml(params_yaml, "the params_yaml pipeline parameter") or {}
        if not isinstance(data, dict):
            raise ConfigError("the params_yaml pipeline parameter must hold a mapping of sections, found "
                              f"{type(data).__name__}")
    # Like the CLI: --method and --model win over --set; the priors cache is a default that --set may change.
    shortcuts_before = [f"priors.cache_dir={json.dumps(priors_cache_dir)}"] if priors_cache_dir else []
    shortcuts_after = []
    if method:
        shortcuts_after.append(f"finetune.method={json.dumps(method)}")
    if model:
        shortcuts_after.append(f"model.base={json.dumps(model)}")
    data = apply_overrides(data, [*shortcuts_before, *overrides, *shortcuts_after])
    return validate_params(data, source="pipeline parameters (params_yaml, method, model, overrides)")


def kfp_plan(params: Params):
    """`plan(params)` for the personalize pipeline, whose every branch ends in `register` (its output is the
    registered version, which the benchmark aggregates): a plan without registration is refused here."""
    from subjectops.stages.plan import plan

    planned = plan(params)
    if not planned.has("register"):
        raise ConfigError(f"the Kubeflow pipeline registers every model, but {planned.why_not('register')}",
                          fix="drop registry.auto_register=false from the pipeline's overrides, or run "
                              "`subjectops run --no-track` locally")
    return planned


def write_params(params: Params, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PARAMS_FILE
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def read_params(params_dir: Path) -> Params:
    path = Path(params_dir) / PARAMS_FILE
    if not path.is_file():
        raise ConfigError(f"{params_dir} holds no {PARAMS_FILE}",
                          fix="wire the `configure` step's `params` output to this step")
    return validate_params(parse_yaml(path.read_text(), str(path)) or {}, source=str(path))


# -------------------------------------------------------------------------------------------- subject
def subject_name_from_uri(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if ":" in name and uri.startswith("dvc://"):
        name = name.split(":")[-1]
    return name.split("@", 1)[0]


def parse_subject_uri(uri: str) -> dict:
    """`s3://bucket/prefix`, `dvc://path/in/repo[@rev]` or a local directory (`file://` optional)."""
    uri = (uri or "").strip()
    if not uri:
        raise SubjectError("no subject given",
                           fix="pass the subject's S3 URI (s3://bucket/prefix), DVC path (dvc://path) or directory")
    if uri.startswith("s3://"):
        where = S3Location.parse(uri)
        return {"kind": "s3", "bucket": where.bucket, "prefix": where.prefix,
                "name": subject_name_from_uri(where.prefix or where.bucket)}
    if uri.startswith("dvc://"):
        path = uri[len("dvc://"):]
        rev = None
        if "@" in path:
            path, rev = path.rsplit("@", 1)
        path = path.strip("/")
        if not path:
            raise SubjectError(f"subject URI {uri!r} names no path",
                               fix="write dvc://path/in/repo[@rev], e.g. dvc://data/subjects/teapot")
        check_uri_segments(uri, path, "dvc://path/in/repo[@rev]")
        return {"kind": "dvc", "path": path, "rev": rev, "name": subject_name_from_uri(path)}
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise SubjectError(f"subject URI scheme {scheme!r} is not supported",
                           fix="use s3://bucket/prefix, dvc://path/in/repo[@rev] or a directory path")
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    return {"kind": "local", "path": str(path), "name": subject_name_from_uri(str(path))}


def fetch_subject(uri: str, dest: Path, *, dvc_repo: str = "", dvc_rev: str = "") -> Path:
    """Materialize the subject's photos into `dest/<name>/`; returns that directory.

    The directory's name is the subject's name (refine names the subject after its folder).
    """
    spec = parse_subject_uri(uri)
    target = Path(dest) / spec["name"]
    if spec["kind"] == "s3":
        # Checked against the manifest `subjectops data push` wrote; the folder appears only when complete.
        objectstore.pull(uri, target, force=True)
    elif spec["kind"] == "local":
        src = Path(spec["path"])
        if not src.is_dir():
            raise SubjectError(f"subject directory {src} does not exist",
                               fix="pass an existing directory of photos, an s3:// URI or a dvc:// path")
        files = subject_files(src)  # refine's rule: a link out of the folder is refused, not copied
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, target / f.name)
    else:
        if not dvc_repo:
            raise SubjectError(f"subject {uri} is a DVC path but no DVC repository was given",
                               fix="set the dvc_repo pipeline parameter (--dvc-repo) to the git URL of the repository")
        cmd = [sys.executable, "-m", "dvc", "get", dvc_repo, spec["path"], "-o", str(target), "--force"]
        rev = spec["rev"] or dvc_rev
        if rev:
            cmd += ["--rev", rev]
        target.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SubjectError(f"`dvc get {dvc_repo} {spec['path']}` failed: "
                               f"{proc.stderr.strip() or proc.stdout.strip()}",
                               fix="check the path, the revision and the DVC remote's credentials (the object-store "
                                   "Secret)")
    images = [f for f in target.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise SubjectError(f"{uri} holds no photos ({', '.join(IMAGE_SUFFIXES)})",
                           fix="point the subject at a folder of 3-20 photos")
    return target


def single_subdir(root: Path) -> Path:
    subdirs = [d for d in Path(root).iterdir() if d.is_dir()]
    if len(subdirs) != 1:
        raise SubjectopsError(f"{root} should hold exactly one subject folder, found {len(subdirs)}",
                              fix="wire the fetch-subject step's output to refine")
    return subdirs[0]


# ------------------------------------------------------------------------------------------- run dirs
def _link_or_copy(src: str, dst: str) -> None:
    real = os.path.realpath(src)  # a symlink's target, never the symlink itself
    try:
        os.link(real, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(real, dst)


def assemble_run_dir(root: Path, stages: Mapping[str, Optional[Path]]) -> Path:
    """A `RUN/` directory whose `<stage>` folders hold the steps' artifact directories.

    Files are hard-linked where the filesystem allows (no copy of model weights), else copied. Not
    symlinked: MLflow refuses to log a model whose artifact folder resolves outside its directory, and
    symlinks inside a stage's output (priors cached elsewhere) are followed into real files.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, path in stages.items():
        if path is None:
            continue
        target = root / name
        if target.exists():
            continue
        shutil.copytree(Path(path), target, symlinks=False, copy_function=_link_or_copy)
    return root


# ------------------------------------------------------------------------------------------- finetune
def run_checkpoint_dir(run_id: str, params: Params, refine_dir: Path,
                       cache_mount: Path = Path(MODEL_CACHE_MOUNT)) -> Optional[Path]:
    """finetune's checkpoint folder on the model-cache volume, keyed by the pipeline run and what trains
    (the subject's refined content and the params: a benchmark trains many subjects in one run), so a pod
    retried after a preemption finds the checkpoints its predecessor wrote. None when the volume is not
    mounted (kfp.local): the checkpoints then stay in the task's output folder, which a local retry reuses."""
    from subjectops.stages.common import hash_dir

    if not Path(cache_mount).is_mount():
        return None
    key = digest_json({"refine": hash_dir(refine_dir), "params": params.digest()})
    return Path(cache_mount) / "cache" / "checkpoints" / run_id / key


def launch_argv(stage: str, gpu_count: int, params_file: Path, inputs: Mapping[str, Optional[Path]], out: Path,
                checkpoint_dir: Optional[Path] = None) -> list[str]:
    """`accelerate launch` over `gpu_count` GPUs of the stage's CLI command (the same stage), with its input folders
    by the options the registry gives them."""
    from subjectops.stages.registry import get_stage

    if gpu_count < 2:
        raise ValueError("launch_argv is for two or more GPUs; one GPU runs the stage in-process")
    beside = Path(sys.executable).with_name("subjectops")
    exe = str(beside) if beside.is_file() else shutil.which("subjectops")
    if exe is None:
        raise SubjectopsError("the `subjectops` command is not on PATH",
                              fix="install the package in the image (pip install .)")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(int(gpu_count)),
            "--num_machines", "1", exe, get_stage(stage).command, "--params", str(params_file)]
    for name, path in inputs.items():
        if path is not None:
            argv += [f"--{get_stage(name).option}", str(path)]
    argv += ["--out", str(out)]
    if checkpoint_dir is not None:
        argv += ["--checkpoints", str(checkpoint_dir)]
    return argv


# ----------------------------------------------------------------------------------------------- steps
def run_step(name: str, params, inputs: Mapping[str, Any], out, args: Mapping[str, Any], *, metrics=None, report=None,
             gpu_count: int = 1, accelerator_type: str = "", run_id: str = "") -> None:
    """The body of a stage's component: the stage on the step's artifacts. A folder argument arrives as the
    artifact holding it (fetch-subject's); a step every branch runs records why when the plan leaves it out; a
    multi-GPU stage launches its CLI command over the pod's GPUs, its checkpoints on the model-cache volume."""
    from subjectops.stages.base import StageContext
    from subjectops.stages.common import not_needed
    from subjectops.stages.plan import plan
    from subjectops.stages.registry import get_stage

    stage, p, out_dir = get_stage(name), read_params(Path(params.path)), Path(out.path)
    dirs = {k: Path(v.path) if v is not None else None for k, v in inputs.items()}
    args = {k: single_subdir(Path(v.path)) if hasattr(v, "path") else v for k, v in args.items()}
    planned = plan(p)
    if not planned.has(name):
        not_needed(name, p, out_dir, planned.why_not(name))
        return
    if stage.multi_gpu:
        # keyed by the run and what trains: the first input (the refined subject) and the params
        args["checkpoint_dir"] = run_checkpoint_dir(run_id, p, dirs[stage.reads[0]])
        out.metadata.update({"method": p.finetune.method, "base_model": p.model.base, "gpu_count": gpu_count,
                             "accelerator_type": accelerator_type})
    if stage.multi_gpu and gpu_count > 1:
        argv = launch_argv(name, gpu_count, Path(params.path) / PARAMS_FILE, dirs, out_dir, args["checkpoint_dir"])
        print("running:", " ".join(argv), flush=True)
        subprocess.run(argv, check=True)
    else:
        stage.run(StageContext(p, dirs, out_dir, args=args))
    if metrics is not None:
        for key, value in stage.metrics(out_dir).items():
            metrics.log_metric(key, value)
    if report is not None:
        shutil.copyfile(out_dir / stage.report, report.path)


def register_step(params, inputs: Mapping[str, Any], run_name: str, out) -> str:
    """The body of the tracked stage's component: record the run in MLflow (parent run, one run per stage) and
    register the model (alias challenger), as `subjectops sync RUN_DIR` does after a local run: the step's inputs
    are linked into a run directory named `run_name` (the KFP run's name) and synced. Returns `name/version`."""
    import tempfile

    from subjectops.stages.catalog import stage_catalog
    from subjectops.tracking.sync import sync

    tmp = Path(tempfile.mkdtemp(prefix="subjectops-run-"))
    run_dir = tmp / (run_name or "kfp-run")
    try:
        assemble_run_dir(run_dir, {k: Path(v.path) if v is not None else None for k, v in inputs.items()})
        summary = sync(run_dir, stage_catalog(), echo=print)
        print(json.dumps(summary, indent=2, default=str))
        if not (run_dir / "register").is_dir():
            raise RuntimeError(f"MLflow sync recorded the run but registered no model: {summary}")
        shutil.copytree(run_dir / "register", out.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = load_registration(Path(out.path))
    out.metadata.update({"model_name": info.get("model_name"), "version": str(info.get("version"))})
    return f"{info.get('model_name')}/{info.get('version')}"


# ------------------------------------------------------------------------------------------ benchmark
def aggregate_summaries(summaries: Sequence[Mapping]) -> dict:
    """The benchmark's aggregate: per (metric, prompt set, backbone), the mean over subjects.

    Each summary is what the register stage stores (`{"records", "seeds", "prompt_sets"}`). `n_pairs` adds
    up, `pretrained` holds only if it holds for every subject, prompt set versions must agree, and seeds are
    combined into one digest per prompt set.
    """
    from subjectops.tracking.gates import normalize_records

    groups: dict[tuple, list[dict]] = {}
    seeds: dict[str, list] = {}
    versions: dict[str, set] = {}
    for s in summaries:
        for r in normalize_records(s["records"]):
            groups.setdefault((r["metric"], r["prompt_set"], str(r["backbone"])), []).append(r)
        for ps, v in (s.get("seeds") or {}).items():
            seeds.setdefault(ps, []).append(v)
        for ps, v in (s.get("prompt_sets") or {}).items():
            versions.setdefault(ps, set()).add(json.dumps(v, sort_keys=True))
    records = []
    for (metric, ps, bb), rows in sorted(groups.items()):
        means = [float(r["mean"]) for r in rows]
        n_pairs = [r.get("n_pairs") for r in rows]
        records.append({
            "metric": metric, "prompt_set": ps, "backbone": bb,
            "pretrained": all(r.get("pretrained") is True for r in rows),
            "n_subjects": len(rows),
            "n_pairs": sum(n_pairs) if all(isinstance(n, int) for n in n_pairs) else None,
            "mean": sum(means) / len(means) if all(math.isfinite(m) for m in means) else float("nan"),
            "min": min(means), "max": max(means),
        })
    return {
        "records": records,
        "seeds": {ps: digest_json(sorted(v, key=lambda x: json.dumps(x, sort_keys=True))) for ps, v in seeds.items()},
        "prompt_sets": {ps: (json.loads(next(iter(v))) if len(v) == 1 else "mixed:" + ",".join(sorted(v)))
                        for ps, v in versions.items()},
        "n_subjects": len(summaries),
    }


class BenchmarkRegression(SubjectopsError):
    """The benchmark's aggregate is worse than the champions' on a promotion gate."""


def check_benchmark(decision, *, fail_on_refused: bool = False) -> None:
    """Raise `BenchmarkRegression`, with every compared number in the message, when a gate regressed
    (and, with `fail_on_refused`, when the numbers could not be compared)."""
    if decision.status == "passed" or (decision.status == "refused" and not fail_on_refused):
        return
    what = "regressed against the champion" if decision.status == "failed" else "cannot be compared with the champion"
    lines = [f"  {g.metric} on {g.prompt_set} ({g.backbone}): {'ok' if g.passed else 'REGRESSED'}: {g.reason}"
             for g in decision.gates]
    reasons = [f"  {r}" for r in decision.reasons]
    raise BenchmarkRegression(
        "\n".join([f"benchmark {what}: {decision.status}", *reasons, *(["gates:", *lines] if lines else [])]),
        fix="inspect the per-subject reports in MLflow; promote nothing from this run",
    )


def registry_summaries(registrations: Sequence[Mapping], tracking_uri: Optional[str] = None) -> list[dict]:
    """For each registered version of a benchmark: its evaluation summary and its model's champion's.

    Reads the summaries the register stage stored with each version (`tracking.registry.version_summary`);
    `champion` is None where the model has no `champion` alias yet.
    """
    from mlflow.tracking import MlflowClient

    from subjectops.tracking.client import resolve_tracking_uri, setup_environment
    from subjectops.tracking.registry import CHAMPION, version_summary

    setup_environment()
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    out = []
    for reg in registrations:
        name, version = reg["model_name"], str(reg["version"])
        try:
            champion_version: Optional[str] = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except Exception as exc:  # noqa: BLE001 - MLflow raises one exception type for every error
            if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE",
                                                        "NOT_FOUND"):
                raise
            champion_version = None
        out.append({
            "model_name": name, "version": version, "champion_version": champion_version,
            "challenger": version_summary(client, name, version),
            "champion": version_summary(client, name, champion_version)
            if champion_version and champion_version != version else None,
        })
    return out


def benchmark_aggregate(rows: Sequence[Mapping], registry_cfg) -> tuple[dict, Any]:
    """Aggregate a benchmark's subjects and judge the aggregate against their champions' aggregate.

    The comparison is paired: both aggregates are taken over the subjects that have a champion (all
    subjects when none has one; then only the gates' absolute floors apply). Returns the result to
    record and the `GateDecision`; `check_benchmark` turns a regression into an error.
    """
    from subjectops.tracking.gates import evaluate_gates

    paired = [r for r in rows if r.get("champion") is not None]
    challenger = aggregate_summaries([r["challenger"] for r in (paired or rows)])
    champion = aggregate_summaries([r["champion"] for r in paired]) if paired else None
    decision = evaluate_gates(challenger, champion, registry_cfg)
    result = {
        "subjects": [f"{r['model_name']}/{r['version']}" for r in rows],
        "compared_with_champions": [f"{r['model_name']}/{r['champion_version']}" for r in paired],
        "challenger": challenger,
        "champion": champion,
        "decision": decision.to_dict(),
    }
    return result, decision


def load_registration(register_dir: Path) -> dict:
    path = Path(register_dir) / "registration.json"
    if not path.is_file():
        raise SubjectopsError(f"{register_dir} holds no registration.json", fix="wire the register step's output here")
    return json.loads(path.read_text())


def parse_registration(text: str) -> dict:
    """`name/version` (the register step's output) -> `{"model_name", "version"}`."""
    name, sep, version = str(text).rpartition("/")
    if not sep or not name or not version:
        raise SubjectopsError(f"registration {text!r} is not of the form MODEL_NAME/VERSION",
                              fix="wire the personalize pipeline's output (the register step's) to the aggregation")
    return {"model_name": name, "version": version}
