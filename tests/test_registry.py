"""A full tiny run (every real stage, tiny-sd15) tracked to a real MLflow server whose artifacts live on
S3 (SeaweedFS); its registered version loads by alias in a fresh process-like load and generates an image."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from helpers import artifact_paths, children
from mlflow.tracking import MlflowClient
from servers import MLFLOW_BUCKET, s3_client

from subjectops.config import load_params
from subjectops.pipeline import run as run_pipeline
from subjectops.stages.catalog import stage_catalog
from subjectops.tracking.mlflow_tracker import MlflowTracker
from subjectops.tracking.pyfunc import decode_image
from subjectops.tracking.run_state import RunState


def test_full_tiny_run_is_tracked_registered_and_loads_by_alias(tmp_path, tracking_uri, s3_server, example_subject,
                                                                  repo_root, tiny_overrides):
    import mlflow.pyfunc

    params = load_params(repo_root / "params.yaml",
                         tiny_overrides + ["finetune.method=lora", "registry.model_name=tiny-{subject}-{method}"])
    run = tmp_path / "run"
    tracker = MlflowTracker(experiment="full-tiny-run", echo=lambda m: None, stages=stage_catalog())
    run_pipeline(params, example_subject, "teapot", run, tracker=tracker)

    client = MlflowClient(tracking_uri)
    state = RunState.load(run)
    assert not state.data["pending"]
    parent = client.get_run(state.data["parent"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.base"] == "tiny-sd15" and parent.data.params["finetune.method"] == "lora"
    assert len(parent.data.tags["data.subject.sha256"]) == 64 and len(parent.data.tags["data.priors.sha256"]) == 64
    kids = children(client, parent)
    assert {"refine", "priors", "finetune", "infer", "evaluate", "register"} <= set(kids)

    steps = [json.loads(line)["step"] for line in (run / "finetune" / "train_log.jsonl").read_text().splitlines()
             if line.strip()]
    hist = client.get_metric_history(kids["finetune"].info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == sorted(steps) and len(steps) == params.finetune.lora.steps

    doc = json.loads((run / "evaluate" / "metrics.json").read_text())
    records = [r for r in doc["metrics"] if r.get("mean") is not None]
    assert records
    ev = kids["evaluate"]
    for r in records:
        key = f"{r['key']}/{r['prompt_set']}/{r['backbone'] or 'none'}/mean"
        assert ev.data.metrics[key] == pytest.approx(r["mean"])
    assert ev.data.tags["eval.random_backbones"] != "none"  # tiny encoders are random, and said so
    assert "evaluate/report.html" in artifact_paths(client, ev.info.run_id)
    assert "finetune/pytorch_lora_weights.safetensors" in artifact_paths(client, kids["finetune"].info.run_id)
    keys = [o["Key"] for o in s3_client(s3_server).list_objects_v2(Bucket=MLFLOW_BUCKET, MaxKeys=1000)["Contents"]]
    assert any(kids["evaluate"].info.run_id in k and k.endswith("report.html") for k in keys)

    reg = json.loads((run / "register" / "registration.json").read_text())
    assert reg["model_name"] == "tiny-teapot-lora"
    mv = client.get_model_version_by_alias("tiny-teapot-lora", "challenger")
    assert mv.version == reg["version"]

    model = mlflow.pyfunc.load_model("models:/tiny-teapot-lora@challenger")
    out = model.predict(pd.DataFrame({"prompt": ["a photo of {subject} on a beach"], "seed": [7]}))
    assert out.loc[0, "prompt"] == "a photo of sks teapot on a beach"
    img = decode_image(out.loc[0, "image"])
    assert img.size == (out.loc[0, "width"], out.loc[0, "height"]) and img.size[0] >= 32
    again = model.predict(pd.DataFrame({"prompt": ["a photo of {subject} on a beach"], "seed": [7]}))
    assert again.loc[0, "image"] == out.loc[0, "image"]  # same seed, same image

    # a random-backbone run can never become champion
    from subjectops.tracking.registry import promote

    res = promote(client, "tiny-teapot-lora", params.registry)
    # refused on what the run recorded (evaluate scored with tiny random encoders), not on editable metrics fields
    reasons = client.get_model_version("tiny-teapot-lora", mv.version).tags["promotion.reasons"]
    assert not res.promoted and "tiny random encoders" in reasons
