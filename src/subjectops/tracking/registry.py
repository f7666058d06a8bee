"""MLflow model registry: register a run's finetune as a version, and promote `challenger` to `champion`.

Each version carries, as tags, what it was trained and evaluated with (method, base model, inference spec,
prompt sets and their versions, seeds, backbones, every mean), and as an artifact of its run
`evaluation/summary.json`, the numbers promotion compares. The model serves the inference spec the run's
infer stage recorded (strategy, scheduler, steps, guidance, resolution), so it generates what was evaluated. Every
promotion decision is written to
the version's tags (`promotion.*`) with the numbers that led to it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from subjectops.config import Params, RegistryCfg
from subjectops.errors import SubjectopsError
from subjectops.tracking import record as R
from subjectops.tracking.gates import GateDecision, evaluate_gates

CHALLENGER = "challenger"
CHAMPION = "champion"
SUMMARY_ARTIFACT = "evaluation/summary.json"
MODEL_ARTIFACT = "model"
TAG_VALUE_MAX = 5000
VERSION_READY_SECONDS = 120  # MLflow waits this long for a new version to leave PENDING_REGISTRATION


class RegistryError(SubjectopsError):
    pass


def model_name_for(params: Params, run_dir: Path, override: str | None = None) -> str:
    subj = {}
    try:
        subj = json.loads((run_dir / "refine" / "subject.json").read_text())
    except (OSError, ValueError):
        pass
    method = {}
    try:
        method = json.loads((run_dir / "finetune" / "method.json").read_text())
    except (OSError, ValueError):
        pass
    template = override or params.registry.model_name
    try:
        name = template.format(subject=subj.get("name") or run_dir.name,
                               method=method.get("method") or params.finetune.method)
    except (KeyError, IndexError) as exc:
        raise RegistryError(f"registry.model_name {template!r} uses an unknown field {exc}",
                            fix="use only {subject} and {method}") from None
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", name)


def _tag(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return s if len(s) <= TAG_VALUE_MAX else s[: TAG_VALUE_MAX - 3] + "..."


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("subjectops", "torch", "diffusers", "transformers", "peft", "safetensors", "mlflow", "pandas",
                "pillow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs


def infer_manifest(run_dir: Path) -> dict:
    """The infer stage's manifest of `run_dir`: its `inference` spec is what the registered model serves, and its
    params are the ones that generated the evaluated images (current params may have changed since)."""
    manifest_path = Path(run_dir) / "infer" / "manifest.json"
    manifest = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
    if "inference" not in manifest:
        raise RegistryError(
            f"{manifest_path} records no inference spec: the registered model must serve what infer generated and "
            "evaluate scored",
            fix="run the infer stage (again) on this run, then register it",
        )
    return manifest


def model_artifacts(run_dir: Path, spec, base_dir: Path | None) -> dict[str, Path]:
    """The directories packaged with the model: the finetune, each stage output the strategy requires, the base."""
    from subjectops.inference import get_strategy

    # resolved: a chosen operating point's run view links its stage outputs (subjectops.selection.choose)
    artifacts = {stage: (Path(run_dir) / stage).resolve()
                 for stage in sorted(get_strategy(spec.strategy).stage_outputs())}
    missing = [str(d) for d in artifacts.values() if not d.is_dir()]
    if missing:
        raise RegistryError(f"the {spec.strategy!r} inference strategy needs {', '.join(missing)}, which does not "
                            "exist",
                            fix="register the run directory that infer read these stage outputs from")
    if base_dir is not None:
        artifacts["base"] = base_dir
    return artifacts


def register_version(client, params: Params, run_dir: Path, run_id: str, model_name: str | None = None) -> dict:
    """Log the pyfunc model and the evaluation summary to `run_id`, create a version, alias it `challenger`."""
    from subjectops.inference import InferenceSpec

    run_dir = Path(run_dir)
    method, subject = _finetune_and_subject(run_dir)
    name = model_name_for(params, run_dir, model_name)
    summary = R.evaluation_summary(run_dir)
    inferred = infer_manifest(run_dir)
    spec = InferenceSpec.model_validate(inferred["inference"])
    model_config = _model_config(method, subject, spec, inferred["params"])
    source = _log_model(client, run_id, run_dir, spec, model_config, summary)
    _ensure_registered_model(client, name)
    tags = _version_tags(params, run_dir, method, subject, model_config, summary)
    mv = client.create_model_version(
        name, source=source, run_id=run_id, tags={k: _tag(v) for k, v in tags.items() if v is not None},
        description=f"{method.get('method')} on {model_config['base_model']} from {run_dir.name}",
        await_creation_for=VERSION_READY_SECONDS,
    )
    version = str(mv.version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return {"model_name": name, "version": version, "run_id": run_id, "model_uri": f"models:/{name}/{version}",
            "alias_uri": f"models:/{name}@{CHALLENGER}", "source": source, "aliases": [CHALLENGER]}


def _finetune_and_subject(run_dir: Path) -> tuple[dict, dict]:
    """The run's finetune method.json (refused when there is none) and its refined subject.json ({} if absent)."""
    ft = run_dir / "finetune"
    method_json = ft / "method.json"
    if not method_json.is_file():
        raise RegistryError(f"{ft} has no method.json: there is no finetuned model to register",
                            fix="run the finetune stage first")
    subject = {}
    if (run_dir / "refine" / "subject.json").is_file():
        subject = json.loads((run_dir / "refine" / "subject.json").read_text())
    return json.loads(method_json.read_text()), subject


