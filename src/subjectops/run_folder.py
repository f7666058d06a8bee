"""A run folder's own record and what may be written into it.

`subjectops run` writes `RUN/run.json` (which subject and class the folder is the run of) and `RUN/params.yaml`
(the run's resolved params, which stage commands on the folder read). Before any work, `check_out_folder` refuses
an `--out` that would lose something: a folder that is not a subjectops run, the run of another subject, the
subject folder itself, or a stage folder holding files its stage did not write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import yaml

from subjectops.config import Params
from subjectops.errors import SubjectopsError
from subjectops.runlock import LOCK_FILE

RUN_FILE = "run.json"
PARAMS_FILE = "params.yaml"
MANIFEST = "manifest.json"
SHOWN = 5  # how many unexpected files an error names


def run_params_file(run_dir: Path | None) -> Path | None:
    """`RUN/params.yaml` when `run_dir` is a run folder that has one."""
    if run_dir is None:
        return None
    path = Path(run_dir) / PARAMS_FILE
    return path if path.is_file() else None


def write_run_record(run_dir: Path, params: Params, subject_dir: Path, class_word: str) -> None:
    run_dir = Path(run_dir)
    (run_dir / RUN_FILE).write_text(json.dumps({"subject": Path(subject_dir).resolve().name, "class_word": class_word,
                                                "subject_dir": str(Path(subject_dir).resolve())}, indent=2))
    (run_dir / PARAMS_FILE).write_text(
        "# The resolved params of this run (params file, --set, --method, --model), written by `subjectops run`.\n"
        "# Stage commands given this run folder (`subjectops evaluate RUN`) read them unless --params is given.\n"
        + yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))


def recorded_subject(run_dir: Path) -> tuple[str, str] | None:
    """(subject, class word) of the run in `run_dir`, from its run.json or else its refine output; None when the
    folder holds no subjectops run."""
    run_dir = Path(run_dir)
    for record, name_key in ((run_dir / RUN_FILE, "subject"), (run_dir / "refine" / "subject.json", "name")):
        try:
            data = json.loads(record.read_text())
            return str(data[name_key]), str(data["class_word"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def foreign_files(stage_dir: Path) -> list[str]:
    """Files in a stage's output folder that its manifest does not list (all of them when it has no manifest)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    try:
        written = set(json.loads((stage_dir / MANIFEST).read_text()).get("outputs", {}))
    except (OSError, ValueError, AttributeError):
        written = set()
    return [p.relative_to(stage_dir).as_posix() for p in sorted(stage_dir.rglob("*"))
            if not p.is_dir() and p.name != MANIFEST and p.relative_to(stage_dir).as_posix() not in written]


def check_out_folder(out: Path, subject_dir: Path, class_word: str, stages: Iterable[str], force: bool) -> None:
    """Refuse, before any work, an `--out` whose content a run would lose (see the module's docstring); `force`
    lets the run write beside or over another run's folder, never inside the subject folder."""
    out, subject = Path(out).resolve(), Path(subject_dir).resolve()
    if out == subject or subject in out.parents:
        raise SubjectopsError(f"--out {out} is inside the subject folder {subject}: the run's folders would become "
                              "part of the photos", fix="choose an --out outside the subject folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise SubjectopsError(f"--out {out} is a file, not a folder", fix="choose a new folder for --out")
    content = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)  # a lock alone: a run that wrote nothing
    if not content:
        return
    forcing = "or pass --force to write the run there anyway (files subjectops did not write are kept)"
    recorded = recorded_subject(out)
    if recorded is None and not force:
        raise SubjectopsError(f"--out {out} is not a subjectops run folder and holds {len(content)} entries "
                              f"({_names(content)})", fix=f"choose a new or empty folder for --out, {forcing}")
    if recorded is not None and recorded != (subject.name, class_word) and not force:
        raise SubjectopsError(f"--out {out} holds the run of another subject ({recorded[0]!r}, class "
                              f"{recorded[1]!r}), not of {subject.name!r} as a {class_word!r}",
                              fix="choose another --out (without --out every run gets its own folder), or pass "
                                  "--force to replace that run's stages")
    foreign = [f"{name}/{f}" for name in stages for f in foreign_files(out / name)]
    if foreign and not force:
        raise SubjectopsError(f"--out {out} has files that subjectops did not write where the run writes its stages "
                              f"({_names(foreign)})",
                              fix=f"move them out of {out}, {forcing.replace('kept', 'moved aside, not deleted')}")


def _names(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
