"""`subjectops sync RUN`: upload what a run directory recorded locally (or a run made without tracking) to
MLflow, through the tracker's public steps, and register its model when the run wants it and has not."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from subjectops.tracking import StageCatalog
from subjectops.tracking.client import TrackingError
from subjectops.tracking.mlflow_tracker import MlflowTracker
from subjectops.tracking.run_state import RunState, state_from_directory


def sync(run_dir: Path, stages: StageCatalog, tracking_uri: str | None = None,
         echo: Callable[[str], None] | None = None) -> dict:
    """Upload a run directory's record to MLflow and register its model with `stages.register` when wanted.

    Returns a summary: parent run id, stages uploaded, registration. Raises TrackingError when the
    server is still unreachable (after retries); the local record is left as it was.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrackingError(f"run directory {run_dir} does not exist",
                            fix="pass the folder `subjectops run --out` wrote")
    st = RunState.load(run_dir)
    if st is None:
        st = state_from_directory(run_dir, stages)
    tr = MlflowTracker(tracking_uri=tracking_uri, echo=echo, stages=stages)
    tr.resume(st)
    tr.upload_parent_start()
    for name in list(st.data["order"]):
        if name == "register" and not (run_dir / "register" / "registration.json").is_file():
            continue
        tr.upload_stage(name)
    reg = st.data["register"]
    if (
        not tr.offline
        and reg.get("wanted")
        and not reg.get("done")
        and st.data["parent"]["status"] == "FINISHED"
        and (run_dir / "finetune" / "method.json").is_file()
    ):
        tr.register_model(stages.register, run_dir, run_dir / "register")
    tr.upload_parent_end()
    st.data["pending"] = not st.everything_uploaded()
    st.save()
    if tr.offline or st.data["pending"]:
        raise TrackingError(
            f"sync of {run_dir} stopped before the end ({st.data.get('offline_reason') or 'incomplete'}); what was "
            "uploaded is recorded",
            fix="run `subjectops sync` again when the server is reachable",
        )
    return {
        "tracking_uri": tr.uri,
        "parent_run_id": st.data["parent"]["run_id"],
        "stages": {n: st.stage(n)["run_id"] for n in st.data["order"]},
        "registered": {k: reg.get(k) for k in ("model_name", "version") if reg.get(k)},
    }
