"""finetune: train the chosen method on the refined subject (and class priors), then save its weights.

When the plan requires snapshots, the trainer's snapshot hook keeps an inference-ready copy of the weights at
each of `snapshot_steps(params)` in `snapshots/step_NNNNNN/` (method.json and manifest of its own), written by
the method's `save` (adapters as they are; a full UNet in half precision).

Checkpoints live in `<out>.partial/checkpoints` (or `checkpoint_dir`: the Kubeflow component keeps them on the
model-cache volume, keyed by pipeline run, where a retried pod finds them); a killed or preempted (SIGTERM) run
started again with the same parameters and inputs resumes from the latest one and ends with the same weights
as an uninterrupted run. Each checkpoint records the content hashes of the refined subject, the priors, the
discriminator and the class word; one made for other data is refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from subjectops.config import Params
from subjectops.errors import SubjectopsError
from subjectops.stages.base import Argument, Stage
from subjectops.stages.common import hash_dir, partial_dir, planned_inputs, stage_output, write_manifest

if TYPE_CHECKING:
    from subjectops.data.subject import RefinedSubject


def finetune(params: Params, refine_dir: Path, priors_dir: Path | None, out: Path, disc_dir: Path | None = None,
             on_step: Callable[[int, dict], None] | None = None, checkpoint_dir: Path | None = None,
             pipe=None) -> Path:
    """`pipe`: the base pipeline already loaded (`subjectops run` hands it on); it is trained in place."""
    import torch

    from subjectops.stages.plan import snapshot_steps
    from subjectops.training.loop import Trainer

    inputs = planned_inputs(params, "finetune",
                            {"refine": refine_dir, "priors": priors_dir, "pretrain_disc": disc_dir})
    run = FinetuneRun.start(params, inputs, pipe, partial_dir(out), Path(out))
    keep = snapshot_steps(params)
    # The trainer places the models on the accelerator first, so what setup() adds lands there too.
    run.trainer = Trainer(params, run.models, run.method, run.subject.resolution, run.work, on_step=on_step,
                          on_snapshot=run.save_snapshot, snapshot_steps=keep, data=run.data_identity(),
                          ckpt_dir=checkpoint_dir)
    # What setup() draws (peft's LoRA init reads torch's global generator) comes from finetune.seed, in a forked
    # generator: the same adapters in a fresh `subjectops run` and in a benchmark that ran other cells before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.finetune.seed)
        run.method.setup()
    check_snapshot_steps(run.method, keep)  # after setup: hifi-tuner's phases (one per DDIM timestep) come from it
    priors = class_priors(inputs["priors"], run.method.name)
    # Under `accelerate launch` every process trains; only the main one writes and publishes the output.
    with stage_output(out, keep_on_error=True, publish=run.trainer.is_main) as work:
        run.train(work, priors)
    return Path(out)


@dataclass
class FinetuneRun:
    """One finetune: the refined subject, the models and the method over them, and the trainer; its steps write the
    output (`record`), the snapshots and the validation images."""

    params: Params
    inputs: dict[str, Path | None]  # the planned input folders by stage
    subject: RefinedSubject
    pipe: Any
    models: Any  # subjectops.training.models.DiffusionModels
    method: Any  # subjectops.methods.base.Method
    work: Path  # the partial output folder (snapshots are written into it while training runs)
    out: Path  # where the output is published (work is renamed to it at the end)
    trainer: Any = None  # subjectops.training.loop.Trainer, set before training

    @classmethod
    def start(cls, params: Params, inputs: dict[str, Path | None], pipe, work: Path, out: Path) -> FinetuneRun:
        """The subject, the base pipeline (loaded unless handed on) and the configured method, which receives what its
        requirements brought into the plan (Hypnos: its pretrained discriminator), by requirement."""
        from subjectops.data.subject import RefinedSubject
        from subjectops.methods import get_method
        from subjectops.models.loading import load_pipeline
        from subjectops.stages.registry import get_stage
        from subjectops.training.models import DiffusionModels

        subject = RefinedSubject.load(inputs["refine"])
        pipe = pipe if pipe is not None else load_pipeline(params.model)
        models = DiffusionModels.from_pipeline(pipe)
        if subject.resolution % models.vae_scale_factor:
            raise SubjectopsError(f"subject resolution {subject.resolution} is not a multiple of the VAE's scale "
                                  f"factor {models.vae_scale_factor}",
                                  fix=f"set subject.resolution to a multiple of {models.vae_scale_factor} and run "
                                      "refine again")
        method = get_method(params.finetune.method)(params, subject.class_word, models)
        method.receive({get_stage(name).brought_by: path for name, path in inputs.items()
                        if path is not None and get_stage(name).optional})
        return cls(params, inputs, subject, pipe, models, method, work, out)

    def data_identity(self) -> dict[str, str | None]:
        """The content hashes of what trains: a checkpoint made for other data is refused, never resumed."""
        from subjectops.digest import digest_json
        from subjectops.stages.priors import training_identity

        priors, disc = self.inputs["priors"], self.inputs["pretrain_disc"]
        return {"refine": hash_dir(self.inputs["refine"]), "class_word": digest_json(self.subject.class_word),
                "priors": training_identity(priors) if priors is not None else None,
                "pretrain_disc": hash_dir(disc) if disc is not None else None}

    def train(self, work: Path, priors: list) -> None:
        """Train on the subject's images and masks (and the priors); the main process saves the weights, drops the
        checkpoints they supersede and records the output."""
        from subjectops.data.subject import to_tensor
        from subjectops.training.loop import replicas_in_sync

        trainer = self.trainer
        images = [to_tensor(i) for i in self.subject.images()]
        masks = [to_tensor(m) for m in self.subject.masks()]
        steps = trainer.train(images, masks, priors, validate=lambda step: self.validate(work, step))
        if not replicas_in_sync(trainer):
            raise SubjectopsError(f"the {trainer.world} training processes ended with different weights",
                                  fix="check that every process runs the same subjectops version and params")
        trainer.accelerator.wait_for_everyone()
        if trainer.is_main:
            written = self.method.save(work)
            shutil.rmtree(trainer.ckpt_dir, ignore_errors=True)  # the saved weights supersede them
            self.record(work, steps, written)

    def record(self, directory: Path, steps: int, written: list[str]) -> None:
        """method.json (what inference loads the weights with), the model card and the manifest, with each phase's
        optimizer."""
        from subjectops.methods.card import card_facts, write_card
        from subjectops.models.loading import resolve

        params, method, trainer = self.params, self.method, self.trainer
        info = {"method": method.name, "base_model": params.model.base, "identifier": method.identifier(),
                "instance_prompt": method.instance_prompt(), "class_word": self.subject.class_word, "steps": steps,
                "resolution": self.subject.resolution, "weights": written, "processes": trainer.world,
                "native_resolution": self.models.native_resolution}
        (directory / "method.json").write_text(json.dumps(info, indent=2))
        # the card and the weights' metadata, before the manifest hashes them; its snippet names the folder as
        # published
        write_card(directory, self.out.resolve() / directory.relative_to(self.work), info,
                   card_facts(info, getattr(method.cfg, "rank", None), trainer.data["refine"]),
                   resolve(params.model))
        manifest_inputs = {"refine": Path(self.inputs["refine"]), "priors": self.inputs["priors"],
                           "disc": self.inputs["pretrain_disc"]}
        write_manifest(directory, "finetune", params, manifest_inputs, method=method.name, processes=trainer.world,
                       prepared=trainer.prepared, step=steps, optimizers=optimizer_record(method),
                       **method.manifest_extra())

    def save_snapshot(self, step: int) -> None:
        """The trainer's snapshot hook: an inference-ready copy of the live weights in snapshots/step_NNNNNN/."""
        from subjectops.methods import snapshot_dir

        directory = snapshot_dir(self.work, step)
        directory.mkdir(parents=True, exist_ok=True)
        self.record(directory, step, self.method.save(directory, snapshot=True))

    def validate(self, work: Path, step: int) -> None:
        """A validation image of the live weights (finetune.validation_prompt, _steps, _guidance_scale), drawn by
        the loop `infer` samples with."""
        from subjectops.inference.base import InferenceSpec
        from subjectops.inference.plain import sample
        from subjectops.models.sampling import use_scheduler

        params, method = self.params, self.method
        (work / "validation").mkdir(exist_ok=True)
        use_scheduler(self.pipe, "ddim")
        prompt = method.format_prompt(params.finetune.validation_prompt)
        self.models.unet.eval()
        method.attach_live(self.pipe)  # e.g. HiFi Tuner's c_s, which lives outside the pipeline's modules
        spec = InferenceSpec(strategy="plain", scheduler="ddim", steps=params.finetune.validation_steps,
                             guidance_scale=params.finetune.validation_guidance_scale,
                             resolution=self.subject.resolution)
        image = sample(self.pipe, prompt, params.finetune.seed, spec)
        self.models.unet.train()
        image.save(work / "validation" / f"step_{step:06d}.png")


