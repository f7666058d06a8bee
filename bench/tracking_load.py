"""MLflow under the benchmark's parallelism: 16 concurrent personalize runs' tracking calls against a tracking
server on each backend store (sqlite, PostgreSQL), then everything counted back.

    python bench/tracking_load.py [--runs 16] [--steps 200] [--backends sqlite postgresql] [--time-limit 300]

Each simulated run makes the calls subjectops' MlflowTracker and register stage make, in the same order: a
parent run with params and tags, one nested run per stage with params, per-step training metrics in batches,
evaluation metrics and artifact files, then a model version of one shared registered model (created by
whichever run gets there first) with an alias of its own and the challenger alias. The servers are started
here on 127.0.0.1 (tests/servers.py: `mlflow server --workers 1` as in the chart, artifacts in a local
directory, PostgreSQL from Debian's package in a temporary cluster) and stopped at the end.

Counted back per backend: parent and nested runs, metric steps (every run's full history), artifacts,
model versions and aliases pointing at the right run; `lost` is what was sent without an error and is
missing. Bounded: at most `--runs` runs, and nothing is sent after `--time-limit` seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import postgres_database, start_mlflow, start_postgres, stop_postgres  # noqa: E402

STAGES = ("refine", "priors", "finetune", "infer", "evaluate")
PARAMS_PER_RUN = 40
PARAMS_PER_STAGE = 8
STEPS_PER_BATCH = 50  # per-step metrics go in log_batch chunks, as the tracker sends them
ARTIFACTS_PER_STAGE = 2
MODEL_NAME = "load-teapot"


class Calls:
    """Counts calls and errors across threads; an error is kept with what was being done."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.calls = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, what: str, fn, *args, **kwargs):
        if time.monotonic() > self.deadline:
            raise TimeoutError("time limit reached")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the others
            with self.lock:
                self.errors.append(f"{what}: {type(exc).__name__}: {str(exc)[:160]}")
            raise
        finally:
            with self.lock:
                self.calls += 1


def one_run(uri: str, experiment_id: str, index: int, steps: int, call: Calls, scratch: Path, sent: dict) -> None:
    """One personalize run's tracking calls; `sent` counts what was sent without an error, as it goes."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    files = scratch / f"run-{index}"
    files.mkdir()
    for k in range(ARTIFACTS_PER_STAGE):
        (files / f"out-{k}.json").write_text(f'{{"run": {index}, "file": {k}}}')
    parent = call("create parent run", client.create_run, experiment_id, run_name=f"load-{index}",
                  tags={"subjectops.load_index": str(index)}).info.run_id
    sent["runs"] += 1
    call("log params", client.log_batch, parent,
         params=[Param(f"p{k}", str(k * index)) for k in range(PARAMS_PER_RUN)])
    for stage in STAGES:
        child = call(f"create {stage} run", client.create_run, experiment_id, run_name=stage,
                     tags={"mlflow.parentRunId": parent, "subjectops.stage": stage}).info.run_id
        sent["runs"] += 1
        call(f"{stage} params", client.log_batch, child,
             params=[Param(f"{stage}.{k}", str(k)) for k in range(PARAMS_PER_STAGE)])
        if stage == "finetune":
            now = int(time.time() * 1000)
            for start in range(0, steps, STEPS_PER_BATCH):
                batch = [Metric("loss", 1.0 / (s + 1), now, s)
                         for s in range(start, min(start + STEPS_PER_BATCH, steps))]
                call("per-step metrics", client.log_batch, child, metrics=batch)
                sent["steps"] += len(batch)
        for k in range(ARTIFACTS_PER_STAGE):
            call(f"{stage} artifact", client.log_artifact, child, str(files / f"out-{k}.json"), stage)
            sent["artifacts"] += 1
        call(f"end {stage} run", client.set_terminated, child)
    call("evaluation metrics", client.log_batch, parent, metrics=[Metric("clip_t", 0.3, int(time.time() * 1000), 0)],
         tags=[RunTag("subjectops.evaluated", "true")])
    call("register: model", register_model_once, client)
    source = call("register: get run", client.get_run, parent).info.artifact_uri + "/finetune"
    version = call("register: version", client.create_model_version, MODEL_NAME, source=source, run_id=parent,
                   tags={"subjectops.load_index": str(index)}).version
    call("register: alias", client.set_registered_model_alias, MODEL_NAME, f"run-{index}", version)
    call("register: challenger", client.set_registered_model_alias, MODEL_NAME, "challenger", version)
    sent["version"] = str(version)
    call("end parent run", client.set_terminated, parent)


def register_model_once(client) -> None:
    """Create the shared registered model unless another run already has (register stage's race, handled alike)."""
    try:
        client.create_registered_model(MODEL_NAME)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise


def count_back(uri: str, experiment_id: str, sent: list[dict], steps: int) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], max_results=5000)
    finetunes = [r for r in runs if r.data.tags.get("subjectops.stage") == "finetune"]
    steps_back = sum(len(client.get_metric_history(r.info.run_id, "loss")) for r in finetunes)
    artifacts_back = sum(len(client.list_artifacts(r.info.run_id, r.data.tags["subjectops.stage"]))
                         for r in runs if "subjectops.stage" in r.data.tags)
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    by_version = {str(v.version): v for v in versions}
    parents = {r.info.run_id: r for r in runs if "subjectops.load_index" in r.data.tags}
    aliases_ok = 0
    for s in sent:
        if s.get("version") is None:
            continue
        index = s["index"]
        alias = client.get_model_version_by_alias(MODEL_NAME, f"run-{index}")
        run = parents.get(alias.run_id)
        aliases_ok += int(alias.version == s["version"] and run is not None
                          and run.data.tags["subjectops.load_index"] == str(index))
    return {"runs": len(runs), "steps": steps_back, "artifacts": artifacts_back, "versions": len(by_version),
            "aliases": aliases_ok}


