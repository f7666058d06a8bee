"""What every stage shares: atomic output directories, content hashes and the manifest."""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
from contextvars import ContextVar
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

from subjectops import __version__, threads
from subjectops.config import Params
from subjectops.console import console
from subjectops.digest import digest_json, sha256_file
from subjectops.errors import SubjectopsError
from subjectops.preflight import out_of_space, require_writable
from subjectops.run_folder import foreign_files

MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint"
# What the output a stage is writing is made from (`stages/incremental.py` sets it, with that output's folder, while
# the stage runs): its manifest records it before the output is published, so a published output always says what
# it was made from (written after publishing, a kill in between left a finished output that had to be made again).
MADE_FROM: ContextVar[tuple[Path, dict] | None] = ContextVar("made_from", default=None)


def file_hashes(root: Path) -> dict[str, str]:
    root = Path(root)
    return {f.relative_to(root).as_posix(): sha256_file(f)
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != MANIFEST}


def hash_dir(root: Path) -> str:
    """One hash for a directory's content (relative paths and file hashes; the manifest excluded)."""
    return digest_json(file_hashes(root), short=False)


def versions() -> dict[str, str]:
    # read from the installed distributions: importing diffusers to ask its version costs a light stage 4 s
    return {"python": platform.python_version(),
            **{name: version(name) for name in ("torch", "diffusers", "transformers")},
            "subjectops": __version__}


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def stage_output(out: Path, keep_on_error: bool = False, publish: bool = True) -> Iterator[Path]:
    """Yield a work directory `<out>.partial`; on success it replaces `<out>` in one rename.

    A failed run never destroys an earlier complete output. `keep_on_error` keeps the work directory
    (finetune's checkpoints) so the next attempt resumes instead of starting over. `publish=False` is for
    the non-main processes of a distributed run: they share the work directory and leave the rename alone.
    """
    out = Path(out)
    require_writable(out.parent, f"the folder of {out.name} (--out)")
    work = partial_dir(out)
    if work.exists() and not keep_on_error:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException as exc:
        if not keep_on_error:
            shutil.rmtree(work, ignore_errors=True)
        full = out_of_space(exc, out, work, keep_on_error)
        if full is not None:
            raise full from None
        raise
    if not publish:
        return
    if out.exists():
        _remove_earlier(out)
    work.rename(out)


def _remove_earlier(out: Path) -> None:
    """Delete an earlier output, unless it holds files its stage did not write: then it is renamed aside, whole."""
    foreign = foreign_files(out)
    if not foreign:
        shutil.rmtree(out)
        return
    aside = out.with_name(f"{out.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    console.print(f"[yellow]{out} held files {out.name} did not write ({', '.join(foreign[:5])}): "
                  f"the earlier folder is kept as {aside}", highlight=False, soft_wrap=True)


def write_manifest(work: Path, stage: str, params: Params, inputs: dict[str, Path | None], **extra) -> dict:
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": params.model_dump(mode="json"),
        "inputs": {name: {"path": str(path), "sha256": hash_dir(path) if Path(path).is_dir() else sha256_file(path)}
                   for name, path in inputs.items() if path is not None},
        "outputs": file_hashes(work),
        "versions": versions(),
        "threads": threads.record(),  # the compute threads this process chose, and why (subjectops.threads)
        **extra,
    }
    made_from = MADE_FROM.get()
    if made_from is not None and Path(work).resolve() == partial_dir(made_from[0]).resolve():
        manifest[FINGERPRINT] = made_from[1]
    (Path(work) / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def require_stage_dir(path: Path | None, stage: str, needed_by: str) -> Path:
    """An input stage directory must exist and be complete (have its manifest)."""
    if path is None or not (Path(path) / MANIFEST).exists():
        from subjectops.stages.registry import get_stage

        source = get_stage(stage)
        raise SubjectopsError(
            f"{needed_by} needs the output of `{stage}`, but {path} is not a complete {stage} output (no {MANIFEST})",
            fix=f"run `subjectops {source.command}` first, or pass the right --{source.option} directory",
        )
    return Path(path)


def planned_inputs(params: Params, stage: str, given: dict[str, Path | None]) -> dict[str, Path | None]:
    """The input directories `stage` reads under `plan(params)`: each planned input must be a complete output
    that did real work; an input the plan leaves out is None, even when given (DVC passes every path, and an
    `--if-needed` stage that was not needed leaves an output that only records why)."""
    from subjectops.stages.plan import plan
    from subjectops.stages.registry import get_stage

    wanted = plan(params).inputs(stage)
    command = get_stage(stage).command
    resolved: dict[str, Path | None] = {}
    for name, path in given.items():
        if name not in wanted:
            resolved[name] = None
            continue
        path = require_stage_dir(path, name, command)
        skipped = json.loads((path / MANIFEST).read_text()).get("skipped")
        if skipped:
            raise SubjectopsError(
                f"{command} needs the output of `{name}` under these params, but {path} records that "
                f"{name} was skipped ({skipped})",
                fix=f"run `subjectops {get_stage(name).command}` again with the same params and --set overrides")
        resolved[name] = path
    return resolved


def not_needed(stage: str, params: Params, out: Path, reason: str) -> Path:
    """An output that records why a stage had nothing to do (DVC has no conditional stages, so `dvc.yaml`
    runs `priors` and `pretrain-disc` with --if-needed and the method decides)."""
    with stage_output(out) as work:
        write_manifest(work, stage, params, {}, skipped=reason)
    return Path(out)