def check_snapshot_steps(method, keep: list[int]) -> None:
    """Snapshots are kept only at steps the method trains."""
    total_steps = sum(phase.steps for phase in method.phases())
    if keep and keep[-1] > total_steps:
        raise SubjectopsError(f"snapshots are asked for at steps {keep}, but {method.name} trains {total_steps} steps",
                              fix="lower finetune.snapshots (and infer.dreamblend.guidance/edit) or train longer")


def class_priors(priors_dir: Path | None, method_name: str) -> list:
    """The class images prior preservation trains with (none unless the plan has priors), refused when empty."""
    from subjectops.stages.priors import load_priors

    priors = load_priors(priors_dir)
    if priors_dir is not None and not priors:
        raise SubjectopsError(
            f"method {method_name} uses prior preservation but {priors_dir} holds no class images",
            fix="set priors.num_images above 0 and run `subjectops priors` again, "
                "or --set finetune.<method>.prior_preservation=false",
        )
    return priors


def optimizer_record(method) -> list[dict]:
    """Each distinct optimizer setting of the method's phases (`Method.optimizer_settings`), with its phases."""
    groups: dict = {}
    for phase in method.phases():
        groups.setdefault(method.optimizer_settings(phase), []).append(phase.name)
    return [{**settings.to_dict(), "phases": names} for settings, names in groups.items()]


