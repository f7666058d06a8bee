"""Several processes opening one fresh sqlite MLflow store at the same moment, as the parallel register steps of a
benchmark under kfp.local do: every one of them gets a working store (without the lock in
`tracking.client.mlflow_client`, all but one fail while MLflow creates the tables)."""

import subprocess
import sys
import time

PROCESSES = 2

# Imports first (seconds), then wait at the gate, so that every process opens the store at the same moment.
WORKER = """
import sys, time
from pathlib import Path

from subjectops.tracking.client import mlflow_client

uri, gate, ready = sys.argv[1:]
Path(ready).touch()
while not Path(gate).exists():
    time.sleep(0.005)
client = mlflow_client(uri)
experiment = client.get_experiment_by_name("Default")
run = client.create_run(experiment.experiment_id)
print(run.info.run_id)
"""


def test_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    gate = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, str(gate), str(tmp_path / f"ready-{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(PROCESSES)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker died before the gate"
        time.sleep(0.05)
    gate.touch()
    results = [p.communicate(timeout=120) for p in procs]
    failures = [err[-2000:] for p, (_, err) in zip(procs, results) if p.returncode != 0]
    assert not failures, failures[0]
    run_ids = {out.strip() for out, _ in results}
    assert len(run_ids) == PROCESSES  # each process made its own run in the one store
    runs = MlflowClient(tracking_uri=uri).search_runs(["0"])
    assert {r.info.run_id for r in runs} == run_ids
