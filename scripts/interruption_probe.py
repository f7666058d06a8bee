"""Issue 23's interruption table: kill -9 and SIGTERM in each stage, on a cold and a warm class-prior cache, then
the same command again; prints one markdown row per case.

Each case starts `subjectops run` on tiny-sd15 with Hypnos (so the plan has priors, pretrain-disc, finetune,
infer, sweep and evaluate) and short schedules, sends the signal once the stage is at work, runs the same command
again and reports: the first exit code, whether the second finished, which stages that had finished before the
signal were made again, and max |dw| of the final finetune weights against one uninterrupted run.

    nice -n 19 env OMP_NUM_THREADS=1 python scripts/interruption_probe.py --root /tmp/probe [--stages infer,...]

A case costs two tiny runs (minutes on 2 shared CPU cores); --stages, --signals and --caches pick a subset.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("priors", "pretrain_disc", "finetune", "infer", "sweep", "evaluate")
SIGNALS = {"SIGTERM": signal.SIGTERM, "kill -9": signal.SIGKILL}
# pretrain-disc at 400 steps (a few seconds): at 40 it ended before a signal could land in it
SETS = ["model.base=tiny-sd15", "finetune.method=hypnos", "priors.num_images=4", "priors.steps=2",
        "priors.batch_size=1", "pretrain_disc.steps=400", "pretrain_disc.model.dim=32",
        "pretrain_disc.variants_per_type=2", "pretrain_disc.eval_samples=0", "finetune.hypnos.steps=8",
        "finetune.hypnos.perceptual_steps=2", "finetune.checkpoint_every=2", "finetune.log_every=1",
        "finetune.snapshots=[4,8]", "infer.steps=2", "infer.prompt_invariant.num_images=4"]
TIMEOUT = 3600  # seconds for one run of the pipeline


def command(subject: Path, class_word: str, out: Path, cache: Path) -> list[str]:
    sets = [*SETS, f"priors.cache_dir={cache}"]
    return [sys.executable, "-m", "subjectops.cli", "run", str(subject), "--class", class_word, "--out", str(out),
            "--no-track", "--params", str(REPO / "params.yaml"), *[a for s in sets for a in ("--set", s)]]


def at_work(stage: str, out: Path, cache: Path) -> bool:
    """Whether `stage` is doing its work now (its files in progress are there)."""
    work = out / f"{stage}.partial"
    marks = {"priors": [*cache.glob("*.partial-*/images/*.png"), *([work] if work.exists() else [])],
             "pretrain_disc": [p for p in [work / "train_log.jsonl"] if p.is_file() and p.stat().st_size],
             "finetune": [p for p in [work / "train_log.jsonl"] if p.is_file() and
                          len(p.read_text().splitlines()) >= 3],
             "infer": list(work.glob("images/*/0000.png")),
             "sweep": list(work.glob("points/*")),
             # evaluate writes nothing until its scores are done: it is at work once sweep's output is there
             "evaluate": [p for p in [out / "sweep" / "manifest.json"] if p.is_file()]}
    return bool(marks[stage])


def finished_files(out: Path) -> dict[str, dict[str, int]]:
    """Each finished stage's files with their mtimes."""
    return {stage: {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in (out / stage).rglob("*")
                    if p.is_file()}
            for stage in ("refine", *STAGES) if (out / stage / "manifest.json").is_file()}


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for f in sorted((out / "finetune").rglob("*.safetensors")):
        for name, tensor in load_file(f).items():
            found[f"{f.relative_to(out).as_posix()}:{name}"] = tensor
    return found


def max_dw(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)


def case(stage: str, sig: str, warm: bool, subject: Path, class_word: str, root: Path, reference: dict,
         warm_cache: Path) -> str:
    temperature = "warm" if warm else "cold"
    name = f"{stage}-{sig.replace(' ', '').replace('-', '')}-{temperature}"
    out, cache = root / name, root / f"{name}-cache"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    if warm:
        shutil.copytree(warm_cache, cache)
    cmd = command(subject, class_word, out, cache)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and not at_work(stage, out, cache) and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        return f"| {stage} | {sig} | {temperature} | {proc.returncode} (ended before the signal) | | | |"
    before = finished_files(out)
    proc.send_signal(SIGNALS[sig])
    first = proc.communicate(timeout=TIMEOUT)[0]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    after = finished_files(out)
    redone = [s for s, files in before.items() if after.get(s) != files]
    resumed = "yes" if again.returncode == 0 else f"no (exit {again.returncode})"
    step = re.search(r"resuming finetune from step (\d+)", again.stdout)
    if step:
        resumed += f", finetune from step {step.group(1)}"
    dw = max_dw(weights(out), reference) if again.returncode == 0 else float("nan")
    said = " ".join(first.split())
    note = said[said.find("error:"):][:90].replace("|", "/") if "error:" in said else ""
    return (f"| {stage} | {sig} | {temperature} | {proc.returncode} {note} | {resumed} | "
            f"{', '.join(redone) or 'nothing'} | {dw:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="work folder (cases' runs and caches)")
    parser.add_argument("--subject", type=Path, default=REPO / "examples" / "subjects" / "teapot")
    parser.add_argument("--class", dest="class_word", default="teapot")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--signals", default=",".join(SIGNALS))
    parser.add_argument("--caches", default="cold,warm")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    ref_out, warm_cache = root / "reference", root / "reference-cache"
    if not (ref_out / "evaluate" / "manifest.json").is_file():
        shutil.rmtree(ref_out, ignore_errors=True)
        shutil.rmtree(warm_cache, ignore_errors=True)
        subprocess.run(command(args.subject, args.class_word, ref_out, warm_cache), cwd=REPO, check=True,
                       capture_output=True, timeout=TIMEOUT)
    reference = weights(ref_out)
    print("| stage | signal | cache | first exit | rerun finished | finished stages made again | max abs dw |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for stage in args.stages.split(","):
        for sig in args.signals.split(","):
            for cache in args.caches.split(","):
                print(case(stage, sig, cache == "warm", args.subject.resolve(), args.class_word, root, reference,
                           warm_cache), flush=True)


if __name__ == "__main__":
    main()
