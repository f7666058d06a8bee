"""`subjectops generate`: images of the subject from a finished run or a registered model, drawn by the very strategy
infer used (the run's recorded `InferenceSpec`, or the one the registered model carries), so a prompt and seed give
the image infer wrote for them. Not a stage: it reads a run (or the registry) and writes only its `--out` folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from subjectops.config import MemoryCfg, ModelCfg
from subjectops.errors import SubjectopsError
from subjectops.inference import InferenceSpec, StageInputs, Strategy, load_strategy, memory_savers
from subjectops.inference.base import fill_subject
from subjectops.stages.common import stage_output

RECORD = "generated.json"


@dataclass
class Source:
    """A loaded model to draw from: its strategy, what `{subject}` stands for, and the first seed infer used."""

    strategy: Strategy
    identifier: str
    class_word: str
    seed: int
    name: str  # the run folder or model URI, for the record


def from_run(run_dir: Path, memory: MemoryCfg) -> Source:
    """The run's finetune through the strategy, scheduler, steps and base model its infer stage recorded."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "infer" / "manifest.json"
    if not (run_dir / "finetune" / "method.json").is_file() or not manifest_path.is_file():
        raise SubjectopsError(f"{run_dir} holds no finished finetune and infer output: generate draws with the "
                              "strategy infer recorded for the run's weights",
                              fix=f"run `subjectops infer --run {run_dir}` (or the whole run) first, or pass "
                                  "--model-uri models:/NAME@champion")
    manifest = json.loads(manifest_path.read_text())
    info = json.loads((run_dir / "finetune" / "method.json").read_text())
    apply_savers = memory_savers(memory)
    inputs = StageInputs(model=ModelCfg.model_validate(manifest["params"]["model"]), finetune=run_dir / "finetune",
                         refine=run_dir / "refine" if (run_dir / "refine").is_dir() else None)
    strategy = load_strategy(InferenceSpec.model_validate(manifest["inference"]), inputs)
    apply_savers(strategy.pipe)
    return Source(strategy, info["identifier"], info["class_word"], manifest["params"]["infer"]["seed"], str(run_dir))


def from_model_uri(uri: str, memory: MemoryCfg, tracking_uri: str | None = None) -> Source:
    """A registered version (`models:/NAME@champion`, `models:/NAME/3`) loaded as MLflow serves it."""
    import mlflow
    import mlflow.artifacts
    import mlflow.pyfunc

    from subjectops.tracking.client import resolve_tracking_uri, setup_environment

    apply_savers = memory_savers(memory)
    setup_environment()
    server = resolve_tracking_uri(tracking_uri)
    try:
        # downloaded from the server named here, then loaded from disk: mlflow's process-wide tracking URI is left
        # as it was (a later call in the same process must not talk to this server)
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=server, registry_uri=server)
        served = mlflow.pyfunc.load_model(local).unwrap_python_model()
    except mlflow.exceptions.MlflowException as exc:
        raise SubjectopsError(f"cannot load {uri} from {server}: {exc.message}",
                              fix="check the model name and alias (`subjectops register RUN` makes versions, "
                                  "`subjectops promote` moves champion), and --tracking-uri or MLFLOW_TRACKING_URI"
                              ) from None
    apply_savers(served.strategy.pipe)
    cfg = served.cfg
    return Source(served.strategy, cfg.get("identifier") or "", cfg.get("class_word") or "", int(cfg.get("seed", 0)),
                  uri)


def generate(source: Source, prompt: str, out: Path, negative_prompt: str | None = None, seed: int | None = None,
             num_images: int = 1) -> list[Path]:
    """`num_images` images of `prompt` (`{subject}` = identifier and class word) from seeds `seed`, `seed + 1`, ...
    (default: the first seed infer used), into `out/NNNN.png` with `out/generated.json` saying how each was made."""
    strategy = source.strategy
    if negative_prompt is not None and not strategy.takes_negative_prompt:
        raise SubjectopsError(f"the {strategy.spec.strategy!r} inference strategy of {source.name} draws without a "
                              "negative prompt",
                              fix="drop --negative-prompt (the plain strategy takes one)")
    text = fill_subject(prompt, source.identifier, source.class_word)
    first = source.seed if seed is None else seed
    strategy.negative_prompt = negative_prompt
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise SubjectopsError(f"{out} is a folder with other files in it; generate replaces its --out folder",
                              fix="pass a new or empty --out folder (or one an earlier generate wrote)")
    from subjectops.console import progress

    with stage_output(out) as work, progress(transient=True) as shown:
        task = shown.add_task("generate", total=num_images)
        images = []
        for i in range(num_images):
            name = f"{i:04d}.png"
            strategy.generate([text], [first + i])[0].save(work / name)
            images.append({"path": name, "seed": first + i})
            shown.advance(task)
        record = {"source": source.name, "prompt": text, "negative_prompt": negative_prompt,
                  "inference": strategy.spec.model_dump(mode="json"), "images": images}
        (work / RECORD).write_text(json.dumps(record, indent=2))
    return [out / image["path"] for image in images]
