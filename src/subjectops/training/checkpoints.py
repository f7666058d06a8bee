"""Checkpoints that are safe to load and exact to resume, and the step log that survives a kill.

A checkpoint is a directory `step_NNNNNN/` holding `tensors.safetensors` (every tensor of the state: weights,
optimizer moments, RNG states) and `state.json` (everything else, with each tensor replaced by a reference).
Nothing is ever unpickled: run folders sit on shared volumes, and loading a pickle runs whatever code it names.
A checkpoint folder that holds anything else is refused, naming the file, before anything in it is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from subjectops.errors import SubjectopsError

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
CHECKPOINT_DIR = re.compile(r"^step_(\d{6,})$")
TMP_SUFFIX = ".tmp"
KEEP = 2  # checkpoints kept: the newest may be cut short by a full disk; the one before it then resumes


# --- nested state <-> (JSON, tensors) ------------------------------------------------------------------------
def flatten_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, scalars, tensors) into JSON and a flat dict of tensors.

    Tensors become {"__tensor__": key}; dicts with non-string keys (optimizer states are keyed by parameter
    index) and tuples are tagged so that `unflatten_state` gives back exactly what was saved.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: walk(v, f"{path}.{k}") for k, v in value.items()}
            return {"__items__": [[k, walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"checkpoint state at {path!r} is a {type(value).__name__}; only tensors and JSON values are "
                        "saved")

    return walk(state, "state"), tensors


def unflatten_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [unflatten_state(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if set(data) == {"__tensor__"}:
        return tensors[data["__tensor__"]]
    if set(data) == {"__items__"}:
        return {k: unflatten_state(v, tensors) for k, v in data["__items__"]}
    if set(data) == {"__tuple__"}:
        return tuple(unflatten_state(v, tensors) for v in data["__tuple__"])
    return {k: unflatten_state(v, tensors) for k, v in data.items()}


# --- checkpoint directories ------------------------------------------------------------------------------------
def save_checkpoint(ckpt_dir: Path, step: int, state: dict) -> Path:
    """Write `step_NNNNNN/` atomically (a kill mid-write leaves only a `.tmp` directory) and keep the newest KEEP."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / (final.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    data, tensors = flatten_state(state)
    save_file(tensors, tmp / TENSORS_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(data))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(ckpt_dir)[:-KEEP]:
        shutil.rmtree(old)
    return final


def checkpoint_dirs(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first. Refuses a folder holding anything a checkpoint is not made of."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in sorted(ckpt_dir.iterdir()):
        if entry.is_dir() and entry.name.endswith(TMP_SUFFIX) and CHECKPOINT_DIR.match(entry.name[: -len(TMP_SUFFIX)]):
            continue  # our own write, cut short by a kill: never read, replaced by the next save
        if entry.is_dir() and not entry.is_symlink() and CHECKPOINT_DIR.match(entry.name):
            extra = sorted(p.name for p in entry.iterdir() if p.name not in (STATE_FILE, TENSORS_FILE))
            if extra:
                _refuse(entry / extra[0])
            found.append(entry)
            continue
        _refuse(entry)
    return found


def _refuse(path: Path) -> None:
    raise SubjectopsError(
        f"{path} is not part of a subjectops checkpoint (step_NNNNNN/ with {STATE_FILE} and {TENSORS_FILE}); "
        "subjectops never loads pickles or unknown files from a run folder",
        fix=f"delete {path} (or the whole {path.parent} folder to start fresh), then run finetune again",
    )


def load_checkpoint(path: Path) -> dict:
    """Read one checkpoint directory: safetensors and JSON only."""
    path = Path(path)
    try:
        tensors = load_file(path / TENSORS_FILE)
        data = json.loads((path / STATE_FILE).read_text())
    except (OSError, SafetensorError, ValueError) as exc:
        raise SubjectopsError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})",
                              fix=f"delete {path}; finetune then resumes from an earlier checkpoint or starts over",
                              ) from None
    return unflatten_state(data, tensors)


# --- the step log -----------------------------------------------------------------------------------------------
class StepLog:
    """`train_log.jsonl`, one JSON record per optimizer step. Each checkpoint carries the records of its steps
    (`Trainer._save_checkpoint`), and resuming from it rewrites the log from them: steps written after the last
    checkpoint and before a kill appear once, not twice, and a retried pod that finds only the checkpoint (on
    the model-cache volume) still gets the whole log."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    def open(self, kept: list[dict]) -> StepLog:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._fh = self.path.open("a")
        return self

    def read(self) -> list[dict]:
        """The complete records (a kill can cut the last line short)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