def load(backend: str, runs: int, steps: int, time_limit: float, workdir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    postgres = start_postgres(workdir / "postgres") if backend == "postgresql" else None
    server = None
    try:
        store = postgres_database(postgres, "mlflow_load") if postgres else None
        server = start_mlflow(workdir / f"mlflow-{backend}", str(workdir / f"artifacts-{backend}"),
                              backend_store_uri=store)
        experiment_id = MlflowClient(server.url).create_experiment(f"load-{backend}")
        call = Calls(time.monotonic() + time_limit)
        scratch = workdir / f"files-{backend}"
        scratch.mkdir()
        sent = [{"index": i, "runs": 0, "steps": 0, "artifacts": 0, "version": None} for i in range(runs)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=runs) as pool:
            futures = [pool.submit(one_run, server.url, experiment_id, i, steps, call, scratch, sent[i])
                       for i in range(runs)]
        elapsed = time.perf_counter() - t0
        back = count_back(server.url, experiment_id, sent, steps)
        totals = {k: sum(s[k] for s in sent) for k in ("runs", "steps", "artifacts")}
        totals["versions"] = sum(s["version"] is not None for s in sent)
        return {"backend": backend, "sent": totals, "back": back, "calls": call.calls, "errors": call.errors,
                "seconds": elapsed, "complete_runs": sum(f.exception() is None for f in futures)}
    finally:
        if server:
            server.stop()
        if postgres:
            stop_postgres(postgres)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=16, help="concurrent personalize runs (the benchmark's parallelism)")
    ap.add_argument("--steps", type=int, default=200, help="training steps logged per run")
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    ap.add_argument("--time-limit", type=float, default=300, help="seconds after which no call is sent")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tracking-load-") as tmp:
        for backend in args.backends:
            (Path(tmp) / backend).mkdir()
            rows.append(load(backend, args.runs, args.steps, args.time_limit, Path(tmp) / backend))
    print(f"\n{args.runs} concurrent runs x ({len(STAGES)} nested runs, {args.steps} steps, "
          f"{len(STAGES) * ARTIFACTS_PER_STAGE} artifacts, 1 model version + 2 aliases); mlflow server --workers 1")
    header = ("backend", "runs sent/back", "steps sent/back", "artifacts sent/back", "versions sent/back",
              "aliases ok", "errors", "lost", "calls", "calls/s")
    print(" | ".join(header))
    for r in rows:
        s, b = r["sent"], r["back"]
        lost = sum(max(0, s[k] - b[k]) for k in ("runs", "steps", "artifacts", "versions"))
        print(" | ".join([r["backend"], f"{s['runs']}/{b['runs']}", f"{s['steps']}/{b['steps']}",
                          f"{s['artifacts']}/{b['artifacts']}", f"{s['versions']}/{b['versions']}",
                          f"{b['aliases']}/{s['versions']}", str(len(r["errors"])), str(lost), str(r["calls"]),
                          f"{r['calls'] / r['seconds']:.1f}"]))
    for r in rows:
        for error in r["errors"][:5]:
            print(f"  {r['backend']} error: {error}")


if __name__ == "__main__":
    main()
