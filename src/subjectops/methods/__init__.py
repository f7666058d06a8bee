"""Fine-tuning methods as strategies over the shared trainer. Add a method by registering its class here."""

from __future__ import annotations

import json
from pathlib import Path

from subjectops.errors import SubjectopsError
from subjectops.methods.alchemy import AlchemyMethod
from subjectops.methods.base import Method
from subjectops.methods.dreambooth import DreamBoothMethod
from subjectops.methods.hifi_tuner import HiFiTunerMethod
from subjectops.methods.hypnos import HypnosMethod
from subjectops.methods.lora import LoraMethod
from subjectops.methods.textual_inversion import TextualInversionMethod
from subjectops.methods.two_stage import TwoStageMethod

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (DreamBoothMethod, LoraMethod, TextualInversionMethod, TwoStageMethod, HypnosMethod,
                      HiFiTunerMethod, AlchemyMethod)
}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise SubjectopsError(f"unknown method {name!r}", fix=f"choose one of: {', '.join(sorted(METHODS))}") from None


def providers_of(output: str) -> list[str]:
    """The methods whose finetune output provides `output` (`Method.provides`), by name."""
    return sorted(name for name, method in METHODS.items() if output in method.provides)


def require_provides(finetune_dir: Path, info: dict, output: str, stage: str, why: str) -> None:
    """Refuse a finetune output whose method does not provide what `stage` reads (`why` says what it is)."""
    if output not in get_method(info["method"]).provides:
        makers = providers_of(output)
        raise SubjectopsError(f"the run in {Path(finetune_dir).parent} was fine-tuned with {info['method']}; "
                              f"{stage} needs {why} of {', '.join(makers)}",
                              fix=" or ".join(f"pass a run made with --method {m}" for m in makers))


def configured_method(params) -> Method:
    """The configured method without models: what it needs (`requirements`, `required_weights`) is read
    from its config alone."""
    return get_method(params.finetune.method)(params, "", models=None)


def load_finetuned(pipe, finetune_dir: Path) -> dict:
    """Apply a finetune output directory to a freshly loaded base pipeline; returns its method.json."""
    finetune_dir = Path(finetune_dir)
    info_path = finetune_dir / "method.json"
    if not info_path.exists():
        raise SubjectopsError(f"{finetune_dir} is not a finetune output (no method.json)",
                              fix="run `subjectops finetune` first, or pass the right --finetune directory")
    info = json.loads(info_path.read_text())
    check_weights_recorded(finetune_dir)
    try:
        get_method(info["method"]).apply(pipe, finetune_dir, info)
    except (OSError, ValueError) as exc:  # diffusers and transformers report missing weight files so
        raise SubjectopsError(f"cannot load the finetune output {finetune_dir}: {exc}",
                              fix="subjectops loads safetensors weights only; run `subjectops finetune` again",
                              ) from None
    return info


def check_weights_recorded(finetune_dir: Path) -> None:
    """Every file finetune wrote (its manifest's outputs: the weights among them) is still the one it hashed: a
    weight file swapped in a run folder would otherwise be loaded into every image infer makes and register ships."""
    from subjectops.digest import sha256_file

    manifest_path = finetune_dir / "manifest.json"
    try:
        outputs = json.loads(manifest_path.read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SubjectopsError(f"{manifest_path} is missing or unreadable: the weights in {finetune_dir} cannot be "
                              "checked against what finetune wrote",
                              fix="run `subjectops finetune` again for this run") from None
    changed = sorted(name for name, digest in outputs.items()
                     if not (finetune_dir / name).is_file() or sha256_file(finetune_dir / name) != digest)
    if changed:
        raise SubjectopsError(f"{finetune_dir / changed[0]} differs from the file finetune wrote (its hash is not the "
                              f"one {manifest_path} records)"
                              + (f", and {len(changed) - 1} more" if len(changed) > 1 else ""),
                              fix="run `subjectops finetune` again for this run; never edit or replace its weights")


SNAPSHOTS_DIR = "snapshots"


def snapshot_dir(finetune_dir: Path, step: int) -> Path:
    """Where a finetune output keeps its snapshot of `step` (`finetune.snapshots`): a finetune output of its own."""
    return Path(finetune_dir) / SNAPSHOTS_DIR / f"step_{step:06d}"


def snapshot_steps_in(finetune_dir: Path) -> list[int]:
    """The steps of the snapshots a finetune output holds, in order."""
    root = Path(finetune_dir) / SNAPSHOTS_DIR
    return sorted(int(d.name.removeprefix("step_")) for d in root.glob("step_*") if (d / "method.json").is_file())


def require_snapshot(finetune_dir: Path, step: int) -> Path:
    path = snapshot_dir(finetune_dir, step)
    if not (path / "method.json").is_file():
        raise SubjectopsError(f"{finetune_dir} keeps no snapshot of step {step} (it has "
                              f"{snapshot_steps_in(finetune_dir)})",
                              fix=f"add {step} to finetune.snapshots (or pick a kept step) and run finetune again")
    return path
