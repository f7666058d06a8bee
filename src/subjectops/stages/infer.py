"""infer: generate the prompt sets with the fine-tuned model (DDIM by default), recording every seed."""

from __future__ import annotations

import json
from pathlib import Path

from rich.progress import Progress

from subjectops.config import Params
from subjectops.data.prompts import build_prompt_sets, prompt_sets_to_json
from subjectops.data.subject import RefinedSubject
from subjectops.errors import SubjectopsError
from subjectops.methods import load_finetuned
from subjectops.models.loading import load_pipeline
from subjectops.models.sampling import generate, use_scheduler
from subjectops.stages.common import require_stage_dir, stage_output, write_manifest


def infer(params: Params, refine_dir: Path, finetune_dir: Path, out: Path) -> Path:
    subject = RefinedSubject.load(require_stage_dir(refine_dir, "refine", "infer"))
    finetune_dir = require_stage_dir(finetune_dir, "finetune", "infer")
    info = json.loads((finetune_dir / "method.json").read_text())
    if info["base_model"] != params.model.base:
        raise SubjectopsError(
            f"the finetune in {finetune_dir} was trained on {info['base_model']!r}, but model.base is {params.model.base!r}",
            fix=f"pass --model {info['base_model']} (an adapter only works on the base it was trained on)",
        )
    sets = build_prompt_sets(params, info["identifier"], subject.class_word)
    pipe = load_pipeline(params.model)
    load_finetuned(pipe, finetune_dir)
    use_scheduler(pipe, params.infer.scheduler)
    cfg = params.infer
    with stage_output(out) as work, Progress(transient=True) as progress:
        samples = []
        for pset in sets:
            folder = work / "images" / pset.name
            folder.mkdir(parents=True)
            task = progress.add_task(f"infer: {pset.name}", total=len(pset.items))
            for start in range(0, len(pset.items), cfg.batch_size):
                chunk = list(enumerate(pset.items))[start : start + cfg.batch_size]
                images = generate(pipe, [it.prompt for _, it in chunk], [it.seed for _, it in chunk], cfg.steps,
                                  cfg.guidance_scale, subject.resolution)
                for (i, item), image in zip(chunk, images):
                    rel = f"images/{pset.name}/{i:04d}.png"
                    image.save(work / rel)
                    samples.append({"prompt_set": pset.name, "prompt": item.prompt, "identifier": info["identifier"],
                                    "class_word": subject.class_word, "seed": item.seed, "path": rel})
                progress.advance(task, len(chunk))
        (work / "samples.json").write_text(json.dumps(samples, indent=2))
        (work / "prompt_sets.json").write_text(json.dumps(prompt_sets_to_json(sets), indent=2))
        write_manifest(work, "infer", params, {"refine": Path(refine_dir), "finetune": finetune_dir},
                       method=info["method"], scheduler=cfg.scheduler)
    return Path(out)