def record(out_dir: Path, rec, grids: Path) -> None:
    """method.json as tags (method, base model, identifier also on the parent run), the training log as per-step
    metrics and a file (both also on the parent run), the weights as written and the validation images as a grid."""
    from subjectops.tracking.record import SKIP_DIRS, files_in, image_grid, images_in, read_json, read_train_log

    meth = read_json(out_dir / "method.json") or {}
    for k, v in meth.items():
        if isinstance(v, (str, int, float, bool)):
            rec.tags[f"method.{k}"] = str(v)
    rec.parent_tags.update({k: v for k, v in rec.tags.items()
                            if k in ("method.method", "method.base_model", "method.identifier")})
    rec.metrics += read_train_log(out_dir / "train_log.jsonl")
    rec.parent_metrics += rec.metrics  # the loss curve on the pipeline run's charts
    if (out_dir / "train_log.jsonl").is_file():
        rec.parent_artifacts.append((out_dir / "train_log.jsonl", "finetune"))
    for p in files_in(out_dir):
        if p.name in SKIP_DIRS or p.name in ("manifest.json", "validation"):
            continue
        rec.artifacts.append((p, "finetune" if p.is_file() else f"finetune/{p.name}"))
    g = image_grid(images_in(out_dir / "validation"), grids / "finetune_validation.png")
    if g:
        rec.artifacts.append((g, "grids"))


STAGE = Stage(
    name="finetune",
    help="Train the method; resumes from the latest checkpoint of an interrupted run with the same params and "
         "inputs. On SIGTERM it finishes the step, writes a checkpoint and exits 75 (run it again to resume).",
    run=lambda ctx: finetune(ctx.params, ctx.inputs["refine"], ctx.inputs.get("priors"), ctx.out,
                             ctx.inputs.get("pretrain_disc"), checkpoint_dir=ctx.args.get("checkpoint_dir"),
                             pipe=ctx.pipe),
    reads=("refine", "priors", "pretrain_disc"),
    # priors.prompt: the class prompt of prior-preservation batches; infer.strategy, infer.dreamblend: the
    # snapshots the inference strategy reads
    params=("model", "subject.token", "priors.prompt", "finetune", "infer.strategy", "infer.dreamblend"),
    code=("src/subjectops/training", "src/subjectops/methods"),
    gpu=True,
    takes_pipe=True,  # trained in place: no later stage may take the base pipeline
    multi_gpu=True,
    artifact="Model",
    arguments=(Argument("checkpoint_dir", "--checkpoints", "checkpoint folder (default OUT.partial/checkpoints), "
                        "e.g. on a volume a retried pod mounts", folder=True, required=False, kfp=False,
                        shapes_output=False),),
    record=record,
)
