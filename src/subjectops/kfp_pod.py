"""What runs inside the Kubeflow pods around the stage functions, and nothing the stages already do (what
submits runs from a laptop is `subjectops.kfp_submit`).

The components in `components/` are lightweight KFP components: their bodies import a stage function
from `subjectops.stages` and call it, exactly as the CLI does. The glue they share lives here, in the
installed package, so that the bodies stay a few lines long:

- `resolve_params`: params.yaml text + `--set` overrides -> validated `Params`, written once by the
  `configure` step and read by every later step (a bad value fails before any GPU is requested);
- `assemble_run_dir`: the steps' artifact directories -> a `RUN/<stage>/` tree for `tracking.sync`;
- `run_step`, `register_step`: the bodies of the stages' components (components/);
- `launch_argv`: the `accelerate launch` command of a multi-GPU stage;
- `run_checkpoint_dir`: where finetune keeps its checkpoints so that a retried pod finds them;

The subject sources (`fetch_subject`) are `subjectops.data.sources`; the benchmark's aggregate and gate are
`subjectops.benchmark`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from subjectops.config import ConfigError, Params, load_params, validate_params
from subjectops.digest import digest_json
from subjectops.errors import SubjectopsError
from subjectops.params_yaml import parse_yaml

PARAMS_FILE = "params.yaml"
MODEL_CACHE_MOUNT = "/models"  # where the GPU steps mount the model-cache volume (pipelines/placement.py)


# --------------------------------------------------------------------------------------------- params
def resolve_params(
    params_yaml: str = "",
    overrides: Sequence[str] = (),
    *,
    method: str = "",
    model: str = "",
    priors_cache_dir: str = "",
) -> Params:
    """The validated config of one pipeline run: the pipeline's parameters through `config.load_params`.

    `params_yaml` is the text of a params.yaml (empty: the built-in defaults), `overrides` are
    `key.path=value` strings; `method` and `model` win over them, like `--method` and `--model` on the CLI, and
    `priors_cache_dir` (the model-cache volume's) is a default they may change. Empty: unchanged.
    """
    defaults = [f"priors.cache_dir={json.dumps(priors_cache_dir)}"] if priors_cache_dir else []
    return load_params(text=params_yaml, overrides=overrides, method=method, model=model, defaults=defaults)


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
    from subjectops import threads
    from subjectops.console import timed
    from subjectops.stages.base import StageContext
    from subjectops.stages.common import not_needed
    from subjectops.stages.plan import plan
    from subjectops.stages.registry import get_stage
    from subjectops.stopping import sigterm_requests_stop

    threads.configure()  # the pod's CPU limit, not the node's cores (before the stage imports torch)
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
        with sigterm_requests_stop(), timed(f"stage {stage.command}"):  # preempted: exit 75; the log says how long
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


def load_registration(register_dir: Path) -> dict:
    path = Path(register_dir) / "registration.json"
    if not path.is_file():
        raise SubjectopsError(f"{register_dir} holds no registration.json", fix="wire the register step's output here")
    return json.loads(path.read_text())


