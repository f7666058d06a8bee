"""`personalize`: one subject through refine, [priors], [pretrain-disc], finetune, infer, [sweep], evaluate, register.

The `configure` step validates the params and names the branch of `plan(params)`, the same plan
`subjectops run` follows: the discriminator pretraining runs only when the method needs it, the class
priors only when it trains with them. `dsl.If`/`Elif`/`Else` on that name select one branch, which runs its stages
through register; the pipeline returns the registered version (`name/version`) of whichever branch ran
(`dsl.OneOf`). Every branch runs the sweep step, which records why and does nothing when the plan has no sweep (a
run without snapshots).
"""

from typing import List

from kfp import dsl

from components import Components
from pipelines import built_on_first_use
from pipelines import placement as P
from subjectops.stages.plan import branch_name, branches, branching_stages
from subjectops.stages.registry import all_stages, get_stage

DEFAULT_PRIORS_CACHE = f"{P.MODEL_CACHE_MOUNT}/cache/priors"


def build_personalize(c: Components):
    def gpu(task, accelerator_type, gpu_count, gpu_node_selector, gpu_tolerations, model_cache_pvc, mlflow_secret,
            s3_secret):
        return P.on_gpu(task, accelerator_type=accelerator_type, gpu_count=gpu_count, node_selector=gpu_node_selector,
                        tolerations=gpu_tolerations, model_cache_pvc=model_cache_pvc, mlflow_secret=mlflow_secret,
                        s3_secret=s3_secret)

    @dsl.pipeline(
        name="subjectops-personalize",
        description="Personalize a text-to-image model on one subject, evaluate it and register it in MLflow.",
    )
    def personalize(
        subject_uri: str,
        class_word: str,
        method: str = "dreambooth",
        model: str = "",
        overrides: List[str] = [],
        params_yaml: str = "",
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
    ) -> str:
        placement = dict(accelerator_type=accelerator_type, gpu_count=gpu_count, gpu_node_selector=gpu_node_selector,
                         gpu_tolerations=gpu_tolerations, model_cache_pvc=model_cache_pvc,
                         mlflow_secret=mlflow_secret, s3_secret=s3_secret)

        cfg = c.configure(params_yaml=params_yaml, overrides=overrides, method=method, model=model,
                          priors_cache_dir=priors_cache_dir).set_display_name("configure")
        params = cfg.outputs["params"]

        fetch = c.fetch_subject(subject_uri=subject_uri, dvc_repo=dvc_repo, dvc_rev=dvc_rev)
        fetch.set_display_name("fetch-subject").set_caching_options(False)
        P.with_object_store(fetch, s3_secret)

        def step(stage, outputs, **given):
            """One stage's task, fed the outputs of the stages it reads (and, for the tracked stage, of every
            branching stage the branch ran)."""
            feeds = [*stage.reads, *(branching_stages() if stage.tracked else ())]
            inputs = {f"{get_stage(n).option.replace('-', '_')}_dir": outputs[n] for n in dict.fromkeys(feeds)
                      if n in outputs}
            extra = {}
            if stage.multi_gpu:
                extra = dict(gpu_count=gpu_count, accelerator_type=accelerator_type,
                             run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            if stage.tracked:
                extra = dict(run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
            task = getattr(c, stage.name)(params=params, **inputs, **given, **extra).set_display_name(stage.command)
            if stage.gpu:
                gpu(task, **placement)
            if stage.tracked:
                task.set_caching_options(False)
                P.with_mlflow(task, mlflow_secret)
            return task

        # The stages before the first branching stage run once, before the branches (refine, on the fetched photos).
        first = [s for s in all_stages() if not s.optional][:1]
        [ref] = [step(s, {}, subject_dir=fetch.outputs["images"], class_word=class_word) for s in first]
        before = {first[0].name: ref.outputs["out"]}

        # One branch per combination of branching stages; `configure` names the one `plan(params)` has. Each runs
        # its stages through the tracked one (register): kfp.local joins branches with `dsl.OneOf` for parameters
        # only, so the branches meet at the register step's `name/version` parameter, not at an artifact.
        registered = []
        combos = branches()
        for i, optional in enumerate(combos):
            plan = branch_name(optional)
            if i == 0:
                branch = dsl.If(cfg.outputs["plan"] == plan, name=f"plan-{plan}")
            elif i < len(combos) - 1:
                branch = dsl.Elif(cfg.outputs["plan"] == plan, name=f"plan-{plan}")
            else:
                branch = dsl.Else(name=f"plan-{plan}")
            with branch:
                outputs = dict(before)
                for stage in all_stages():
                    if stage.name in outputs or (stage.name in branching_stages() and stage.name not in optional):
                        continue
                    task = step(stage, outputs)
                    if stage.tracked:
                        registered.append(task.outputs["Output"])
                    else:
                        outputs[stage.name] = task.outputs["out"]
        # The registered model version, "name/version", from whichever branch ran.
        return dsl.OneOf(*registered)

    return personalize


__getattr__ = built_on_first_use("personalize", build_personalize)  # `from pipelines.personalize import personalize`
