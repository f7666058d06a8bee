"""`subjectops submit` and `subjectops benchmark schedule|submit`: the exact KFP API requests, checked
field by field, and every invalid input rejected before anything is sent."""

import json
from pathlib import Path

import kfp_server_api
import pytest
import yaml
from typer.testing import CliRunner

from subjectops import kfp_submit
from subjectops.cli import app

HOST = "http://kfp.example.test:8080"
SUBJECT = "s3://subjectops-data/subjects/teapot"


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the built-in defaults
    monkeypatch.delenv("KFP_HOST", raising=False)


@pytest.fixture
def wire(monkeypatch):
    """Replaces the HTTP layer of kfp's API client: records what a real (non dry-run) call would send."""
    rec = kfp_submit.Recorder(HOST)

    def fake(self, resource_path, method, *args, **kwargs):
        names = ["path_params", "query_params", "header_params", "body", "post_params", "files", "response_type"]
        kwargs.update(dict(zip(names, args)))
        return rec.call_api(self, resource_path, method, **kwargs)

    monkeypatch.setattr(kfp_server_api.ApiClient, "call_api", fake)
    return rec


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    return result


def dry(tmp_path, *args) -> dict:
    out = tmp_path / "request.json"
    result = invoke(*args, "--dry-run", "--output", str(out))
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_submit_dry_run_request_field_by_field(tmp_path):
    params = tmp_path / "my-params.yaml"
    params.write_text("finetune:\n  lora:\n    rank: 8\n")
    doc = dry(tmp_path, "submit", "--host", HOST, SUBJECT, "--class", "teapot", "--method", "lora",
              "--params", str(params), "--set", "finetune.lora.steps=400", "--namespace", "team-a",
              "--service-account", "subjectops-pipeline-runner", "--gpu-count", "2",
              "--gpu-node-selector", '{"cloud.google.com/gke-accelerator": "nvidia-l4"}',
              "--gpu-tolerations", '[{"key": "gpu", "operator": "Equal", "value": "l4", "effect": "NoSchedule"}]',
              "--experiment", "teapots")
    assert doc["dry_run"] is True and doc["kind"] == "run" and doc["host"] == HOST
    reqs = doc["requests"]
    assert [(r["method"], r["path"]) for r in reqs] == [
        ("GET", "/apis/v2beta1/experiments"), ("POST", "/apis/v2beta1/experiments"), ("POST", "/apis/v2beta1/runs")]
    assert reqs[0]["query"]["namespace"] == "team-a" and '"stringValue": "teapots"' in reqs[0]["query"]["filter"]
    assert reqs[1]["body"] == {"display_name": "teapots", "namespace": "team-a"}
    body = reqs[2]["body"]
    assert reqs[2]["url"] == HOST + "/apis/v2beta1/runs"
    assert body["display_name"] == "personalize-teapot-lora"
    assert body["experiment_id"] == "DRY-RUN-EXPERIMENT-ID"
    assert body["service_account"] == "subjectops-pipeline-runner"
    assert set(body) == {"display_name", "experiment_id", "pipeline_spec", "runtime_config", "service_account"}
    assert body["runtime_config"] == {"parameters": {
        "subject_uri": SUBJECT, "class_word": "teapot", "method": "lora", "model": "",
        "overrides": ["finetune.lora.steps=400"], "params_yaml": params.read_text(),
        "dvc_repo": "", "dvc_rev": "",
        "accelerator_type": "nvidia.com/gpu", "gpu_count": 2,
        "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "gpu_tolerations": [{"key": "gpu", "operator": "Equal", "value": "l4", "effect": "NoSchedule"}],
        "model_cache_pvc": "subjectops-model-cache", "mlflow_secret": "subjectops-mlflow",
        "s3_secret": "subjectops-s3",
        "priors_cache_dir": "/models/cache/priors"}}
    spec = body["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "subjectops-personalize"
    inputs = spec["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == set(body["runtime_config"]["parameters"])
    assert "exec-finetune" in spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # the sent spec is the checked-in compiled pipeline
    compiled = Path(__file__).resolve().parents[1] / "pipelines/compiled/personalize.yaml"
    checked_in = list(yaml.safe_load_all(compiled.read_text()))
    assert spec["pipeline_spec"]["deploymentSpec"] == checked_in[0]["deploymentSpec"]


def test_dry_run_is_what_a_real_submission_sends(tmp_path, wire):
    args = ["submit", "--host", HOST, SUBJECT, "--class", "teapot", "--method", "dreambooth", "--namespace", "ns"]
    doc = dry(tmp_path, *args)
    wire.requests.clear()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "DRY-RUN-RUN-ID" in result.output  # the run id the fake API answered
    assert [(r["method"], r["path"], r["body"]) for r in wire.requests] == [(r["method"], r["path"], r["body"])
                                                                            for r in doc["requests"]]


def test_a_dry_run_records_on_its_own_client_and_leaves_kfps_classes_alone(tmp_path, monkeypatch):
    """While the dry run sends, kfp's ApiClient class keeps its own call_api: only the dry-run client's instance
    answers from the recorder (another kfp client in the same process would still reach its server)."""
    original = kfp_server_api.ApiClient.call_api
    seen = []
    record = kfp_submit.Recorder.call_api

    def checking(self, api_client, *args, **kwargs):
        seen.append(kfp_server_api.ApiClient.call_api is original and "call_api" in vars(api_client))
        return record(self, api_client, *args, **kwargs)

    monkeypatch.setattr(kfp_submit.Recorder, "call_api", checking)
    doc = dry(tmp_path, "submit", "--host", HOST, SUBJECT, "--class", "teapot")
    assert seen and all(seen) and len(seen) == len(doc["requests"])
    assert kfp_server_api.ApiClient.call_api is original


def test_schedule_dry_run_request_field_by_field(tmp_path):
    doc = dry(tmp_path, "benchmark", "schedule", "--cron", "0 0 3 * * *", "--host", HOST, "--namespace", "team-a",
              "--method", "lora", "--parallelism", "2", "--set", "finetune.lora.steps=100")
    assert doc["kind"] == "recurring_run"
    req = doc["requests"][-1]
    assert (req["method"], req["path"]) == ("POST", "/apis/v2beta1/recurringruns")
    body = req["body"]
    assert body["display_name"] == "benchmark-lora-nightly"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["max_concurrency"] == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["experiment_id"] == "DRY-RUN-EXPERIMENT-ID"
    params = body["runtime_config"]["parameters"]
    assert params["methods"] == ["lora"] and params["overrides"] == ["finetune.lora.steps=100"]
    assert params["fail_on_refused"] is False
    assert len(params["subjects"]) == 30
    assert params["subjects"][0] == {"uri": "s3://subjectops-data/dreambench/backpack", "class_word": "backpack"}
    spec = body["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "subjectops-benchmark"
    loop = next(t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 2


def test_benchmark_submit_with_own_subjects(tmp_path):
    subjects = tmp_path / "subjects.json"
    subjects.write_text(json.dumps([{"uri": "s3://b/s/mug", "class_word": "mug"},
                                    {"uri": "s3://b/s/dog", "class_word": "dog"}]))
    doc = dry(tmp_path, "benchmark", "submit", "--host", HOST, "--namespace", "n", "--subjects", str(subjects),
              "--fail-on-refused")
    body = doc["requests"][-1]["body"]
    assert doc["requests"][-1]["path"] == "/apis/v2beta1/runs"
    assert body["runtime_config"]["parameters"]["subjects"] == json.loads(subjects.read_text())
    assert body["runtime_config"]["parameters"]["fail_on_refused"] is True
    assert body["display_name"] == "benchmark-dreambooth"


@pytest.mark.parametrize("args, message", [
    (["benchmark", "schedule", "--cron", "0 3 * * *"], "write '0 0 3 * * *'"),
    (["benchmark", "schedule", "--cron", "0 0 3 * * * *"], "has 7 fields"),
    (["benchmark", "schedule", "--cron", "61 0 3 * * *"], "outside 0-59"),
    (["benchmark", "schedule", "--cron", "0 0 25 * * *"], "outside 0-23"),
    (["benchmark", "schedule", "--cron", "*/0 * * * * *"], "positive number"),
    (["benchmark", "schedule", "--cron", "0 0 3 * FOO *"], "not a number"),
    (["benchmark", "schedule", "--cron", "@fortnightly"], "unknown descriptor"),
    (["submit", SUBJECT, "--class", "teapot", "--method", "dreamboot"], "finetune.method"),
    (["submit", SUBJECT, "--class", "teapot", "--set", "finetune.lora.rnk=8"], "unknown key"),
    (["submit", "--class", "teapot"], "Missing argument"),
    (["submit", "", "--class", "teapot"], "no subject given"),
    (["submit", "/home/me/photos/teapot", "--class", "teapot"], "cannot read"),
    (["submit", "gs://bucket/teapot", "--class", "teapot"], "not supported"),
    (["submit", "dvc://data/teapot", "--class", "teapot"], "--dvc-repo"),
    (["submit", SUBJECT, "--class", " "], "class word is empty"),
    (["submit", SUBJECT, "--class", "teapot", "--gpu-node-selector", "pool=gpu"], "not valid JSON"),
    (["submit", SUBJECT, "--class", "teapot", "--gpu-tolerations", '[{"key": "g", "operator": "Maybe"}]'], "operator"),
    (["submit", SUBJECT, "--class", "teapot", "--gpu-count", "0"], "at least 1"),
    (["submit", SUBJECT, "--class", "teapot", "--mlflow-secret", "My_Secret"], "Kubernetes object name"),
    (["benchmark", "submit", "--parallelism", "0"], "at least 1"),
])
def test_invalid_input_fails_before_anything_is_sent(wire, args, message):
    result = invoke(*args, "--host", HOST)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert wire.requests == [], "nothing may reach the KFP API"


@pytest.mark.parametrize("uri, segment", [("s3://subj/../../etc", "'..'"), ("s3://subj/a/./teapot", "'.'"),
                                          ("s3://subj//teapot", "an empty"), ("s3://subj/a//teapot", "an empty"),
                                          ("dvc://data/../../etc", "'..'")])
def test_subject_uri_with_dot_or_empty_segments_is_refused(wire, uri, segment):
    result = invoke("submit", uri, "--class", "teapot", "--dvc-repo", "https://git.example/r.git", "--host", HOST)
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"subject URI {uri!r} has {segment} path segment" in out and "fix:" in out and "Traceback" not in out
    assert wire.requests == [], "nothing may reach the KFP API"


def test_host_must_be_a_url(wire):
    result = invoke("submit", SUBJECT, "--class", "teapot", "--host", "kfp.example:8080")
    assert result.exit_code == 2 and "not an http(s) URL" in result.output
    assert wire.requests == []


@pytest.mark.parametrize("expr", ["0 0 3 * * *", "*/30 * * * * *", "0 15 10 ? * MON-FRI", "0 0 0 1,15 JAN-JUN ?",
                                  "0 0 2-4/2 * * 0", "@daily", "@every 1h30m"])
def test_valid_kfp_crons(expr):
    assert kfp_submit.validate_cron(expr) == expr


@pytest.mark.parametrize("expr",
                         ["", "* * * * *", "0 0 3 * * 7", "0 0 5-3 * * *", "? 0 3 * * *", "0 0 3 * 13 *",
                          "@every soon", "0 0 3 ,1 * *"])
def test_invalid_kfp_crons(expr):
    with pytest.raises(kfp_submit.SubmitError):
        kfp_submit.validate_cron(expr)
