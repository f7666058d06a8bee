"""`personalize`: one subject through refine, [priors], [pretrain-disc], finetune, infer, [sweep], evaluate, register.

The `configure` step validates the params and names the branch of `plan(params)`, the same plan
`subjectops run` follows: the discriminator pretraining runs only when the method needs it, the class
priors only when it trains with them. `dsl.If`/`Elif`/`Else` on that name select one branch, which runs its stages
through register; the pipeline returns the registered version (`name/version`) of whichever branch ran
(`dsl.OneOf`). Every branch runs the sweep step, which records why and does nothing when the plan has no sweep (a
run without snapshots).
"""

from dataclasses import dataclass
from typing import Any, List

from kfp import dsl
from kfp.dsl import PipelineTask

from components import Components
from pipelines import built_on_first_use
from pipelines import placement as P
from subjectops.stages.base import Stage
from subjectops.stages.plan import branch_name, branches, branching_stages
from subjectops.stages.registry import all_stages, get_stage

DEFAULT_PRIORS_CACHE = f"{P.MODEL_CACHE_MOUNT}/cache/priors"


@dataclass
class StageTasks:
    """Adds stage tasks to the pipeline being built: each fed configure's params and the outputs of the stages it
    reads, placed on the GPU pool when the stage needs one, a tracked stage with MLflow's credentials."""

    components: Components
    params: Any  # configure's `params` output
    gpu_placement: dict  # P.on_gpu's settings, from the pipeline's parameters

    def add(self, stage: Stage, outputs: dict, **given) -> PipelineTask:
        """One stage's task, fed the outputs of the stages it reads (and, for the tracked stage, of every branching
        stage the branch ran)."""
        feeds = [*stage.reads, *(branching_stages() if stage.tracked else ())]
        inputs = {f"{get_stage(n).option.replace('-', '_')}_dir": outputs[n] for n in dict.fromkeys(feeds)
                  if n in outputs}
        extra = {}
        if stage.multi_gpu:
            extra = dict(gpu_count=self.gpu_placement["gpu_count"],
                         accelerator_type=self.gpu_placement["accelerator_type"],
                         run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        if stage.tracked:
            extra = dict(run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        task = getattr(self.components, stage.name)(params=self.params, **inputs, **given, **extra)
        task.set_display_name(stage.command)
        if stage.gpu:
            P.on_gpu(task, **self.gpu_placement)
        if stage.tracked:
            task.set_caching_options(False)
            P.with_mlflow(task, self.gpu_placement["mlflow_secret"])
        return task


def add_first_stages(tasks: StageTasks, fetch: PipelineTask, class_word) -> dict:
    """The stages before the first branching stage, which run once, before the branches (refine, on the fetched
    photos); their outputs by stage name."""
    first = [s for s in all_stages() if not s.optional][:1]
    [ref] = [tasks.add(s, {}, subject_dir=fetch.outputs["images"], class_word=class_word) for s in first]
    return {first[0].name: ref.outputs["out"]}


def add_branch_stages(tasks: StageTasks, before: dict, optional) -> list:
    """One plan branch's tasks: the branching stages in `optional` and every stage that always runs, through the
    tracked one (register). Returns the tracked stages' outputs (the registered version, `name/version`)."""
    outputs = dict(before)
    registered = []
    for stage in all_stages():
        if stage.name in outputs or (stage.name in branching_stages() and stage.name not in optional):
            continue
        task = tasks.add(stage, outputs)
        if stage.tracked:
            registered.append(task.outputs["Output"])
        else:
            outputs[stage.name] = task.outputs["out"]
    return registered


def add_plan_branches(tasks: StageTasks, plan_output, before: dict) -> list:
    """One branch per combination of branching stages; `configure` names the one `plan(params)` has (its `plan`
    output). Each runs its stages through the tracked one (register): kfp.local joins branches with `dsl.OneOf` for
    parameters only, so the branches meet at the register step's `name/version` parameter, not at an artifact."""
    registered = []
    combos = branches()
    for i, optional in enumerate(combos):
        plan = branch_name(optional)
        if i == 0:
            branch = dsl.If(plan_output == plan, name=f"plan-{plan}")
        elif i < len(combos) - 1:
            branch = dsl.Elif(plan_output == plan, name=f"plan-{plan}")
        else:
            branch = dsl.Else(name=f"plan-{plan}")
        with branch:
            registered += add_branch_stages(tasks, before, optional)
    return registered


def build_personalize(c: Components):
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
        cfg = c.configure(params_yaml=params_yaml, overrides=overrides, method=method, model=model,
                          priors_cache_dir=priors_cache_dir).set_display_name("configure")
        fetch = c.fetch_subject(subject_uri=subject_uri, dvc_repo=dvc_repo, dvc_rev=dvc_rev)
        fetch.set_display_name("fetch-subject").set_caching_options(False)
        P.with_object_store(fetch, s3_secret)

        tasks = StageTasks(c, cfg.outputs["params"], dict(
            accelerator_type=accelerator_type, gpu_count=gpu_count, node_selector=gpu_node_selector,
            tolerations=gpu_tolerations, model_cache_pvc=model_cache_pvc, mlflow_secret=mlflow_secret,
            s3_secret=s3_secret))
        before = add_first_stages(tasks, fetch, class_word)
        # The registered model version, "name/version", from whichever branch ran.
        return dsl.OneOf(*add_plan_branches(tasks, cfg.outputs["plan"], before))

    return personalize


__getattr__ = built_on_first_use("personalize", build_personalize)  # `from pipelines.personalize import personalize`
