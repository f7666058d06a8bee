"""infer: generate the prompt sets with the fine-tuned model through the configured inference strategy
(`infer.strategy`, `plain` by default), recording every seed and, in the manifest's `inference`, the spec
(strategy, scheduler, steps, guidance scale, resolution, strategy settings) the registered model will serve."""

from __future__ import annotations

import json
from pathlib import Path

from subjectops.config import Params
from subjectops.data.prompts import (
    PROMPT_SET_NAMES,
    PromptSet,
    dreambench,
    prompt_invariant,
    prompt_sets_to_json,
    prompt_varying,
    world_contexts,
)
from subjectops.errors import ConfigError, SubjectopsError
from subjectops.stages.base import Stage
from subjectops.stages.common import require_stage_dir, stage_output, write_manifest
from subjectops.stopping import stop_if_requested


def build_prompt_sets(params: Params, identifier: str, class_word: str) -> list[PromptSet]:
    """The sets named in ``params.infer.prompt_sets``, in that order (the prompt builders are data/prompts.py's;
    reading the params is the stage's)."""
    cfg = params.infer
    names = list(cfg.prompt_sets)
    if not names:
        raise ConfigError("infer.prompt_sets is empty", fix=f"list at least one of {list(PROMPT_SET_NAMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"infer.prompt_sets = {names} names a set twice", fix="list each set once")
    out: list[PromptSet] = []
    for name in names:
        if name == "prompt-invariant":
            c = cfg.prompt_invariant
            out.append(prompt_invariant(c.template, c.num_images, identifier, class_word, seed=cfg.seed))
        elif name == "prompt-varying":
            c = cfg.prompt_varying
            out.append(prompt_varying(c.template, c.num_images, c.sampler_seed, identifier, class_word, seed=cfg.seed))
        elif name == "dreambench":
            c = cfg.dreambench
            out.append(dreambench(c.images_per_prompt, identifier, class_word, seed=cfg.seed,
                                  subject_type=c.subject_type))
        elif name == "world":
            out.append(world_contexts(cfg.world.images_per_prompt, identifier, class_word, seed=cfg.seed))
        else:  # pragma: no cover - pydantic restricts the names
            raise ConfigError(f"unknown prompt set {name!r}", fix=f"use one of {list(PROMPT_SET_NAMES)}")
    return out


def infer(params: Params, refine_dir: Path, finetune_dir: Path, out: Path) -> Path:
    from subjectops.console import progress as progress_display
    from subjectops.data.subject import RefinedSubject
    from subjectops.inference import StageInputs, get_strategy, load_strategy, memory_savers

    refine_dir = require_stage_dir(refine_dir, "refine", "infer")
    subject = RefinedSubject.load(refine_dir)
    finetune_dir = require_stage_dir(finetune_dir, "finetune", "infer")
    info = json.loads((finetune_dir / "method.json").read_text())
    if info["base_model"] != params.model.base:
        raise SubjectopsError(
            f"the finetune in {finetune_dir} was trained on {info['base_model']!r}, but model.base is "
            f"{params.model.base!r}",
            fix=f"pass --model {info['base_model']} (an adapter only works on the base it was trained on)",
        )
    sets = build_prompt_sets(params, info["identifier"], subject.class_word)
    spec = get_strategy(params.infer.strategy).spec_for(params.infer, subject.resolution)
    save_memory = memory_savers(params.infer.memory)
    strategy = load_strategy(spec, StageInputs(model=params.model, finetune=finetune_dir, refine=refine_dir))
    save_memory(strategy.pipe)
    with stage_output(out) as work, progress_display(transient=True) as progress:
        samples = []
        for pset in sets:
            folder = work / "images" / pset.name
            folder.mkdir(parents=True)
            task = progress.add_task(f"infer: {pset.name}", total=len(pset.items))
            for i, item in enumerate(pset.items):
                rel = f"images/{pset.name}/{i:04d}.png"
                image, intermediates, facts = strategy.generate_explained(item.prompt, item.seed)
                image.save(work / rel)
                sample = {"prompt_set": pset.name, "prompt": item.prompt, "identifier": info["identifier"],
                          "class_word": subject.class_word, "seed": item.seed, "path": rel}
                if intermediates or facts:  # what the strategy did for this image, for the report; the
                    # intermediate images sit outside images/, so nothing scores them
                    (work / "stages" / pset.name).mkdir(parents=True, exist_ok=True)
                    sample["intermediates"] = {name: f"stages/{pset.name}/{i:04d}_{name}.png"
                                               for name in intermediates}
                    for name, extra in intermediates.items():
                        extra.save(work / sample["intermediates"][name])
                    sample["details"] = facts
                samples.append(sample)
                progress.advance(task)
                stop_if_requested("infer", f"after image {i + 1} of {len(pset.items)} of prompt set {pset.name}")
        if params.infer.baseline:
            draw_baseline(params, subject.resolution, samples, work, progress)
        (work / "samples.json").write_text(json.dumps(samples, indent=2))
        (work / "prompt_sets.json").write_text(json.dumps(prompt_sets_to_json(sets), indent=2))
        write_manifest(work, "infer", params, {"refine": refine_dir, "finetune": finetune_dir},
                       method=info["method"], inference=spec.model_dump(mode="json"))
    return Path(out)


def draw_baseline(params: Params, resolution: int, samples: list[dict], work: Path, progress) -> None:
    """The base model on every prompt with the identifier removed ("a cup in the snow"), each sample's seed and
    plain sampling with infer's scheduler, steps and guidance: what the class word alone gives, beside the subject."""
    from subjectops.data.prompts import strip_identifier
    from subjectops.inference import get_strategy
    from subjectops.inference.plain import sample
    from subjectops.models.loading import load_pipeline
    from subjectops.models.sampling import use_scheduler

    spec = get_strategy("plain").spec_for(params.infer, resolution)
    pipe = load_pipeline(params.model)
    use_scheduler(pipe, spec.scheduler)
    task = progress.add_task("infer: base model, class word", total=len(samples))
    for s in samples:
        rel = Path("baseline") / Path(s["path"]).relative_to("images")
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        prompt = strip_identifier(s["prompt"], s["identifier"])
        sample(pipe, prompt, s["seed"], spec).save(work / rel)
        s["baseline"] = {"path": rel.as_posix(), "prompt": prompt}
        progress.advance(task)


def record(out_dir: Path, rec, grids: Path) -> None:
    """samples.json and prompt_sets.json, a grid per prompt set, and each set's sample count and seeds' hash."""
    from subjectops.tracking.record import eval_seeds, image_grid, images_in

    for name in ("samples.json", "prompt_sets.json"):
        if (out_dir / name).is_file():
            rec.artifacts.append((out_dir / name, "infer"))
    img_root = out_dir / "images"
    if img_root.is_dir():
        for ps in sorted(p for p in img_root.iterdir() if p.is_dir()):
            g = image_grid(images_in(ps), grids / f"infer_{ps.name}.png")
            if g:
                rec.artifacts.append((g, "grids"))
    for ps, info in eval_seeds(out_dir).items():
        rec.tags[f"infer.{ps}.samples"] = str(info["n"])
        rec.tags[f"infer.{ps}.seeds_sha256"] = info["sha256"]


STAGE = Stage(
    name="infer",
    help="Generate the prompt sets with the fine-tuned model.",
    run=lambda ctx: infer(ctx.params, ctx.inputs["refine"], ctx.inputs["finetune"], ctx.out),
    reads=("refine", "finetune"),
    params=("model", "infer"),
    code=("src/subjectops/inference", "src/subjectops/data/prompts.py"),
    gpu=True,
    record=record,
)
