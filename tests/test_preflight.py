"""The preflight (subjectops.preflight.check_run): before the first stage, everything the plan needs (every weight it
loads, every folder it writes, the tracking server and object store when tracked), all problems listed at once, each
with the key that fixes it."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from servers import free_port
from typer.testing import CliRunner

from subjectops.cli import app
from subjectops.config import load_params
from subjectops.models.tiny import tiny_dir
from subjectops.preflight import check_run, tracking_problems
from subjectops.weights_check import check_weights


def roles(rows) -> dict:
    return {row.key: row for row in rows}


def test_a_run_on_a_local_model_folder_with_an_encoder_missing_fails_before_refine(tmp_path, example_subject):
    """A saved tiny pipeline is a real base model to the plan: evaluate will load the configured DINO, which is not
    here. With a missing SAM checkpoint and an unwritable prior cache as well, all three are listed, with their keys,
    before the run folder exists; `models check` exits 1 on the same config."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    sets = ["evaluate.backbones.clip=tiny", "evaluate.backbones.lpips=tiny", "refine.mask_backend=sam",
            f"refine.sam_checkpoint={tmp_path / 'sam_vit_b.pth'}", f"priors.cache_dir={blocker / 'priors'}"]
    model = str(tiny_dir("tiny-sd15"))
    args = [a for s in sets for a in ("--set", s)]
    run = tmp_path / "run"
    start = time.process_time()
    result = CliRunner().invoke(app, ["run", str(example_subject), "--class", "teapot", "--model", model,
                                      "--out", str(run), "--no-track"] + args)
    cpu_seconds = time.process_time() - start
    assert result.exit_code == 2, result.output
    out = result.output
    assert "3 problem(s) found before any work; nothing was run" in out
    for key in ("[evaluate.backbones.dino]", "[refine.sam_checkpoint]", "[priors.cache_dir]"):
        assert key in out, out
    assert "`hf download facebook/dino-vits16`" in out and "evaluate.backbones.dino=/path/to/folder" in out
    assert not run.exists()  # before refine, before the run folder
    # seconds of work, not the minutes of refine, priors, training and inference before evaluate (CPU time: the
    # wall time of a shared, loaded test machine says little)
    assert cpu_seconds < 20, cpu_seconds

    check = CliRunner().invoke(app, ["models", "check", "--model", model] + args)
    assert check.exit_code == 1, check.output
    missing = [line for line in check.output.splitlines() if line.startswith("missing")]
    assert any("evaluate.backbones.dino = facebook/dino-vits16" in line for line in missing)
    assert any("refine.sam_checkpoint" in line for line in missing)
    assert not any("evaluate.backbones.clip" in line for line in missing)


def test_a_stage_command_checks_the_weights_it_loads(tmp_path):
    """`subjectops evaluate` with a real base model and no encoders: refused before it reads its inputs."""
    model = str(tiny_dir("tiny-sd15"))
    result = CliRunner().invoke(app, ["evaluate", "--refine", str(tmp_path / "r"), "--infer", str(tmp_path / "i"),
                                      "--finetune", str(tmp_path / "f"),
                                      "--out", str(tmp_path / "e"), "--model", model])
    assert result.exit_code == 2, result.output
    assert "[evaluate.backbones.dino]" in result.output and "[evaluate.backbones.clip]" in result.output
    assert "not a complete" not in result.output


def test_evaluate_needs_only_what_its_metrics_use():
    only_pixels = load_params(None, ["evaluate.metrics=[ssim,psnr]"])
    assert [r.key for r in check_weights(only_pixels)] == ["model.base (--model)"]  # the base model alone
    fid = roles(check_weights(load_params(None, ["evaluate.metrics=[fid]"])))
    # FID with fid_features=auto: Inception when present, else DINO features (then DINO is needed)
    assert fid["evaluate.backbones.inception"].optional
    if not fid["evaluate.backbones.inception"].present:
        assert "evaluate.backbones.dino" in fid
    assert "evaluate.backbones.clip" not in fid and "evaluate.backbones.lpips" not in fid
    strict = roles(check_weights(load_params(None, ["evaluate.metrics=[fid]", "evaluate.fid_features=inception"])))
    assert not strict["evaluate.backbones.inception"].optional
    tiny = check_weights(load_params(None, ["model.base=tiny-sd15"]))
    assert all(r.present for r in tiny) and {r.ident for r in tiny if r.stage == "evaluate"} == {"tiny"}
    world = check_weights(load_params(None, ["model.base=world-sd15"]))
    assert all(r.present for r in world) and {r.ident for r in world if r.stage == "evaluate"} == {"world"}


def test_the_method_and_strategy_weights_are_named_by_their_keys(tmp_path):
    rows = roles(check_weights(load_params(None, [
        "finetune.method=hypnos", f"finetune.hypnos.efficientnet={tmp_path / 'b1.pth'}",
        "infer.strategy=alchemy", "infer.alchemy.segmenter=clipseg", f"infer.alchemy.clipseg_model={tmp_path / 'cs'}",
        "evaluate.tiny=true"])))
    assert rows["finetune.hypnos.efficientnet"].missing and rows["finetune.hypnos.efficientnet"].stage == "finetune"
    assert rows["infer.alchemy.clipseg_model"].missing and rows["infer.alchemy.clipseg_model"].stage == "infer"
    guided = roles(check_weights(load_params(None, ["infer.strategy=reference-guided", "evaluate.tiny=true"])))
    assert guided["infer.reference_guided.dino"].ident == "facebook/dino-vits16"
    # `auto` is what infer loads on each base model: the world's shipped DINO-role encoder on the world's models
    for base in ("world-sd15", "world-sdxl"):
        world = roles(check_weights(load_params(None, ["infer.strategy=reference-guided", f"model.base={base}"])))
        assert world["infer.reference_guided.dino"].ident == "world" and world["infer.reference_guided.dino"].present
    tiny = roles(check_weights(load_params(None, ["infer.strategy=reference-guided", "model.base=tiny-sd15"])))
    assert tiny["infer.reference_guided.dino"].ident == "tiny"


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(404)  # any answer is an answer
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_tracking_server_and_object_store_are_checked_when_the_run_is_tracked(tmp_path, answering_server):
    params = load_params(None, ["model.base=tiny-sd15", "tracking.timeout_seconds=2"])
    dead = f"http://127.0.0.1:{free_port()}"
    problems = tracking_problems(params, env={"MLFLOW_S3_ENDPOINT_URL": dead}, tracking_uri=answering_server)
    assert [p.key for p in problems] == ["MLFLOW_S3_ENDPOINT_URL"] and dead in problems[0].what
    problems = tracking_problems(params, tracking_uri=dead, env={})
    assert [p.key for p in problems] == ["--tracking-uri"] and "--no-track" in problems[0].fix
    # a local store: its folder must be writable
    blocker = tmp_path / "file"
    blocker.write_text("x")
    problems = tracking_problems(params, tracking_uri=f"sqlite:///{blocker}/sub/mlruns.db", env={})
    assert [p.key for p in problems] == ["--tracking-uri"]
    # untracked: nothing about tracking at all
    assert check_run(params, tmp_path / "run", track=False) == []


def test_run_refuses_an_unreachable_tracking_server_before_any_work(tmp_path, example_subject, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(example_subject), "--class", "teapot", "--model", "tiny-sd15",
                                      "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert "[MLFLOW_TRACKING_URI]" in result.output and "--no-track" in result.output and not run.exists()
