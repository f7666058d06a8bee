"""One Kubeflow component per stage, each calling the same stage function as the CLI.

They are lightweight Python components (`@dsl.component`) whose base image is one of the project's
images (images/), where the package is installed: the body imports the stage function from
`subjectops.stages` and calls it on the input artifact directories, writing the stage's output
directory straight into the output artifact. The same components therefore run

- on a cluster, inside the images (no `pip install` at run time: `install_kfp_package=False`), and
- on this machine under `kfp.local.SubprocessRunner(use_venv=False)`, in the current interpreter.

Directories travel between steps as `Input`/`Output` artifacts; the validated params travel as the
`configure` step's `params` artifact (a params.yaml). GPU placement (accelerators, node pool, model
cache, Secrets) is added by the pipelines, not here, so that it stays a pipeline parameter.

`build_components(cpu_image, trainer_image)` makes the set for other images (a private registry);
the module-level defaults are what the checked-in compiled YAML uses.
"""

import os
from dataclasses import dataclass
from typing import Callable, List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

REGISTRY = "ghcr.io/subjectops"
VERSION = "0.1.0"
CPU_IMAGE = os.environ.get("SUBJECTOPS_CPU_IMAGE", f"{REGISTRY}/subjectops-cpu:{VERSION}")
TRAINER_IMAGE = os.environ.get("SUBJECTOPS_TRAINER_IMAGE", f"{REGISTRY}/subjectops-trainer:{VERSION}")

# Components (by name) that run on the GPU node pool in the trainer image.
GPU_STAGES = ("priors", "pretrain-disc", "finetune", "infer", "sweep", "evaluate")


# ------------------------------------------------------------------------------------ CPU components
def configure(
    params_yaml: str,
    overrides: List[str],
    method: str,
    model: str,
    priors_cache_dir: str,
    params: Output[Artifact],
) -> NamedTuple("Configured", [("plan", str), ("method", str)]):
    """Validate the run's params once (a bad value fails before any GPU is requested) and plan the stages.

    `plan` names the pipeline branch to run (`priors+pretrain_disc`, `priors`, `pretrain_disc` or `none`):
    `plan(params).branch`, from the same `plan(params)` as `subjectops run`; the whole plan (stages and
    their inputs) is in the `params` artifact's metadata.
    """
    from collections import namedtuple
    from pathlib import Path

    from subjectops.kfp_pod import kfp_plan, resolve_params, write_params

    p = resolve_params(params_yaml, overrides, method=method, model=model, priors_cache_dir=priors_cache_dir)
    planned = kfp_plan(p)
    write_params(p, Path(params.path))
    params.metadata.update({"method": p.finetune.method, "model": p.model.base, "digest": p.digest(),
                            "plan": planned.branch, "stages": planned.to_dict()["stages"]})
    return namedtuple("Configured", ["plan", "method"])(planned.branch, p.finetune.method)


def fetch_subject(subject_uri: str, dvc_repo: str, dvc_rev: str, images: Output[Dataset]) -> str:
    """The subject's photos from S3, DVC or a directory; returns the subject's name."""
    from pathlib import Path

    from subjectops.kfp_pod import fetch_subject as fetch

    target = fetch(subject_uri, Path(images.path), dvc_repo=dvc_repo, dvc_rev=dvc_rev)
    images.metadata.update({"subject": target.name, "source": subject_uri})
    return target.name


def refine(params: Input[Artifact], images: Input[Dataset], class_word: str, out: Output[Dataset]):
    from pathlib import Path

    from subjectops.kfp_pod import read_params, single_subdir
    from subjectops.stages.refine import refine as refine_stage

    refine_stage(read_params(Path(params.path)), single_subdir(Path(images.path)), class_word, Path(out.path))


