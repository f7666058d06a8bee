"""The pipeline run is the MLflow page a user opens: it holds the report, every stage's grids, the loss history and
the registered model; counts are tags, not metrics; the experiment opens on its training runs (a local sqlite
store, no server)."""

from __future__ import annotations

import json

import pytest
from helpers import artifact_paths, children
from mlflow.tracking import MlflowClient
from synthetic_runs import STEPS, synthetic_params, write_stage

from subjectops.stages.catalog import stage_catalog
from subjectops.tracking.mlflow_tracker import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker

STAGES = ("refine", "priors", "finetune", "infer", "evaluate")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One whole tracked run (stages written by hand, as pipeline.run calls the tracker) and its MLflow store."""
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    mp = pytest.MonkeyPatch()
    mp.chdir(root)  # the local artifact store lands here
    try:
        params = synthetic_params()
        run = root / "run"
        messages = []
        tracker = MlflowTracker(tracking_uri=uri, experiment="parent-run", echo=messages.append,
                                stages=stage_catalog())
        with tracker.pipeline(params, run):
            for name in STAGES:
                with tracker.stage(name, run / name):
                    write_stage(run, name, params)
            tracker.register_model(stage_catalog().register, run, run / "register")
    finally:
        mp.undo()
    client = MlflowClient(uri)
    return client, client.get_run(tracker.state.data["parent"]["run_id"]), run, messages


def test_the_pipeline_run_holds_the_report_grids_and_loss_history(tracked):
    client, parent, _, _ = tracked
    arts = artifact_paths(client, parent.info.run_id)
    assert {"report.html", "finetune/train_log.jsonl", "params.json"} <= arts
    assert {"grids/refine_images.png", "grids/refine_masks.png", "grids/finetune_validation.png",
            "grids/infer_prompt-invariant.png"} <= arts
    history = sorted(client.get_metric_history(parent.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert history[0].value == pytest.approx(1.0)


def test_the_registered_model_lives_on_the_pipeline_run(tracked):
    client, parent, run, _ = tracked
    reg = json.loads((run / "register" / "registration.json").read_text())
    mv = client.get_model_version(reg["model_name"], reg["version"])
    assert mv.run_id == parent.info.run_id
    arts = artifact_paths(client, parent.info.run_id)
    assert "model/MLmodel" in arts and "evaluation/summary.json" in arts
    register_run = children(client, parent)["register"]
    assert register_run.info.status == "FINISHED"
    assert "register/registration.json" in artifact_paths(client, register_run.info.run_id)


def test_counts_are_tags_and_measurements_are_metrics(tracked):
    client, parent, run, _ = tracked
    evaluate = children(client, parent)["evaluate"]
    rows = json.loads((run / "evaluate" / "metrics.json").read_text())["metrics"]
    for data in (evaluate.data, parent.data):
        assert not any(k.endswith(("/n_pairs", "/n_generated", "/n_reference")) for k in data.metrics)
        for r in rows:
            key = f"{r['key']}/{r['prompt_set']}/{r['backbone']}"
            assert data.metrics[f"{key}/mean"] == pytest.approx(r["mean"])
            assert data.tags[f"eval.{key}/n_generated"] == str(r["n_generated"])
            if r["n_pairs"] is None:  # FID: one distance between two sets, no pairs
                assert f"eval.{key}/n_pairs" not in data.tags
            else:
                assert data.tags[f"eval.{key}/n_pairs"] == str(r["n_pairs"])


def test_the_experiment_is_a_machine_learning_experiment(tracked):
    client, parent, _, _ = tracked
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_existing_experiment_gets_the_kind_but_a_chosen_kind_stays(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    untagged = client.create_experiment("untagged", artifact_location=str(tmp_path / "a"))
    chosen = client.create_experiment("chosen", artifact_location=str(tmp_path / "b"),
                                      tags={EXPERIMENT_KIND_TAG: "genai_development"})
    tracker = MlflowTracker(echo=lambda m: None)
    assert tracker.connect(f"sqlite:///{tmp_path / 'mlruns.db'}", "untagged") == untagged
    assert tracker.connect(f"sqlite:///{tmp_path / 'mlruns.db'}", "chosen") == chosen
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_run_ends_with_a_link_that_opens_the_training_view(tracked):
    """MLflow 3.17's UI shows its GenAI views to a browser that never chose "Model training", whatever the
    experiment's kind: the printed link asks for the training view."""
    _, parent, _, messages = tracked
    experiment, run_id = parent.info.experiment_id, parent.info.run_id
    page = f"#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    assert messages[-1].endswith(f"then http://127.0.0.1:5000/{page}")
    assert "`mlflow ui --backend-store-uri sqlite:///" in messages[-1]
    from subjectops.tracking.client import run_page

    assert run_page("http://mlflow:5000/", experiment, run_id) == f"http://mlflow:5000/{page}"
