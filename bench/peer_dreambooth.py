"""subjectops against diffusers' examples/dreambooth/train_dreambooth.py (the peer), whole processes timed in turn.

    python bench/peer_dreambooth.py --peer-script /path/to/diffusers/examples/dreambooth/train_dreambooth.py
        [--preset small-sd15] [--resolution 128] [--batch-size 2] [--steps 100] [--class-images 20]
        [--rounds 3] [--only train|priors] [--json out.json]

Two comparisons on the same model directory, refined subject, resolution, batch and steps:
- train: `subjectops finetune` (DreamBooth, no prior preservation) vs the peer with the same learning rate,
  constant schedule, seed and clipping, no prior preservation; both save the trained UNet.
- priors: `subjectops priors` on an empty cache vs the peer generating the same number of class images into an
  empty class directory (`--with_prior_preservation --max_train_steps 0`; it then saves the pipeline, which is
  why the sampling rate is reported too). Each side samples with its own defaults (params.yaml: priors.*; the
  peer: the model's scheduler at the pipeline's 50 steps, batch `--sample_batch_size` 4).

Rounds interleave A B A B ...; each ratio is taken within a round, and the median and range over rounds are
printed. Per process: wall seconds, peak resident memory (the child's own ru_maxrss from wait4), and from
bench/process_timer.py the training loop's steps/s (first to last optimizer step) or the sampling rate (first
pipeline call's start to the last one's end). The peer script is not part of this repository: fetch diffusers
(e.g. `git clone https://github.com/huggingface/diffusers`) and pass the script's path. Its imports (torch,
torchvision, transformers, accelerate, diffusers) are all in subjectops' environment; tensorboard is not needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMER = REPO / "bench" / "process_timer.py"
SUBJECT = REPO / "examples" / "subjects" / "teapot"
CLASS_WORD = "teapot"
LR = 5e-6


def timed_process(cmd: list[str], marks: Path, log: Path) -> dict:
    """Run `cmd` under the process timer; wall seconds, the child's peak RSS in MiB and its marks."""
    full = [sys.executable, str(TIMER), str(marks), *cmd]
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | {"PYTHONPATH": _pythonpath()})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed; its output is in {log}:\n{log.read_text()[-3000:]}")
    return {"wall": wall, "peak_mib": usage.ru_maxrss / 1024, **json.loads(marks.read_text())}


def _pythonpath() -> str:
    # this checkout's subjectops (and bench/) first, whatever is installed
    return os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])


def ours(stage: str, args, refine: Path, out: Path, sets: list[str]) -> list[str]:
    return ["-m", "subjectops.cli", stage, "--refine", str(refine), "--out", str(out), "--model", args.preset,
            "--method", "dreambooth", "--set", f"subject.resolution={args.resolution}",
            *[x for s in sets for x in ("--set", s)]]


def peer(args, model_dir: Path, instance_dir: Path, out: Path, extra: list[str]) -> list[str]:
    return [str(args.peer_script), "--pretrained_model_name_or_path", str(model_dir),
            "--instance_data_dir", str(instance_dir), "--instance_prompt", f"a photo of sks {CLASS_WORD}",
            "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
            "--learning_rate", str(LR), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--seed", "42", "--max_grad_norm", "1.0", "--mixed_precision", "no",
            "--checkpointing_steps", "1000000", "--output_dir", str(out), *extra]


