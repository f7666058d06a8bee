"""`RUN/tracking/state.json`: the local record of what a run directory holds in MLflow (which runs exist, which
upload steps are checked off), which survives a dead server and lets `subjectops sync` finish the upload later."""

from __future__ import annotations

import json
import time
from pathlib import Path

from subjectops.config import Params
from subjectops.tracking import StageCatalog
from subjectops.tracking.client import TrackingError

STATE_FILE = "tracking/state.json"


def now_ms() -> int:
    return int(time.time() * 1000)


class RunState:
    """`RUN/tracking/state.json`: which MLflow runs exist for this run directory and what is uploaded."""

    def __init__(self, run_dir: Path, data: dict | None = None):
        self.run_dir = Path(run_dir)
        self.data = data or {
            "version": 1,
            "tracking_uri": None,
            "experiment": None,
            "experiment_id": None,
            "params": {},
            "parent": {"run_id": None, "start": None, "end": None, "status": "RUNNING", "done": []},
            "stages": {},
            "order": [],
            "offline": False,
            "offline_reason": None,
            "register": {"wanted": False, "done": False},
            "pending": True,
        }

    @property
    def path(self) -> Path:
        return self.run_dir / STATE_FILE

    @classmethod
    def load(cls, run_dir: Path) -> RunState | None:
        p = Path(run_dir) / STATE_FILE
        if not p.is_file():
            return None
        try:
            return cls(run_dir, json.loads(p.read_text()))
        except ValueError as exc:
            raise TrackingError(f"{p} is not valid JSON ({exc})",
                                fix="delete it and run `subjectops sync` to rebuild the record") from None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def stage(self, name: str) -> dict:
        return self.data["stages"][name]

    def add_stage(self, name: str, out_dir: Path) -> dict:
        st = self.data["stages"].get(name)
        if st is None or st.get("end") is not None:
            # a stage re-run inside the same run directory gets a fresh record
            st = {"out_dir": str(Path(out_dir).resolve()), "run_id": None, "start": now_ms(), "end": None,
                  "status": "RUNNING", "done": []}
            self.data["stages"][name] = st
            if name in self.data["order"]:
                self.data["order"].remove(name)
            self.data["order"].append(name)
        return st

    def everything_uploaded(self) -> bool:
        parent = self.data["parent"]
        if "end" not in parent["done"]:
            return False
        if any("end" not in s["done"] for s in self.data["stages"].values()):
            return False
        reg = self.data["register"]
        return not (reg.get("wanted") and not reg.get("done"))

    def forget_runs(self) -> None:
        """Drop every recorded run id (another server, or one that was wiped): the runs are created again."""
        self.data["parent"].update(run_id=None, done=[])
        for s in self.data["stages"].values():
            s.update(run_id=None, done=[])
        if self.data["register"].get("done"):
            self.data["register"]["done"] = False


def state_from_directory(run_dir: Path, stages: StageCatalog) -> RunState:
    """A record for a run directory made without a tracker: its stages, from their manifests."""
    st = RunState(run_dir)
    params = None
    for name in stages.order:
        m = run_dir / name / "manifest.json"
        if not m.is_file():
            continue
        manifest = json.loads(m.read_text())
        params = params or manifest.get("params")
        mtime = int(m.stat().st_mtime * 1000)
        created = manifest.get("created")
        st.data["stages"][name] = {"out_dir": str((run_dir / name).resolve()), "run_id": None, "start": mtime,
                                   "end": mtime, "status": "FINISHED", "done": [], "created": created}
        st.data["order"].append(name)
    if not st.data["order"]:
        raise TrackingError(f"{run_dir} holds no stage output (no */manifest.json)",
                            fix="pass a run directory written by `subjectops run`")
    p = Params.model_validate(params or {})
    st.data["params"] = p.model_dump(mode="json")
    starts = [s["start"] for s in st.data["stages"].values()]
    st.data["parent"].update(start=min(starts), end=max(starts), status="FINISHED")
    st.data["register"]["wanted"] = stages.wants_registration(p) and "register" not in st.data["order"]
    st.data["experiment"] = p.tracking.experiment
    return st
