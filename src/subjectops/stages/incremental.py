"""Incremental reruns, decided as DVC decides: a stage whose finished output was made from the same inputs, the
same values of the params keys it reads, the same arguments and the same code is kept, not run again.

What an output was made from (its fingerprint) is recorded in its manifest when the stage finishes. Every part
comes from the stage's declaration in the registry, none from the stage's own code:

- inputs: the content hash of each planned input folder (`reads`) and of each folder argument (the photos);
- params: the value of each declared key (`params`: a section or a dotted key);
- arguments: the value of every other argument that shapes the output (`--class`);
- code: the hash of the stage's module and its declared `code` paths, and the library versions.

An output is kept only when its files still have the hashes its manifest records (nothing edited, nothing
missing). A kept output has the content the later stages recorded, so they are kept too unless their own
declaration changed; a rerun output with other content reruns every stage that reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import subjectops
from subjectops.digest import digest_json, sha256_file
from subjectops.stages.base import Stage, StageContext
from subjectops.stages.common import FINGERPRINT, MADE_FROM, MANIFEST, hash_dir, versions

NO_OUTPUT = "no finished output yet"
SRC_PREFIX = "src/subjectops/"  # how the registry names code paths (as dvc.yaml does)


class ContentHashes:
    """Content hashes of folders and files, each computed once per run (a stage's output is hashed to check it
    and again as the input of every later stage). `forget` a folder a stage has just rewritten."""

    def __init__(self) -> None:
        self._known: dict[Path, str] = {}

    def of(self, path: Path) -> str:
        path = Path(path).resolve()
        if path not in self._known:
            self._known[path] = hash_dir(path) if path.is_dir() else sha256_file(path) if path.exists() else "missing"
        return self._known[path]

    def forget(self, path: Path) -> None:
        self._known.pop(Path(path).resolve(), None)


def code_hash(stage: Stage) -> str:
    """The stage's module and its declared code paths, file by file (compiled caches left out)."""
    package = Path(subjectops.__file__).resolve().parent
    files: dict[str, str] = {}
    for declared in (f"{SRC_PREFIX}stages/{stage.name}.py", *stage.code):
        root = package / declared.removeprefix(SRC_PREFIX)
        found = sorted(root.rglob("*")) if root.is_dir() else [root] if root.exists() else []
        for f in found:
            if f.is_file() and "__pycache__" not in f.parts:
                files[f.relative_to(package).as_posix()] = sha256_file(f)
        if not found:
            files[declared] = "missing"
    return digest_json(files, short=False)


def param_value(params: Mapping[str, Any], key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def fingerprint(stage: Stage, ctx: StageContext, hashes: ContentHashes) -> dict:
    """What `stage` makes its output from, by its declaration (see the module's docstring)."""
    dumped = ctx.params.model_dump(mode="json")
    arguments: dict[str, Any] = {}
    for arg in stage.arguments:
        value = ctx.args.get(arg.name)
        if not arg.shapes_output or value is None:
            continue
        # a folder by its name and content, wherever it lies (a copied subject folder is the same subject)
        arguments[arg.name] = {"name": Path(value).name, "sha256": hashes.of(value)} if arg.folder else value
    return {"inputs": {name: hashes.of(path) for name, path in sorted(ctx.inputs.items()) if path is not None},
            "arguments": arguments,
            "params": {key: param_value(dumped, key) for key in stage.params},
            "code": code_hash(stage),
            "versions": versions()}


def reason_to_run(stage: Stage, ctx: StageContext, hashes: ContentHashes) -> str | None:
    """Why `stage` must run into `ctx.out`, or None when its finished output there can be kept."""
    manifest_path = Path(ctx.out) / MANIFEST
    if not manifest_path.is_file():
        return NO_OUTPUT
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return f"its {MANIFEST} cannot be read"
    if manifest.get("skipped"):
        return "its output records that it was not needed then"
    recorded = manifest.get(FINGERPRINT)
    if not isinstance(recorded, dict):
        return "its output does not record what it was made from (an older subjectops made it)"
    if hashes.of(ctx.out) != digest_json(manifest.get("outputs", {}), short=False):
        return "its output's files changed since it was made"
    now = fingerprint(stage, ctx, hashes)
    changed = _changed_params(recorded.get("params", {}), now["params"])
    if changed:
        return "params changed: " + ", ".join(changed)
    for part, what in (("inputs", "input"), ("arguments", "argument")):
        names = sorted(n for n in set(recorded.get(part, {})) | set(now[part])
                       if recorded.get(part, {}).get(n) != now[part].get(n))
        if names:
            return f"{what}{'s' if len(names) > 1 else ''} changed: " + ", ".join(names)
    if recorded.get("code") != now["code"]:
        return "its code changed"
    if recorded.get("versions") != now["versions"]:
        return "library versions changed"
    return None


def _changed_params(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ, down to the leaves (`evaluate.batch_size`)."""
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{k}" for k in _changed_params(old, new)]
        elif old != new:
            changed.append(key)
    return changed


def run_stage(stage: Stage, ctx: StageContext, hashes: ContentHashes | None = None) -> None:
    """Run the stage; its manifest records what its output was made from (`common.MADE_FROM`)."""
    hashes = hashes or ContentHashes()
    token = MADE_FROM.set((Path(ctx.out), fingerprint(stage, ctx, hashes)))
    try:
        stage.run(ctx)
    finally:
        MADE_FROM.reset(token)
    hashes.forget(ctx.out)
