"""`personalize`: one subject through refine, priors, [pretrain-disc], finetune, infer, evaluate, register.

The discriminator pretraining runs only when the method needs it (`dsl.If` on the `configure` step's
answer from `subjectops.methods.needs_discriminator`); each branch then runs its finetune, infer,
evaluate and register, and the pipeline returns the registered version (`name/version`) of whichever
branch ran (`dsl.OneOf`).
"""

from typing import List

from kfp import dsl

from components import Components, build_components
from pipelines import placement as P

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

        pri = gpu(c.priors(params=params, refine_dir=refined).set_display_name("priors"), **placement)
        priors_dir = pri.outputs["out"]

        def tail(finetuned, branch: str):
            """infer, evaluate and register one finetune output.

            They run inside each branch: kfp.local joins branches with `dsl.OneOf` for parameters only, so
            the branches meet at the register step's `name/version` parameter, not at an artifact.
            """
            inf = gpu(c.infer(params=params, refine_dir=refined, finetune_dir=finetuned).set_display_name("infer"),
                      **placement)
            ev = gpu(c.evaluate(params=params, refine_dir=refined, infer_dir=inf.outputs["out"])
                     .set_display_name("evaluate"), **placement)
            reg = c.register(params=params, refine_dir=refined, priors_dir=priors_dir, finetune_dir=finetuned,
                             infer_dir=inf.outputs["out"], evaluate_dir=ev.outputs["out"],
                             run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
            reg.set_display_name("register").set_caching_options(False)
            P.with_mlflow(reg, mlflow_secret)
            return reg

        with dsl.If(cfg.outputs["needs_discriminator"] == True, name="needs-discriminator"):  # noqa: E712
            disc = gpu(c.pretrain_disc(params=params, refine_dir=refined, priors_dir=priors_dir)
                       .set_display_name("pretrain-disc"), **placement)
            ft_disc = gpu(c.finetune(params=params, refine_dir=refined, priors_dir=priors_dir, gpu_count=gpu_count,
                                     accelerator_type=accelerator_type, disc_dir=disc.outputs["out"])
                          .set_display_name("finetune"), **placement)
            reg_disc = tail(ft_disc.outputs["out"], "disc")
        with dsl.Else(name="no-discriminator"):
            ft_plain = gpu(c.finetune(params=params, refine_dir=refined, priors_dir=priors_dir, gpu_count=gpu_count,
                                      accelerator_type=accelerator_type).set_display_name("finetune"), **placement)
            reg_plain = tail(ft_plain.outputs["out"], "plain")
        # The registered model version, "name/version", from whichever branch ran.
        return dsl.OneOf(reg_disc.outputs["Output"], reg_plain.outputs["Output"])

    return personalize


personalize = build_personalize(build_components())
