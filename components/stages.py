"""The Kubeflow components: one per stage of the registry, made by one factory (`stage_component`) from the
stage's declaration, and the steps around them (configure, fetch-subject, the benchmark's pairs and aggregate).

They are lightweight Python components (`@dsl.component`) whose base image is one of the project's
images (images/), where the package is installed: a stage's body is one call of `subjectops.kfp_pod.run_step`,
which runs the stage on the input artifact directories, writing its output directory straight into the output
artifact. The same components therefore run

- on a cluster, inside the images (no `pip install` at run time: `install_kfp_package=False`), and
- on this machine under `kfp.local.SubprocessRunner(use_venv=False)`, in the current interpreter.

Directories travel between steps as `Input`/`Output` artifacts; the validated params travel as the
`configure` step's `params` artifact (a params.yaml). GPU placement (accelerators, node pool, model
cache, Secrets) is added by the pipelines, not here, so that it stays a pipeline parameter.

`build_components(cpu_image, trainer_image)` makes the set for other images (a private registry);
the module-level defaults are what the checked-in compiled YAML uses.
"""

import linecache
import os
from dataclasses import make_dataclass
from typing import Callable, List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from subjectops.stages.base import Stage
from subjectops.stages.plan import branching_stages
from subjectops.stages.registry import all_stages, get_stage

REGISTRY = "ghcr.io/subjectops"
VERSION = "0.1.0"
CPU_IMAGE = os.environ.get("SUBJECTOPS_CPU_IMAGE", f"{REGISTRY}/subjectops-cpu:{VERSION}")
TRAINER_IMAGE = os.environ.get("SUBJECTOPS_TRAINER_IMAGE", f"{REGISTRY}/subjectops-trainer:{VERSION}")

# Components (by name) that run on the GPU node pool in the trainer image.
GPU_STAGES = tuple(s.command for s in all_stages() if s.gpu)


# ------------------------------------------------------------------------------------ steps around the stages
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

    from subjectops.data.sources import fetch_subject as fetch

    target = fetch(subject_uri, Path(images.path), dvc_repo=dvc_repo, dvc_rev=dvc_rev)
    images.metadata.update({"subject": target.name, "source": subject_uri})
    return target.name


def benchmark_pairs(methods: List[str], subjects: List[dict]) -> List[dict]:
    """Every (method, subject) pair, `{"method", "uri", "class_word"}`: the benchmark loops once over them.

    One flat loop rather than nested ParallelFor loops over methods and subjects, so that one `parallelism` caps
    the concurrent personalize runs (GPU pods) of the whole benchmark."""
    from subjectops.benchmark.leaderboard import benchmark_pairs as pairs

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
    from subjectops.benchmark.step import aggregate_step

    aggregate_step(registrations, params, fail_on_refused, run_name, out, metrics, leaderboard, leaderboard_html)


# ------------------------------------------------------------------------------------ the stages
def _inputs(stage: Stage) -> list[tuple[str, str, bool]]:
    """(stage, artifact type, optional) of each stage output the component takes: what it reads, and for the tracked
    stage also every branching stage (so the record of the run is whole); optional when a branch may lack it."""
    names = list(stage.reads)
    if stage.tracked:
        names += [n for n in branching_stages() if n not in names]
    return [(n, get_stage(n).artifact, n in branching_stages()) for n in names]


def stage_signature(stage: Stage) -> str:
    """The `def` line of a stage's component function: what it takes and makes, written out from the declaration."""
    inputs = _inputs(stage)
    required = [f"{get_stage(n).option.replace('-', '_')}_dir: Input[{t}]" for n, t, opt in inputs if not opt]
    optional = [f"{get_stage(n).option.replace('-', '_')}_dir: Input[{t}] = None" for n, t, opt in inputs if opt]
    args = [f"{a.name}: {'Input[Dataset]' if a.folder else 'str'}" for a in stage.arguments if a.kfp]
    extra = ["gpu_count: int", "accelerator_type: str", "run_id: str"] if stage.multi_gpu else []
    extra += ["run_name: str"] if stage.tracked else []
    outputs = [f"out: Output[{stage.artifact}]"] + (["metrics: Output[Metrics]"] if stage.metrics else [])
    outputs += ["report: Output[HTML]"] if stage.report else []
    signature = ", ".join(["params: Input[Artifact]", *required, *args, *extra, *outputs, *optional])
    return f"def {stage.name}({signature}){' -> str' if stage.tracked else ''}:"


def stage_source(stage: Stage) -> str:
    """The component function of a stage, as source: kfp reads a lightweight component's source and signature, so
    the signature is written out from the declaration and the body is one call."""
    dirs = ", ".join(f'"{n}": {get_stage(n).option.replace("-", "_")}_dir' for n, _, _ in _inputs(stage))
    if stage.tracked:
        body = f"    return register_step(params, {{{dirs}}}, run_name, out)"
        call = "register_step"
    else:
        kw = [f"{{{', '.join(f'{chr(34)}{a.name}{chr(34)}: {a.name}' for a in stage.arguments if a.kfp)}}}"]
        kw += [f"{n}={n}" for n in ("metrics", "report") if getattr(stage, n)]
        kw += [f"{n}={n}" for n in ("gpu_count", "accelerator_type", "run_id") if stage.multi_gpu]
        body = f"    run_step({stage.name!r}, params, {{{dirs}}}, out, {', '.join(kw)})"
        call = "run_step"
    return (f"{stage_signature(stage)}\n    \"\"\"{stage.help}\"\"\"\n"
            f"    from subjectops.kfp_pod import {call}\n\n{body}\n")


def component_function(name: str, source: str) -> Callable:
    """The function `name` defined by `source`, compiled so that kfp (and `inspect`) can read its source as they
    read a written one."""
    filename = f"<subjectops component {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"Input": Input, "Output": Output, "Artifact": Artifact, "Dataset": Dataset, "Model": Model,
                 "Metrics": Metrics, "HTML": HTML}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own declaration, written out above
    return namespace[name]


# The stage functions by name (`components.stages.sweep`), as the steps above are.
globals().update({stage.name: component_function(stage.name, stage_source(stage)) for stage in all_stages()})

# -------------------------------------------------------------------------------------------- factory
STEPS: tuple = (configure, fetch_subject, benchmark_pairs, benchmark_aggregate)
Components = make_dataclass("Components", [f.__name__ for f in STEPS] + [s.name for s in all_stages()]
                            + ["cpu_image", "trainer_image"], frozen=True)


def build_components(cpu_image: str = CPU_IMAGE, trainer_image: str = TRAINER_IMAGE) -> Components:
    """The components with their images; the package (and kfp) are preinstalled there."""
    made = {f.__name__: dsl.component(f, base_image=cpu_image, install_kfp_package=False) for f in STEPS}
    for stage in all_stages():
        made[stage.name] = dsl.component(globals()[stage.name], base_image=trainer_image if stage.gpu else cpu_image,
                                         install_kfp_package=False)
    return Components(**made, cpu_image=cpu_image, trainer_image=trainer_image)