def _model_config(method: dict, subject: dict, spec, infer_params: dict) -> dict:
    """What the served model is built from: the base, the finetune's identity and the inference spec infer used."""
    return {
        "base_model": method.get("base_model") or infer_params["model"]["base"],
        "revision": infer_params["model"]["revision"],
        "method": method.get("method"),
        "identifier": method.get("identifier"),
        "class_word": method.get("class_word") or subject.get("class_word"),
        "instance_prompt": method.get("instance_prompt"),
        "inference": spec.model_dump(mode="json"),
        "seed": infer_params["infer"]["seed"],  # first seed of a request whose rows have none
    }


def _log_model(client, run_id: str, run_dir: Path, spec, model_config: dict, summary: dict) -> str:
    """Log the pyfunc model (with the stage outputs its strategy reads) and the evaluation summary to `run_id`;
    returns the model's artifact URI."""
    from subjectops.config import ModelCfg
    from subjectops.models.loading import is_tiny, is_world, resolve
    from subjectops.tracking.pyfunc import save_pyfunc

    base = model_config["base_model"]
    tmp = Path(tempfile.mkdtemp(prefix="subjectops-register-"))
    try:
        # presets built or shipped by the project travel with the model: a server may have neither
        base_dir = Path(resolve(ModelCfg(base=base))) if is_tiny(base) or is_world(base) else None
        model_dir = save_pyfunc(tmp / MODEL_ARTIFACT, model_artifacts(run_dir, spec, base_dir), model_config,
                                _requirements())
        client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
        summary_file = tmp / "summary.json"
        summary_file.write_text(json.dumps(summary, indent=1, sort_keys=True))
        client.log_artifact(run_id, str(summary_file), "evaluation")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + MODEL_ARTIFACT


