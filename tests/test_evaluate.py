"""The evaluate stage: inputs checked before work, metrics.json records what every number means."""

import json
import shutil

import pytest
from helpers import eval_params, make_run

from subjectops.config import Params
from subjectops.errors import ModelNotFoundError, SubjectopsError
from subjectops.models.tiny import TINY_PRESETS
from subjectops.stages.evaluate import evaluate


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SUBJECTOPS_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def test_evaluate_writes_metrics_report_and_manifest(tmp_path):
    params = eval_params()
    refine, infer = make_run(tmp_path, params, gen_size=96)  # generated larger than references: resized
    out = evaluate(params, refine, infer, tmp_path / "evaluate")
    assert out == tmp_path / "evaluate" and not (tmp_path / "evaluate.partial").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["random_backbones"] is True and "measure nothing" in m["warning"]
    assert [s["name"] for s in m["prompt_sets"]] == ["prompt-invariant", "prompt-varying"]
    keys = {(r["prompt_set"], r["metric"]) for r in m["metrics"]}
    for s in ("prompt-invariant", "prompt-varying"):
        for metric in ("DINO", "CLIP-I", "CLIP-T", "FID", "LPIPS", "SSIM", "PSNR"):
            assert (s, metric) in keys
    for r in m["metrics"]:
        assert {"metric", "prompt_set", "backbone", "pretrained", "n_pairs", "mean", "std"} <= set(r)
        if r["metric"] in ("DINO", "CLIP-I", "LPIPS", "SSIM", "PSNR"):
            assert r["n_pairs"] == r["n_generated"] * 3
        if r["backbone"] is not None:
            assert r["pretrained"] is False
    inv = {r["metric"]: r for r in m["metrics"] if r["prompt_set"] == "prompt-invariant"}
    assert inv["DINO"]["n_pairs"] == 4 * 3 and inv["CLIP-T"]["n_pairs"] == 4
    assert len(m["per_image"]) == 10 and m["summary"]["prompt-invariant/DINO"] == inv["DINO"]["mean"]
    assert m["fid_features"] == "dino"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate" and {"metrics.json", "report.html"} <= set(manifest["outputs"])
    assert manifest["random_backbones"] is True
    page = (out / "report.html").read_text()
    first = page.split("<body>", 1)[1].strip().splitlines()[0]
    assert "measure nothing about image quality" in first


def test_bad_inputs_fail_before_any_output(tmp_path):
    params = eval_params()
    refine, infer = make_run(tmp_path, params)
    out = tmp_path / "evaluate"
    with pytest.raises(SubjectopsError, match="no manifest.json"):
        evaluate(params, tmp_path / "nope", infer, out)
    samples = json.loads((infer / "samples.json").read_text())
    (infer / "samples.json").write_text(json.dumps(samples[:-1]))
    with pytest.raises(SubjectopsError, match="prompt-varying: prompt_sets.json has 6 items but samples.json has 5"):
        evaluate(params, refine, infer, out)
    bad = [dict(samples[0], path="../../etc/passwd")] + samples[1:]
    (infer / "samples.json").write_text(json.dumps(bad))
    with pytest.raises(SubjectopsError, match="not a file inside"):
        evaluate(params, refine, infer, out)
    (infer / "samples.json").write_text(json.dumps([{k: v for k, v in s.items() if k != "identifier"}
                                                    for s in samples]))
    with pytest.raises(SubjectopsError, match=r"lacks \['identifier'\]"):
        evaluate(params, refine, infer, out)
    (infer / "samples.json").write_text(json.dumps(samples))
    real = Params.model_validate({**eval_params().model_dump(), "model": {"base": "some/real-model"}})
    with pytest.raises(ModelNotFoundError, match="evaluate.tiny=true"):
        evaluate(real, refine, infer, out)
    assert not out.exists() and not (tmp_path / "evaluate.partial").exists()


def test_a_failed_rerun_keeps_the_earlier_complete_output(tmp_path):
    params = eval_params(prompt_sets=["prompt-invariant"])
    refine, infer = make_run(tmp_path, params)
    out = evaluate(params, refine, infer, tmp_path / "evaluate")
    before = (out / "metrics.json").read_text()
    shutil.rmtree(refine / "images")
    with pytest.raises(SubjectopsError, match="reference images are missing"):
        evaluate(params, refine, infer, out)
    assert (out / "metrics.json").read_text() == before


def test_metrics_subset_and_clip_fid_features(tmp_path):
    params = eval_params(prompt_sets=["prompt-invariant"])
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"metrics": ["clip-t", "fid"], "fid_features": "clip"})})
    refine, infer = make_run(tmp_path, params)
    m = json.loads((evaluate(params, refine, infer, tmp_path / "ev") / "metrics.json").read_text())
    assert sorted(r["metric"] for r in m["metrics"]) == ["CLIP-T", "FID"]
    assert set(m["backbones"]) == {"clip"} and m["fid_features"] == "clip"
    assert "clip features" in [r for r in m["metrics"] if r["metric"] == "FID"][0]["note"]


def test_cli_evaluate_run_dir_ends_with_the_report_path(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from subjectops.cli import app

    params = eval_params(prompt_sets=["prompt-invariant"])
    refine, infer = make_run(tmp_path / "run", params)
    # infer's manifest records the tiny base model: evaluate.tiny=auto follows it even without --model
    (infer / "manifest.json").write_text(json.dumps({"params": {"model": {"base": "tiny-sd15"}}}))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--set", "infer.prompt_invariant.num_images=4",
                                   "--set", "evaluate.metrics=[dino, ssim]"])
    assert res.exit_code == 0, res.output
    report = tmp_path / "run" / "evaluate" / "report.html"
    assert report.is_file()
    # a run folder without its finetune output is scored all the same, and its report says what is missing
    assert f"no finetune output at {tmp_path / 'run' / 'finetune'}" in report.read_text()
    assert res.output.replace("\n", "").strip().endswith(str(report))  # rich wraps long lines
    m = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())
    assert sorted({r["metric"] for r in m["metrics"]}) == ["DINO", "SSIM"]
    # without the tiny record, the default real encoders are missing: a clear error, exit 2
    (infer / "manifest.json").write_text("{}")
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run")])
    assert res.exit_code == 2 and "evaluate.tiny=true" in res.output.replace("\n", " ")


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_images_from_any_offline_preset_get_tiny_encoders(tmp_path, preset):
    """evaluate.tiny=auto follows models.tiny.TINY_PRESETS (small-sd15 too): random-weight images never
    reach the real encoders, which would be missing offline anyway."""
    params = Params.model_validate({"model": {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
                                    "infer": {"prompt_sets": ["prompt-invariant"],
                                              "prompt_invariant": {"num_images": 2}},
                                    "evaluate": {"metrics": ["dino"]}})
    refine, infer = make_run(tmp_path, params)
    (infer / "manifest.json").write_text(json.dumps({"params": {"model": {"base": preset}}}))
    out = evaluate(params, refine, infer, tmp_path / "evaluate")
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["random_backbones"] is True and doc["backbones"]["dino"]["id"] == "tiny"
    assert doc["metrics"][0]["pretrained"] is False
