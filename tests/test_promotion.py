"""`subjectops promote` against a real MLflow registry: gates decide, refusals hold, decisions are tagged."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from synthetic_runs import synthetic_params, write_run
from typer.testing import CliRunner

from subjectops.cli import app
from subjectops.digest import sha256_file
from subjectops.metrics.backbones import TINY_MARKER
from subjectops.stages.register import register
from subjectops.tracking.registry import RegistryError, promote


@pytest.fixture
def registry(tmp_path, tracking_uri):
    """Registers synthetic runs with chosen metrics under one fresh model name."""
    name = f"promo-{uuid.uuid4().hex[:8]}"
    params = synthetic_params()
    client = MlflowClient(tracking_uri)

    def add(**metrics) -> str:
        run = write_run(tmp_path / f"run{len(list(tmp_path.iterdir()))}", params, metrics)
        return register(params, run, run / "register", model_name=name)["version"]

    return name, params, client, add


def champion(client, name):
    return client.get_model_version_by_alias(name, "champion").version


def promote_cli(name, tmp_path, *args):
    params_file = tmp_path / "params.yaml"
    if not params_file.exists():
        params_file.write_text("model: {base: tiny-sd15}\n")
    return CliRunner().invoke(app, ["promote", name, "--params", str(params_file), *args])


def test_better_challenger_becomes_champion_worse_does_not(registry, tmp_path):
    name, params, client, add = registry
    v1 = add(dino=0.60, clip_t=0.30)
    assert client.get_model_version_by_alias(name, "challenger").version == v1
    first = promote(client, name, params.registry)
    assert first.promoted and champion(client, name) == v1
    tags = client.get_model_version(name, v1).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.against"] == "none"

    v2 = add(dino=0.66, clip_t=0.305)
    res = promote_cli(name, tmp_path)
    assert res.exit_code == 0, res.output
    assert champion(client, name) == v2
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.against"] == v1
    gate = tags["promotion.gate.dino/prompt-invariant/facebook/dino-vits16"]
    assert gate.startswith("pass") and "challenger=0.66" in gate and "champion=0.6 " in gate
    numbers = {(n["metric"], n["prompt_set"]): n for n in json.loads(tags["promotion.numbers"])}
    assert numbers[("clip-t", "prompt-invariant")]["champion"] == pytest.approx(0.30)
    assert numbers[("dino", "prompt-invariant")]["improvement"] == pytest.approx(0.06)
    assert client.get_model_version(name, v1).tags["promotion.superseded_by"] == v2

    v3 = add(dino=0.50, clip_t=0.31)  # DINO drops by 0.16 > tolerance 0.02
    res = promote_cli(name, tmp_path)
    assert res.exit_code == 1, res.output
    assert "not promoted" in res.output
    assert champion(client, name) == v2
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.status"] == "failed"
    assert "dino 0.5 is 0.16 below the champion's 0.66" in tags["promotion.reasons"]
    assert tags["promotion.gate.dino/prompt-invariant/facebook/dino-vits16"].startswith("fail")
    assert tags["promotion.gate.clip-t/prompt-invariant/openai/clip-vit-base-patch32"].startswith("pass")


def test_different_backbones_prompt_sets_and_random_backbones_are_refused(registry, tmp_path):
    name, params, client, add = registry
    v1 = add(dino=0.60, clip_t=0.30)
    assert promote(client, name, params.registry).promoted

    other_backbone = add(dino=0.90, clip_t=0.40, backbone_dino="facebook/dinov2-small")
    res = promote(client, name, params.registry)
    assert not res.promoted and res.decision.status == "refused" and champion(client, name) == v1
    tags = client.get_model_version(name, other_backbone).tags
    assert tags["promotion.decision"] == "refused" and "different backbones for dino" in tags["promotion.reasons"]

    other_set = add(dino=0.90, clip_t=0.40, prompt_set="dreambench")
    res = promote_cli(name, tmp_path)
    assert res.exit_code == 1 and "different prompt sets" in res.output
    assert champion(client, name) == v1
    assert "different prompt sets" in client.get_model_version(name, other_set).tags["promotion.reasons"]

    random_bb = add(dino=0.99, clip_t=0.50, pretrained=False, backbone_dino="tiny-random-dino",
                    backbone_clip="tiny-random-clip")
    res = promote(client, name, params.registry, version=random_bb)
    assert not res.promoted and champion(client, name) == v1
    assert "scored with tiny random encoders" in client.get_model_version(name, random_bb).tags["promotion.reasons"]


def test_a_tiny_runs_edited_metrics_never_become_champion(registry, tmp_path):
    """Issue 23 item 5: `pretrained: true` and real backbone ids typed into a tiny run's metrics.json promoted it.
    However consistently the run folder is edited, what the run recorded gives the random encoders away."""
    name, params, client, add = registry
    run = write_run(tmp_path / "tiny", params, {"pretrained": False, "backbone_dino": "tiny", "backbone_clip": "tiny"})
    evaluate = run / "evaluate"
    metrics, manifest = (json.loads((evaluate / f).read_text()) for f in ("metrics.json", "manifest.json"))
    marked = tmp_path / "tiny-dino"  # what the tiny build writes: a folder with its marker file
    marked.mkdir()
    (marked / TINY_MARKER).write_text("{}")
    metrics["random_backbones"] = False
    metrics["backbones"] = {"dino": {"role": "dino", "id": "facebook/dino-vits16", "pretrained": True,
                                     "source": str(marked)},
                            "clip": {"role": "clip", "id": "openai/clip-vit-base-patch32", "pretrained": True,
                                     "source": "openai/clip-vit-base-patch32"},
                            "lpips": {"role": "lpips", "id": "alex", "pretrained": True, "source": "alex"}}
    real = {"dino": "facebook/dino-vits16", "fid": "facebook/dino-vits16", "clip-i": "openai/clip-vit-base-patch32",
            "clip-t": "openai/clip-vit-base-patch32", "lpips": "alex"}
    for record in metrics["metrics"]:
        record.update(pretrained=True, backbone=real[record["key"]])

    def edited_run_promoted(expected: str) -> bool:
        version = register(params, run, run / "register", model_name=name)["version"]
        result = promote(client, name, params.registry, version=version)
        assert expected in "; ".join(result.decision.reasons), result.decision.reasons
        return result.promoted

    (evaluate / "metrics.json").write_text(json.dumps(metrics))  # the file alone
    assert not edited_run_promoted("is not the file evaluate wrote")
    manifest["outputs"]["metrics.json"] = sha256_file(evaluate / "metrics.json")  # and the manifest's hash of it
    manifest["backbones"] = metrics["backbones"]
    (evaluate / "manifest.json").write_text(json.dumps(manifest))
    assert not edited_run_promoted("scored with tiny random encoders "
                                   "(evaluate.tiny = true, images generated by tiny-sd15)")
    manifest["params"]["evaluate"]["tiny"] = False  # and the params evaluate recorded
    (evaluate / "manifest.json").write_text(json.dumps(manifest))
    assert not edited_run_promoted(f"the dino backbone loaded from {marked} has random weights")
    with pytest.raises(MlflowException):
        champion(client, name)


def test_promote_errors_name_the_problem(registry, tmp_path):
    name, params, client, add = registry
    with pytest.raises(RegistryError, match="no registered model named 'does-not-exist'"):
        promote(client, "does-not-exist", params.registry)
    res = promote_cli("does-not-exist", tmp_path)
    assert res.exit_code == 2 and "no registered model named" in res.output
