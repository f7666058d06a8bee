"""`personalize`: one subject through refine, [priors], [pretrain-disc], finetune, infer, [sweep], evaluate, register.

The `configure` step validates the params and names the branch of `plan(params)`, the same plan
`subjectops run` follows: the discriminator pretraining runs only when the method needs it, the class
priors only when it trains with them. `dsl.If`/`Elif`/`Else` on that name select one branch, which runs its stages through register; the
pipeline returns the registered version (`name/version`) of whichever branch ran (`dsl.OneOf`). Every branch runs the
sweep step, which records why and does nothing when the plan has no sweep (a run without snapshots).
"""

from typing import List

from kfp import dsl

from components import Components
from pipelines import built_on_first_use
from pipelines import placement as P
from subjectops.methods.plan import branch_name, branches

DEFAULT_PRIORS_CACHE = f"{P.MODEL_CACHE_MOUNT}/cache/priors"


def build_personalize(c: Components):
    def gpu(task, accelerator_type, gpu_count, gpu_node_selector, gpu_tolerations, model_cache_pvc, mlflow_secret, s3_secret):
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

        ref = c.refine(params=params, images=fetch.outputs["images"], class_word=class_word).set_display_name("refine")
        refined = ref.outputs["out"]

        def tail(finetuned, priors_dir, disc_dir):
            """infer, sweep, evaluate and register one finetune output.

            They run inside each branch: kfp.local joins branches with `dsl.OneOf` for parameters only, so
            the branches meet at the register step's `name/version` parameter, not at an artifact.
            """
            inf = gpu(c.infer(params=params, refine_dir=refined, finetune_dir=finetuned).set_display_name("infer"),
                      **placement)
            sw = gpu(c.sweep(params=params, refine_dir=refined, finetune_dir=finetuned).set_display_name("sweep"),
                     **placement)
            ev = gpu(c.evaluate(params=params, refine_dir=refined, infer_dir=inf.outputs["out"],
                                sweep_dir=sw.outputs["out"]).set_display_name("evaluate"), **placement)
            optional = {k: v for k, v in (("priors_dir", priors_dir), ("disc_dir", disc_dir)) if v is not None}
            reg = c.register(params=params, refine_dir=refined, finetune_dir=finetuned, infer_dir=inf.outputs["out"],
                             evaluate_dir=ev.outputs["out"], run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, **optional)
            reg.set_display_name("register").set_caching_options(False)
            P.with_mlflow(reg, mlflow_secret)
            return reg

        # One branch per combination of optional training stages; `configure` names the one `plan(params)` has.
        registered = []
        combos = branches()
        for i, optional in enumerate(combos):
            plan = branch_name(optional)
            with_priors, with_disc = "priors" in optional, "pretrain_disc" in optional
            if i == 0:
                branch = dsl.If(cfg.outputs["plan"] == plan, name=f"plan-{plan}")
            elif i < len(combos) - 1:
                branch = dsl.Elif(cfg.outputs["plan"] == plan, name=f"plan-{plan}")
            else:
                branch = dsl.Else(name=f"plan-{plan}")
            with branch:
                priors_dir = disc_dir = None
                if with_priors:
                    priors_dir = gpu(c.priors(params=params, refine_dir=refined).set_display_name("priors"),
                                     **placement).outputs["out"]
                if with_disc:
                    extra = {"priors_dir": priors_dir} if priors_dir is not None else {}
                    disc_dir = gpu(c.pretrain_disc(params=params, refine_dir=refined, **extra)
                                   .set_display_name("pretrain-disc"), **placement).outputs["out"]
                inputs = {k: v for k, v in (("priors_dir", priors_dir), ("disc_dir", disc_dir)) if v is not None}
                ft = gpu(c.finetune(params=params, refine_dir=refined, gpu_count=gpu_count,
                                    accelerator_type=accelerator_type, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, **inputs)
                         .set_display_name("finetune"), **placement)
                registered.append(tail(ft.outputs["out"], priors_dir, disc_dir).outputs["Output"])
        # The registered model version, "name/version", from whichever branch ran.
        return dsl.OneOf(*registered)

    return personalize


__getattr__ = built_on_first_use("personalize", build_personalize)  # `from pipelines.personalize import personalize`
