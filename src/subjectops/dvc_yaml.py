"""dvc.yaml, generated from the stage registry: `subjectops dvc-yaml SUBJECT --class WORD [--out dvc.yaml]`.

Each registered stage becomes one DVC stage that calls its CLI command with every input it reads, depends on
those outputs, its module and its declared code, and lists its declared params plus the keys that decide whether
it runs and what it reads (found by planning variants of the params: `stages.plan.keys_changing_the_plan`).
The repository's dvc.yaml is this file for the example subject (`make generate`; a test keeps it fresh), so a new
stage reaches DVC without an edit.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from subjectops.stages.base import Stage
from subjectops.stages.plan import keys_changing_the_plan
from subjectops.stages.registry import all_stages, get_stage

ROOT = "runs/dvc"

HEADER = """\
# Generated from the stage registry by `{command}`:
# edit the stages' modules (src/subjectops/stages/), then run `make generate`. Each stage calls the same CLI as
# `subjectops run` and Kubeflow. `params:` lists the params.yaml keys each stage reads (its module's `params`) and the
# keys that decide whether it runs and what it reads, so changing an evaluation parameter re-runs only `sweep` and
# `evaluate`, and `dvc exp run -S finetune.lora.lr=2e-4` re-runs finetune onwards. Outputs are DVC-cached (class
# priors and the trained weights included) and pushed to the default remote.
#
# DVC has no conditional stages: an optional stage runs with --if-needed, so when `plan(params)` leaves it out it
# records why in its manifest and costs nothing, and later stages ignore that record (`dvc exp run -S
# finetune.method=hypnos` then trains the discriminator, `-S 'finetune.snapshots=[100,200,400,800]'` sweeps the
# snapshots). Registration is not a DVC stage (it needs a tracking server): `subjectops register {root}`.

"""


def _covered(key: str, listed: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in listed)


def stage_entry(stage: Stage, deciding: set[str], arguments: dict[str, str]) -> dict:
    """One DVC stage. `arguments` gives the stage's own arguments by name (a folder argument is also a dependency)."""
    out = f"{ROOT}/{stage.name}"
    own: list[str] = []
    folders: list[str] = []
    for arg in stage.arguments:
        if arg.name not in arguments:
            continue
        own += [arguments[arg.name]] if arg.flag is None else [arg.flag, arguments[arg.name]]
        folders += [arguments[arg.name]] if arg.folder else []
    inputs = [a for name in stage.reads for a in (f"--{get_stage(name).option}", f"{ROOT}/{name}")]
    cmd = ["subjectops", stage.command, *own, *(["--if-needed"] if stage.optional else []), *inputs, "--out", out]
    params = list(stage.params)
    params += [key for key in sorted(deciding) if not _covered(key, params)]
    entry = {"cmd": " ".join(cmd),
             "deps": [*folders, *(f"{ROOT}/{name}" for name in stage.reads), f"src/subjectops/stages/{stage.name}.py",
                      *stage.code],
             "params": params,
             "outs": [f"{out}/{f}" for f in stage.dvc_outs] or [out]}
    if stage.dvc_metrics:
        entry["metrics"] = [{f"{out}/{stage.dvc_metrics}": {"cache": False}}]
    return {k: v for k, v in entry.items() if v}


def render(params_data: dict, subject: str, class_word: str) -> str:
    """dvc.yaml for one subject folder (a path relative to the repository) under the params `params_data`."""
    deciding = keys_changing_the_plan(params_data)
    arguments = {"subject_dir": subject, "class_word": class_word}
    stages = {stage.name: stage_entry(stage, deciding.get(stage.name, set()), arguments)
              for stage in all_stages() if not stage.tracked}
    command = f"subjectops dvc-yaml {subject} --class {class_word}"
    body = "\n".join(textwrap.indent(yaml.safe_dump({name: entry}, sort_keys=False, width=200), "  ")
                     for name, entry in stages.items())
    return HEADER.format(command=command, root=ROOT) + "stages:\n" + body


def write(params_path: Path, subject: str, class_word: str, out: Path, check: bool = False) -> bool:
    """Write dvc.yaml (or, with `check`, say whether `out` already holds it); True when `out` is up to date."""
    from subjectops.params_yaml import parse_yaml

    data = parse_yaml(Path(params_path).read_text(), str(params_path)) if Path(params_path).is_file() else {}
    text = render(data, subject, class_word)
    fresh = out.is_file() and out.read_text() == text
    if not check and not fresh:
        out.write_text(text)
    return fresh