def register(
    params: Input[Artifact],
    refine_dir: Input[Dataset],
    finetune_dir: Input[Model],
    infer_dir: Input[Dataset],
    evaluate_dir: Input[Artifact],
    run_name: str,
    out: Output[Artifact],
    priors_dir: Input[Dataset] = None,
    disc_dir: Input[Model] = None,
) -> str:
    """Record the run in MLflow (parent run, one run per stage) and register the model (alias challenger).

    Same code as `subjectops sync RUN_DIR` after a local run: the step's inputs are linked into a run
    directory named `run_name` (the KFP run's name) and synced. Returns the registered model version as
    `name/version`.
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from subjectops.kfp_pod import assemble_run_dir, load_registration
    from subjectops.stages.register import register as register_stage
    from subjectops.tracking.mlflow_tracker import sync

    tmp = Path(tempfile.mkdtemp(prefix="subjectops-run-"))
    run_dir = tmp / (run_name or "kfp-run")
    try:
        assemble_run_dir(run_dir, {
            "refine": Path(refine_dir.path),
            "priors": Path(priors_dir.path) if priors_dir is not None else None,
            "pretrain_disc": Path(disc_dir.path) if disc_dir is not None else None,
            "finetune": Path(finetune_dir.path), "infer": Path(infer_dir.path), "evaluate": Path(evaluate_dir.path)})
        summary = sync(run_dir, register_stage, echo=print)
        print(json.dumps(summary, indent=2, default=str))
        if not (run_dir / "register").is_dir():
            raise RuntimeError(f"MLflow sync recorded the run but registered no model: {summary}")
        shutil.copytree(run_dir / "register", out.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = load_registration(Path(out.path))
    out.metadata.update({"model_name": info.get("model_name"), "version": str(info.get("version"))})
    return f"{info.get('model_name')}/{info.get('version')}"


def benchmark_pairs(methods: List[str], subjects: List[dict]) -> List[dict]:
    """Every (method, subject) pair, `{"method", "uri", "class_word"}`: the benchmark loops once over them.

    One flat loop rather than nested ParallelFor loops over methods and subjects, so that one `parallelism` caps
    the concurrent personalize runs (GPU pods) of the whole benchmark."""
    from subjectops.selection.benchmark import benchmark_pairs as pairs

    return pairs(methods, subjects)


def benchmark_aggregate(
    registrations: List[str],
    params: Input[Artifact],
    fail_on_refused: bool,
    run_name: str,
    out: Output[Artifact],
    metrics: Output[Metrics],
    leaderboard: Output[Artifact],
    leaderboard_html: Output[HTML],
):
    """The leaderboard of the registered versions (`name/version` each) across methods and subjects, to this
    step's `leaderboard` artifact (html, markdown, json) and to MLflow; then the aggregate against the champions,
    failing on a regression."""
    import json
    import math
    import shutil
    from pathlib import Path

    from subjectops.kfp_pod import benchmark_aggregate as aggregate, check_benchmark, parse_registration, read_params, registry_summaries
    from subjectops.selection.benchmark import benchmark_leaderboard

    p = read_params(Path(params.path))
    registered = [parse_registration(r) for r in registrations]
    board = benchmark_leaderboard(registered, Path(leaderboard.path), p.tracking.experiment, run_name or "kfp-benchmark")
    leaderboard.metadata.update({"rows": list(board.rows), "subjects": board.subjects})
    shutil.copyfile(Path(leaderboard.path) / "leaderboard.html", leaderboard_html.path)
    print(board.markdown())
    rows = registry_summaries(registered)
    result, decision = aggregate(rows, p.registry)
    Path(out.path).mkdir(parents=True, exist_ok=True)
    (Path(out.path) / "aggregate.json").write_text(json.dumps(result, indent=2, default=str))
    for r in result["challenger"]["records"]:
        if math.isfinite(r["mean"]):
            metrics.log_metric(f"{r['metric']}.{r['prompt_set']}.{r['backbone']}", r["mean"])
    print(decision.summary())
    check_benchmark(decision, fail_on_refused=fail_on_refused)


# ------------------------------------------------------------------------------------ GPU components
def priors(params: Input[Artifact], refine_dir: Input[Dataset], out: Output[Dataset]):
    from pathlib import Path

    from subjectops.kfp_pod import read_params
    from subjectops.stages.priors import priors as priors_stage

    priors_stage(read_params(Path(params.path)), Path(refine_dir.path), Path(out.path))


def pretrain_disc(params: Input[Artifact], refine_dir: Input[Dataset], out: Output[Model], priors_dir: Input[Dataset] = None):
    from pathlib import Path

    from subjectops.kfp_pod import read_params
    from subjectops.stages.pretrain_disc import pretrain_disc as pretrain_disc_stage

    pretrain_disc_stage(read_params(Path(params.path)), Path(refine_dir.path),
                        Path(priors_dir.path) if priors_dir is not None else None, Path(out.path))


def finetune(
    params: Input[Artifact],
    refine_dir: Input[Dataset],
    gpu_count: int,
    accelerator_type: str,
    run_id: str,
    out: Output[Model],
    priors_dir: Input[Dataset] = None,
    disc_dir: Input[Model] = None,
):
    """One GPU: the stage function in-process. Several: `accelerate launch` of the same CLI stage.

    `gpu_count` and `accelerator_type` are the values the pipeline requested for this pod; they are
    recorded with the model. (Taking `accelerator_type` as an input also makes kfp 2.17 pass that pipeline
    parameter into the `dsl.If` branches, whose accelerator settings reference it.) Checkpoints go to the
    model-cache volume under `run_id` (the pipeline run), where the pod of a retry after a preemption finds them.
    """
    import subprocess
    from pathlib import Path

    from subjectops.kfp_pod import PARAMS_FILE, finetune_argv, read_params, run_checkpoint_dir
    from subjectops.stages.finetune import finetune as finetune_stage

    p = read_params(Path(params.path))
    priors = Path(priors_dir.path) if priors_dir is not None else None
    disc = Path(disc_dir.path) if disc_dir is not None else None
    checkpoints = run_checkpoint_dir(run_id, p, Path(refine_dir.path))
    if gpu_count > 1:
        argv = finetune_argv(gpu_count, Path(params.path) / PARAMS_FILE, Path(refine_dir.path), priors, disc, Path(out.path),
                             checkpoints)
        print("running:", " ".join(argv), flush=True)
        subprocess.run(argv, check=True)
    else:
        finetune_stage(p, Path(refine_dir.path), priors, Path(out.path), disc_dir=disc, checkpoint_dir=checkpoints)
    out.metadata.update({"method": p.finetune.method, "base_model": p.model.base,
                         "gpu_count": gpu_count, "accelerator_type": accelerator_type})


def infer(params: Input[Artifact], refine_dir: Input[Dataset], finetune_dir: Input[Model], out: Output[Dataset]):
    from pathlib import Path

    from subjectops.kfp_pod import read_params
    from subjectops.stages.infer import infer as infer_stage

    infer_stage(read_params(Path(params.path)), Path(refine_dir.path), Path(finetune_dir.path), Path(out.path))


def sweep(params: Input[Artifact], refine_dir: Input[Dataset], finetune_dir: Input[Model], out: Output[Artifact]):
    """Every pipeline branch runs this step: when `plan(params)` has no sweep it only records why (as `subjectops
    sweep --if-needed` does under DVC) and evaluate ignores that record, so the branches need not double."""
    from pathlib import Path

    from subjectops.kfp_pod import read_params
    from subjectops.methods.plan import plan
    from subjectops.stages.common import not_needed
    from subjectops.stages.sweep import sweep as sweep_stage

    p = read_params(Path(params.path))
    planned = plan(p)
    if planned.has("sweep"):
        sweep_stage(p, Path(refine_dir.path), Path(finetune_dir.path), Path(out.path))
    else:
        not_needed("sweep", p, Path(out.path), planned.why_not("sweep"))


def evaluate(
    params: Input[Artifact],
    refine_dir: Input[Dataset],
    infer_dir: Input[Dataset],
    sweep_dir: Input[Artifact],
    out: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    import math
    import shutil
    from pathlib import Path

    from subjectops.kfp_pod import read_params
    from subjectops.stages.evaluate import evaluate as evaluate_stage
    from subjectops.tracking.record import read_eval_records

    evaluate_stage(read_params(Path(params.path)), Path(refine_dir.path), Path(infer_dir.path), Path(out.path),
                   Path(sweep_dir.path))
    for r in read_eval_records(Path(out.path) / "metrics.json"):
        if isinstance(r.get("mean"), (int, float)) and math.isfinite(r["mean"]):
            metrics.log_metric(f"{r.get('key', r['metric'])}.{r['prompt_set']}.{r['backbone']}", float(r["mean"]))
    shutil.copyfile(Path(out.path) / "report.html", report.path)


# -------------------------------------------------------------------------------------------- factory
CPU_FUNCS: tuple = (configure, fetch_subject, refine, register, benchmark_pairs, benchmark_aggregate)
GPU_FUNCS: tuple = (priors, pretrain_disc, finetune, infer, sweep, evaluate)


@dataclass(frozen=True)
class Components:
    configure: Callable
    fetch_subject: Callable
    refine: Callable
    register: Callable
    benchmark_pairs: Callable
    benchmark_aggregate: Callable
    priors: Callable
    pretrain_disc: Callable
    finetune: Callable
    infer: Callable
    sweep: Callable
    evaluate: Callable
    cpu_image: str
    trainer_image: str


def build_components(cpu_image: str = CPU_IMAGE, trainer_image: str = TRAINER_IMAGE) -> Components:
    """The components with their images; the package (and kfp) are preinstalled there."""
    made = {}
    for funcs, image in ((CPU_FUNCS, cpu_image), (GPU_FUNCS, trainer_image)):
        for f in funcs:
            made[f.__name__] = dsl.component(f, base_image=image, install_kfp_package=False)
    return Components(**made, cpu_image=cpu_image, trainer_image=trainer_image)