def pairs(args, tmp: Path, refine: Path, model_dir: Path) -> dict[str, tuple]:
    """Per comparison: (make ours' command, make the peer's command, the rate key, its unit count)."""
    instance_dir = refine / "images"

    def train_ours(r: int):
        return ours("finetune", args, refine, tmp / f"ft-ours-{r}", [
            f"finetune.dreambooth.steps={args.steps}", f"finetune.batch_size={args.batch_size}",
            "finetune.dreambooth.prior_preservation=false", f"finetune.dreambooth.lr={LR}",
            "finetune.checkpoint_every=0", "finetune.validation_every=0"])

    def train_peer(r: int):
        return peer(args, model_dir, instance_dir, tmp / f"ft-peer-{r}", ["--max_train_steps", str(args.steps)])

    def priors_ours(r: int):
        return ours("priors", args, refine, tmp / f"pr-ours-{r}", [
            f"priors.num_images={args.class_images}", f"priors.cache_dir={tmp / f'pr-cache-{r}'}"])

    def priors_peer(r: int):
        return peer(args, model_dir, instance_dir, tmp / f"pr-peer-{r}", [
            "--with_prior_preservation", "--class_data_dir", str(tmp / f"pr-class-{r}"),
            "--class_prompt", f"a photo of a {CLASS_WORD}", "--num_class_images", str(args.class_images),
            "--max_train_steps", "0"])

    return {"train": (train_ours, train_peer, "loop_seconds", args.steps - 1, "steps/s"),
            "priors": (priors_ours, priors_peer, "sampling_seconds", args.class_images, "images/s")}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} (range {min(values):.3g}-{max(values):.3g})"


def compare(name: str, make_ours, make_peer, rate_key: str, units: int, unit: str, rounds: int, tmp: Path) -> dict:
    rows = {"ours": [], "peer": []}
    for r in range(rounds):
        for side, make in (("ours", make_ours), ("peer", make_peer)):
            m = timed_process(make(r), tmp / f"{name}-{side}-{r}.json", tmp / f"{name}-{side}-{r}.log")
            m["rate"] = units / m[rate_key] if m[rate_key] else float("nan")
            rows[side].append(m)
            print(f"  round {r + 1} {name} {side:4s}: wall {m['wall']:6.1f} s  {m['rate']:8.3g} {unit}  "
                  f"peak {m['peak_mib']:6.0f} MiB", flush=True)
    o, p = rows["ours"], rows["peer"]
    result = {
        "wall_speedup": [b["wall"] / a["wall"] for a, b in zip(o, p)],
        "rate_ratio": [a["rate"] / b["rate"] for a, b in zip(o, p)],
        "peak_ratio": [a["peak_mib"] / b["peak_mib"] for a, b in zip(o, p)],
        "ours": o, "peer": p,
    }
    print(f"{name}: subjectops vs peer over {rounds} interleaved rounds, median (range)\n"
          f"  wall          ours {spread([m['wall'] for m in o])} s, peer {spread([m['wall'] for m in p])} s"
          f"  -> x{spread(result['wall_speedup'])} faster\n"
          f"  {unit:13s} ours {spread([m['rate'] for m in o])}, peer {spread([m['rate'] for m in p])}"
          f"  -> x{spread(result['rate_ratio'])}\n"
          f"  peak memory   ours {spread([m['peak_mib'] for m in o])} MiB, peer {spread([m['peak_mib'] for m in p])} "
          "MiB"
          f"  -> x{spread(result['peak_ratio'])} of the peer's", flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-script", type=Path, help="diffusers' examples/dreambooth/train_dreambooth.py")
    ap.add_argument("--preset", default="small-sd15")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--class-images", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("train", "priors"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.peer_script is None or not args.peer_script.is_file():
        print("No peer script given. Fetch diffusers (git clone https://github.com/huggingface/diffusers, ideally the "
              "tag of the installed diffusers version) outside this repository and run\n"
              "  python bench/peer_dreambooth.py --peer-script "
              "/path/to/diffusers/examples/dreambooth/train_dreambooth.py")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from subjectops.config import load_params
    from subjectops.models.tiny import tiny_dir
    from subjectops.stages.refine import refine

    results = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        params = load_params(REPO / "params.yaml",
                             [f"model.base={args.preset}", f"subject.resolution={args.resolution}"])
        refine_dir = refine(params, SUBJECT, CLASS_WORD, tmp / "refine")
        model_dir = tiny_dir(args.preset)
        for name_, (make_ours, make_peer, key, units, unit) in pairs(args, tmp, refine_dir, model_dir).items():
            if args.only in (None, name_):
                results[name_] = compare(name_, make_ours, make_peer, key, units, unit, args.rounds, tmp)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
