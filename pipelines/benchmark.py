"""`benchmark`: methods x subjects (DreamBench by default) through `personalize`, in parallel, then one
aggregation step that writes the leaderboard across methods and subjects (`selection.compare`: bootstrap
intervals, refused when the runs' prompt sets, seeds or backbones differ) as its `leaderboard` artifact and to
MLflow, compares the aggregate with the registry's champions and fails the run, with the numbers in its
message, when a promotion gate regresses.
"""

import json
from importlib import resources
from typing import List

from kfp import dsl

from components import Components
from pipelines import built_on_first_use
from pipelines import placement as P
from pipelines.personalize import DEFAULT_PRIORS_CACHE, build_personalize

DREAMBENCH_ROOT = "s3://subjectops-data/dreambench"
DEFAULT_PARALLELISM = 4


def dreambench_subjects(root: str = DREAMBENCH_ROOT) -> list[dict]:
    """The 30 DreamBench subjects as loop items: `{"uri": ROOT/<name>, "class_word": ...}`."""
    data = json.loads(resources.files("subjectops").joinpath("data/dreambench_prompts.json").read_text())
    root = root.rstrip("/")
    return [{"uri": f"{root}/{name}", "class_word": cls} for name, cls in sorted(data["classes"].items())]


def build_benchmark(c: Components, parallelism: int = DEFAULT_PARALLELISM):
    personalize = build_personalize(c)

    @dsl.pipeline(
        name="subjectops-benchmark",
        description="Personalize every subject of a benchmark (DreamBench by default) with every method, write the "
                    "leaderboard across methods and subjects, and fail when the aggregate regresses against the "
                    "registry's champions.",
    )
    def benchmark(
        subjects: List[dict] = dreambench_subjects(),
        methods: List[str] = ["dreambooth"],
        model: str = "",
        overrides: List[str] = [],
        params_yaml: str = "",
        fail_on_refused: bool = False,
        dvc_repo: str = "",
        dvc_rev: str = "",
        priors_cache_dir: str = DEFAULT_PRIORS_CACHE,
        accelerator_type: str = P.DEFAULT_ACCELERATOR,
        gpu_count: int = 1,
        gpu_node_selector: dict = P.DEFAULT_NODE_SELECTOR,
        gpu_tolerations: list = P.DEFAULT_TOLERATIONS,
        model_cache_pvc: str = P.DEFAULT_MODEL_CACHE_PVC,
        mlflow_secret: str = P.DEFAULT_MLFLOW_SECRET,
        s3_secret: str = P.DEFAULT_S3_SECRET,
    ):
        # The shared params, validated once before any subject starts (each personalize run validates its
        # method's); the aggregation step reads the gates from them.
        cfg = c.configure(params_yaml=params_yaml, overrides=overrides, method="", model=model,
                          priors_cache_dir=priors_cache_dir).set_display_name("configure")
        # One loop over the (method, subject) pairs: `parallelism` caps the whole benchmark's GPU pods.
        pairs = c.benchmark_pairs(methods=methods, subjects=subjects).set_display_name("method-subject-pairs")
        with dsl.ParallelFor(pairs.output, parallelism=parallelism, name="runs") as pair:
            run = personalize(
                subject_uri=pair.uri, class_word=pair.class_word, method=pair.method, model=model,
                overrides=overrides, params_yaml=params_yaml, dvc_repo=dvc_repo, dvc_rev=dvc_rev,
                priors_cache_dir=priors_cache_dir, accelerator_type=accelerator_type, gpu_count=gpu_count,
                gpu_node_selector=gpu_node_selector, gpu_tolerations=gpu_tolerations,
                model_cache_pvc=model_cache_pvc, mlflow_secret=mlflow_secret, s3_secret=s3_secret,
            ).after(cfg)
        agg = c.benchmark_aggregate(registrations=dsl.Collected(run.output), params=cfg.outputs["params"],
                                    fail_on_refused=fail_on_refused, run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        agg.set_display_name("aggregate-and-gate").set_caching_options(False)
        P.with_mlflow(agg, mlflow_secret)

    return benchmark


__getattr__ = built_on_first_use("benchmark", build_benchmark)  # `from pipelines.benchmark import benchmark`