def _ensure_registered_model(client, name: str) -> None:
    """The registered model `name`, created unless it exists (another process may create it meanwhile)."""
    try:
        client.get_registered_model(name)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="subjectops personalized text-to-image model")
        except Exception as exc2:  # noqa: BLE001
            if getattr(exc2, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise


def _version_tags(params: Params, run_dir: Path, method: dict, subject: dict, model_config: dict,
                  summary: dict) -> dict:
    """The version's tags: what it was trained and evaluated with, the inference spec, and every mean."""
    records = summary["records"]
    tags = {
        "subjectops.run_dir": str(run_dir.resolve()),
        "subjectops.method": method.get("method"),
        "subjectops.base_model": model_config["base_model"],
        "subjectops.identifier": method.get("identifier"),
        "subjectops.class_word": model_config["class_word"],
        "subjectops.subject": subject.get("name"),
        "subjectops.params_digest": params.digest(),
        "subjectops.evaluated": "true" if records else "false",
        "eval.prompt_sets": summary["prompt_sets"] or sorted({r.get("prompt_set") for r in records}),
        "eval.seeds": summary["seeds"],
        "eval.backbones": sorted({f"{r.get('metric')}={r.get('backbone')}" for r in records}),
        "eval.random_backbones": sorted({str(r.get("backbone")) for r in records
                                         if r.get("pretrained") is not True}) or "none",
        "eval.unverified": summary.get("unverified") or "none",
    }
    tags.update({f"inference.{k}": v for k, v in model_config["inference"].items()})
    for r in records:
        if isinstance(r.get("mean"), (int, float)):
            tags[f"eval.{R.metric_key(r.get('metric'), r.get('prompt_set'), r.get('backbone'))}"] = str(r["mean"])
    return tags


def version_summary(client, name: str, version: str) -> dict:
    mv = client.get_model_version(name, version)
    tmp = Path(tempfile.mkdtemp(prefix="subjectops-summary-"))
    try:
        path = client.download_artifacts(mv.run_id, SUMMARY_ARTIFACT, str(tmp))
        return json.loads(Path(path).read_text())
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(
            f"{name} version {version} has no evaluation summary ({SUMMARY_ARTIFACT} in run {mv.run_id}): "
            f"{str(exc).splitlines()[0]}",
            fix="register versions with `subjectops register RUN_DIR` after the evaluate stage",
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class PromotionResult:
    model_name: str
    version: str
    champion_before: Optional[str]
    promoted: bool
    decision: GateDecision

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "version": self.version, "champion_before": self.champion_before,
                "promoted": self.promoted, **self.decision.to_dict()}


def _alias_version(client, name: str, alias: str) -> Optional[str]:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _existing_version(client, name: str, version: str) -> str:
    """`version` when `name` has it; MLflow answers a missing or non-numeric one with an exception of its own."""
    if not version.isdigit():
        raise RegistryError(f"{version!r} is not a version number", fix=f"pass --version N, a version of {name}")
    try:
        client.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise RegistryError(f"{name} has no version {version}",
                                fix=f"pass the --version of an existing version of {name}, or leave it out to promote "
                                    f"the {CHALLENGER}") from None
        raise
    return version


def promote(client, name: str, cfg: RegistryCfg, version: str | None = None) -> PromotionResult:
    """Move `champion` to `version` (default: the `challenger` alias) when every gate passes.

    The decision, its reasons and the compared numbers are written to the version's tags in every case.
    """
    try:
        client.get_registered_model(name)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model named {name!r}",
                                fix="check the name (`registry.model_name`) or register a run first") from None
        raise
    if version is None:
        version = _alias_version(client, name, CHALLENGER)
        if version is None:
            raise RegistryError(f"{name} has no version with alias {CHALLENGER!r}",
                                fix="pass --version or register a run")
    version = _existing_version(client, name, str(version))
    champion = _alias_version(client, name, CHAMPION)
    if champion == version:
        decision = GateDecision("refused", [f"version {version} is already the champion"], [], False)
        _write_decision(client, name, version, decision, champion, promoted=False, gates_cfg=cfg)
        return PromotionResult(name, version, champion, False, decision)
    challenger_eval = version_summary(client, name, version)
    champion_eval = version_summary(client, name, champion) if champion else None
    decision = evaluate_gates(challenger_eval, champion_eval, cfg)
    promoted = decision.passed
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        if champion:
            client.set_model_version_tag(name, champion, "promotion.superseded_by", version)
    _write_decision(client, name, version, decision, champion, promoted, cfg)
    return PromotionResult(name, version, champion, promoted, decision)


def _write_decision(client, name: str, version: str, decision: GateDecision, champion: Optional[str], promoted: bool,
                    gates_cfg: RegistryCfg) -> None:
    tags = {
        "promotion.decision": "promoted" if promoted else ("refused" if decision.status == "refused" else "rejected"),
        "promotion.status": decision.status,
        "promotion.against": champion or "none",
        "promotion.reasons": "; ".join(decision.reasons) or "all gates passed",
        "promotion.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "promotion.gates_config": [g.model_dump() for g in gates_cfg.gates],
        "promotion.numbers": [
            {k: getattr(g, k)
             for k in ("metric", "prompt_set", "backbone", "challenger", "champion", "improvement", "tolerance",
                       "bound", "passed")}
            for g in decision.gates
        ],
    }
    for g in decision.gates:
        key = "promotion.gate." + R.metric_key(g.metric, g.prompt_set, g.backbone)
        tags[key] = ("pass" if g.passed else "fail") + f": challenger={g.challenger} champion={g.champion} " \
            f"improvement={g.improvement} tolerance={g.tolerance}" + (f" bound={g.bound}"
                                                                      if g.bound is not None else "")
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, _tag(v))
