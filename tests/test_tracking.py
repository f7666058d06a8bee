"""MlflowTracker against a real `mlflow server` (sqlite and PostgreSQL backends, artifacts on SeaweedFS S3).

Stages are simulated by writing their output files (tests/synthetic_runs.py) inside the tracker's
stage contexts, exactly as `subjectops.pipeline.run` calls them, so each test knows what must arrive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import artifact_paths, children
from mlflow.tracking import MlflowClient
from servers import MLFLOW_BUCKET, s3_client
from synthetic_runs import STEPS, synthetic_params, write_stage

from subjectops.stages.catalog import stage_catalog
from subjectops.tracking.client import TrackingError, default_tracking_uri, resolve_tracking_uri
from subjectops.tracking.mlflow_tracker import MlflowTracker
from subjectops.tracking.run_state import RunState
from subjectops.tracking.sync import sync

STAGES = ("refine", "priors", "finetune", "infer", "evaluate")
# What a server stores (a whole run, a sync) is checked on both backend stores, sqlite and PostgreSQL; what the
# client does when the server is down or stops does not depend on the server's store, so those run on sqlite only
# (bench/tracking_load.py counts everything back from both stores under the benchmark's load).


def fake_pipeline(tracker, params, run: Path, on_stage=None) -> None:
    with tracker.pipeline(params, run):
        for name in STAGES:
            with tracker.stage(name, run / name):
                if on_stage:
                    on_stage(name)
                write_stage(run, name, params)
        # the plan's last stage, as pipeline.run calls it
        tracker.register_model(stage_catalog().register, run, run / "register")


def test_default_tracking_uri_is_sqlite_in_project_dir_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns.db" == default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("http://x:1") == "http://x:1"


def test_local_default_sqlite_records_a_run(tmp_path, monkeypatch):
    """Without a server or MLFLOW_TRACKING_URI the run lands in ./mlruns.db."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = synthetic_params()
    tracker = MlflowTracker(echo=lambda m: None, stages=stage_catalog())
    with tracker.pipeline(params, tmp_path / "run"):
        with tracker.stage("refine", tmp_path / "run" / "refine"):
            write_stage(tmp_path / "run", "refine", params)
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    assert (tmp_path / "mlruns.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    run = client.get_run(tracker.state.data["parent"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.base"] == "tiny-sd15"
    assert children(client, run)["refine"].info.status == "FINISHED"


