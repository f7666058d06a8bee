"""Data-parallel fine-tuning: two processes (gloo on CPU, as NCCL would on GPUs) train one model."""

import json
import subprocess
import sys

import pytest
from servers import free_port

from subjectops.config import load_params
from subjectops.stages.pretrain_disc import pretrain_disc
from subjectops.stages.priors import priors
from subjectops.stages.refine import refine

# What DDP must wrap per method: Hypnos trains DreamBooth's UNet and text encoder and, inside the step, its latent
# discriminator (so it covers DreamBooth's case too); HiFi Tuner only its subject embeddings c_s and c_s^t (module
# SubjectEmbeddings). Every one's gradients must be averaged.
PREPARED = {"hypnos": ["UNet2DConditionModel", "CLIPTextModel", "LatentDiscriminator"],
            "hifi-tuner": ["SubjectEmbeddings"]}


@pytest.mark.parametrize("method", sorted(PREPARED))
def test_two_processes_average_gradients_and_publish_once(tiny_overrides, example_subject, tmp_path, method):
    overrides = tiny_overrides + [f"finetune.method={method}", "finetune.dreambooth.steps=3",
                                  "finetune.hypnos.steps=3",
                                  "finetune.hifi_tuner.steps=1", "finetune.hifi_tuner.stepwise_steps=1",
                                  "finetune.hifi_tuner.ddim_steps=2",
                                  "finetune.validation_every=0", "pretrain_disc.steps=2",
                                  "pretrain_disc.eval_samples=0"]
    params = load_params("params.yaml", overrides)
    run = tmp_path / "run"
    refine(params, example_subject, "teapot", run / "refine")
    priors(params, run / "refine", run / "priors")
    disc = []
    if method == "hypnos":
        pretrain_disc(params, run / "refine", run / "priors", run / "pretrain_disc")
        disc = ["--disc", str(run / "pretrain_disc")]
    sets = [a for s in overrides for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "subjectops.cli", "finetune", "--refine", str(run / "refine"),
           "--priors", str(run / "priors"), *disc, "--out", str(run / "finetune"), "--params", "params.yaml", *sets]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    # finetune refuses to publish when the processes end with different weights (gradients not averaged)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run / "finetune" / "method.json").read_text())
    assert info["processes"] == 2
    # DDP (through accelerate's prepare) wrapped every trained module, the discriminator included; each process
    # drew its own batches and noise (seed + rank), so identical final weights (checked by finetune before it
    # publishes) mean the gradients were averaged
    prepared = json.loads((run / "finetune" / "manifest.json").read_text())["prepared"]
    assert prepared == {name: "DistributedDataParallel" for name in PREPARED[method]}
    steps = [json.loads(line)["step"] for line in (run / "finetune" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one log, written by the main process only
