"""Data-parallel fine-tuning: two processes (gloo on CPU, as NCCL would on GPUs) train one model."""

import json
import socket
import subprocess
import sys

from subjectops.stages.priors import priors
from subjectops.stages.refine import refine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_gradients_and_publish_once(tiny_params, tiny_overrides, example_subject, tmp_path):
    run = tmp_path / "run"
    refine(tiny_params, example_subject, "teapot", run / "refine")
    priors(tiny_params, run / "refine", run / "priors")
    sets = [a for s in tiny_overrides + ["finetune.dreambooth.steps=3", "finetune.validation_every=0"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "subjectops.cli", "finetune", "--refine", str(run / "refine"),
           "--priors", str(run / "priors"), "--out", str(run / "finetune"), "--params", "params.yaml", *sets]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    # finetune refuses to publish when the processes end with different weights (gradients not averaged)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run / "finetune" / "method.json").read_text())
    assert info["processes"] == 2
    steps = [json.loads(l)["step"] for l in (run / "finetune" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one log, written by the main process only