@pytest.mark.mlflow_backends
def test_full_run_parent_nested_params_metrics_artifacts(tmp_path, tracking_uri, s3_server):
    params = synthetic_params()
    run = tmp_path / "run"
    messages = []
    tracker = MlflowTracker(experiment="tracking-test", echo=messages.append, stages=stage_catalog())
    fake_pipeline(tracker, params, run)
    client = MlflowClient(tracking_uri)
    state = RunState.load(run)
    assert state.data["pending"] is False and state.data["offline"] is False
    parent = client.get_run(state.data["parent"]["run_id"])
    assert parent.info.status == "FINISHED"

    # params: the flattened validated config
    assert parent.data.params["finetune.method"] == "lora"
    assert parent.data.params["finetune.lora.rank"] == "2"
    assert json.loads(parent.data.params["finetune.lora.target_modules"]) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert parent.data.params["registry.gates"].startswith("[")
    assert len(parent.data.params) == len([k for k in _flat(params.model_dump(mode="json"))])

    # nested stage runs
    kids = children(client, parent)
    assert set(kids) == set(STAGES) | {"register"}
    assert all(r.info.status == "FINISHED" for r in kids.values())

    # training loss per step
    hist = client.get_metric_history(kids["finetune"].info.run_id, "train/loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(1, STEPS + 1))
    assert sorted(hist, key=lambda m: m.step)[0].value == pytest.approx(1.0)
    assert len(client.get_metric_history(kids["finetune"].info.run_id, "train/terms/prior")) == STEPS

    # every number of metrics.json, named with prompt set and backbone, on the stage and the parent
    ev = kids["evaluate"].data
    rows = json.loads((run / "evaluate" / "metrics.json").read_text())["metrics"]
    assert {r["key"] for r in rows} == {"dino", "clip-i", "clip-t", "fid", "lpips"}
    for r in rows:
        for fld in ("mean", "std"):
            key = f"{r['key']}/{r['prompt_set']}/{r['backbone']}/{fld}"
            if r[fld] is None:  # FID: one distance, no std
                assert key not in ev.metrics, key
                continue
            assert ev.metrics[key] == pytest.approx(r[fld]), key
            assert parent.data.metrics[key] == pytest.approx(r[fld]), key
    assert ev.tags["eval.random_backbones"] == "none"
    assert "dino=facebook/dino-vits16" in ev.tags["eval.backbones"]

    # data hashes of subject and priors
    subj = json.loads((run / "refine" / "subject.json").read_text())
    from subjectops.tracking.record import digest_of

    assert parent.data.tags["data.subject.sha256"] == digest_of((s["file"], s["sha256"]) for s in subj["sources"])
    assert len(parent.data.tags["data.priors.sha256"]) == 64
    assert kids["priors"].data.tags["data.priors.cache_key"] == "abc123"

    # report, grids, adapter: in MLflow's artifact store, which is the S3 bucket
    ev_art = artifact_paths(client, kids["evaluate"].info.run_id)
    assert {"evaluate/report.html", "evaluate/metrics.json", "evaluate/manifest.json"} <= ev_art
    ft_art = artifact_paths(client, kids["finetune"].info.run_id)
    assert "finetune/pytorch_lora_weights.safetensors" in ft_art and "finetune/method.json" in ft_art
    assert "finetune/train_log.jsonl" in ft_art and "grids/finetune_validation.png" in ft_art
    assert not any("checkpoints" in p for p in ft_art)  # resume state stays local
    assert "grids/infer_prompt-invariant.png" in artifact_paths(client, kids["infer"].info.run_id)
    assert {"grids/refine_images.png", "grids/refine_masks.png"} <= artifact_paths(client, kids["refine"].info.run_id)
    keys = [o["Key"] for o in s3_client(s3_server).list_objects_v2(Bucket=MLFLOW_BUCKET, MaxKeys=1000)["Contents"]]
    assert any(k.endswith(f"{kids['finetune'].info.run_id}/artifacts/finetune/pytorch_lora_weights.safetensors")
               for k in keys)

    # a model version, alias challenger, logged on the pipeline run
    reg = json.loads((run / "register" / "registration.json").read_text())
    mv = client.get_model_version_by_alias(reg["model_name"], "challenger")
    assert mv.version == reg["version"] and mv.run_id == parent.info.run_id
    assert mv.tags["subjectops.method"] == "lora" and mv.tags["subjectops.base_model"] == "tiny-sd15"
    assert any("logged to" in m for m in messages)


def _flat(d, prefix=""):
    from subjectops.tracking.record import flatten

    return flatten(d, prefix)


def test_server_down_from_the_start_runs_locally_then_sync_uploads(tmp_path, monkeypatch, mlflow_factory):
    from servers import free_port

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = synthetic_params(tracking__retries=3, tracking__backoff_seconds=0.1)
    messages, sleeps = [], []
    tracker = MlflowTracker(experiment="offline-test", echo=messages.append, sleep=sleeps.append,
                            stages=stage_catalog())
    run = tmp_path / "run"
    fake_pipeline(tracker, params, run)
    assert sleeps == [0.1, 0.2]  # backoff doubles between the tries
    assert any("is unavailable" in m and f"subjectops sync {run}" in m for m in messages)
    state = RunState.load(run)
    assert state.data["offline"] and state.data["pending"] and state.data["parent"]["run_id"] is None
    assert (run / "evaluate" / "metrics.json").is_file()  # the run itself finished

    # still down: a clear error, nothing changed
    before = state.path.read_text()
    with pytest.raises(TrackingError, match="cannot reach MLflow"):
        sync(run, stage_catalog())
    assert state.path.read_text() == before

    server = mlflow_factory(port=port)
    out = sync(run, stage_catalog())
    client = MlflowClient(server.url)
    parent = client.get_run(out["parent_run_id"])
    kids = children(client, parent)
    assert set(kids) == set(STAGES) | {"register"}
    assert len(client.get_metric_history(kids["finetune"].info.run_id, "train/loss")) == STEPS
    assert parent.data.params["finetune.method"] == "lora"
    assert out["registered"]["version"] == "1"
    assert RunState.load(run).data["pending"] is False
    # a second sync has nothing left to do and logs nothing twice
    sync(run, stage_catalog())
    assert len(client.get_metric_history(kids["finetune"].info.run_id, "train/loss")) == STEPS


def test_a_server_that_never_answers_times_out_after_tracking_timeout_seconds(tmp_path, monkeypatch):
    """tracking.timeout_seconds bounds each MLflow request: a server that accepts connections but never
    answers costs seconds, not MLflow's default two minutes per request."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts connections; nobody ever reads or answers
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
        # the tracker sets MLflow's timeout for the process: restore it for the tests after this one
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
        params = synthetic_params(tracking__retries=2, tracking__backoff_seconds=0.1, tracking__timeout_seconds=1)
        messages = []
        tracker = MlflowTracker(experiment="silent", echo=messages.append, stages=stage_catalog())
        start = time.monotonic()
        with tracker.pipeline(params, tmp_path / "run"):
            pass
        elapsed = time.monotonic() - start
    finally:
        silent.close()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"
    assert tracker.offline and any("timed out" in m.lower() or "timeout" in m.lower() for m in messages), messages
    assert 2 <= elapsed < 20, elapsed  # two tries of one second each (plus MLflow's own overhead), not 2 x 120 s


def test_server_stopped_mid_run_finishes_locally_and_sync_uploads_everything(tmp_path, monkeypatch, mlflow_factory):
    server = mlflow_factory()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    params = synthetic_params(tracking__retries=2, tracking__backoff_seconds=0.1)
    messages = []
    tracker = MlflowTracker(experiment="midrun-test", echo=messages.append, stages=stage_catalog())
    run = tmp_path / "run"

    def stop_during_finetune(name):
        if name == "finetune":
            server.stop()

    fake_pipeline(tracker, params, run, on_stage=stop_during_finetune)
    assert not server.alive()
    state = RunState.load(run)
    assert state.data["offline"] and state.data["pending"]
    parent_id = state.data["parent"]["run_id"]
    assert parent_id and state.stage("refine")["done"][-1] == "end"  # refine and priors made it before the stop
    assert any("is unavailable" in m for m in messages)

    restarted = mlflow_factory(name="mlflow", port=server.port)  # same database, same port
    out = sync(run, stage_catalog())
    assert out["parent_run_id"] == parent_id  # the run created before the stop is completed, not duplicated
    client = MlflowClient(restarted.url)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    kids = children(client, parent)
    assert set(kids) == set(STAGES) | {"register"}
    assert all(r.info.status == "FINISHED" for r in kids.values())
    assert len(client.get_metric_history(kids["finetune"].info.run_id, "train/loss")) == STEPS
    recs = json.loads((run / "evaluate" / "metrics.json").read_text())["metrics"]
    assert len([k for k in kids["evaluate"].data.metrics if k.endswith("/mean")]) == len(recs)
    assert "evaluate/report.html" in artifact_paths(client, kids["evaluate"].info.run_id)
    # the version's source run is the pipeline run a user opens (issue 26 item 5), not the register step's
    assert client.get_model_version_by_alias(out["registered"]["model_name"], "challenger").run_id == parent_id
    runs = client.search_runs([parent.info.experiment_id])
    assert len(runs) == len(STAGES) + 2  # parent + stages + register: nothing twice


@pytest.mark.mlflow_backends
def test_sync_of_a_run_made_without_tracking(tmp_path, tracking_uri):
    params = synthetic_params()
    run = tmp_path / "untracked"
    for name in STAGES:
        write_stage(run, name, params)
    out = sync(run, stage_catalog())
    client = MlflowClient(tracking_uri)
    parent = client.get_run(out["parent_run_id"])
    assert set(children(client, parent)) == set(STAGES) | {"register"}
    assert parent.data.params["model.base"] == "tiny-sd15"


def test_sync_errors_are_clear(tmp_path):
    with pytest.raises(TrackingError, match="does not exist"):
        sync(tmp_path / "nope", stage_catalog())
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrackingError, match="no stage output"):
        sync(tmp_path / "empty", stage_catalog())


def test_eval_tags_say_what_the_numbers_measure():
    """A world run's evaluation is tagged as the world's (its SSIM and PSNR, which use no backbone, are not random
    backbones); a tiny run's as not meaningful."""
    from subjectops.tracking.record import eval_tags

    world = [{"metric": "dino", "prompt_set": "world", "backbone": "world", "pretrained": True},
             {"metric": "ssim", "prompt_set": "world", "backbone": None, "pretrained": None}]
    tags = eval_tags(world, "world-pretrained")
    assert tags["eval.random_backbones"] == "none" and "miniature world" in tags["eval.quality"]
    tiny = [{"metric": "dino", "prompt_set": "world", "backbone": "tiny", "pretrained": False}, world[1]]
    tags = eval_tags(tiny, "random")
    assert tags["eval.random_backbones"] == "tiny" and tags["eval.quality"].startswith("not meaningful")
