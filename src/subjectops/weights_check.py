"""`subjectops models check` and the run's preflight: every weight the configured plan will load (the base model,
the weights the method declares, the segmentation backend's, what the inference strategy loads, every encoder
evaluate will load), each with the params key (or flag) that names it, and whether it is on this machine.

Nothing is loaded or downloaded: a directory is looked into, a hub id is looked up in the local hub cache, a weight
file is looked for where its loader looks. What evaluate loads follows `metrics.encoders.Encoders`: tiny random
encoders for the offline presets, the world's encoders for the world's models, else the configured backbones, and
only those the configured metrics use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from subjectops import world
from subjectops.config import Params
from subjectops.errors import ModelNotFoundError
from subjectops.methods import configured_method
from subjectops.models.loading import how_to_provide, is_tiny, is_world

BASE_KEY = "model.base (--model)"


@dataclass
class WeightStatus:
    purpose: str
    ident: str
    present: bool
    how: str
    key: str = ""  # the params key (or flag) that names it: what to set to provide it
    stage: str = ""  # the stage that loads it
    optional: bool = False  # absent is fine: a fallback runs instead (the `how` says which)

    @property
    def missing(self) -> bool:
        """Absent and needed: the run would fail when `stage` loads it."""
        return not self.present and not self.optional


def _in_hub_cache(ident: str, filename: str, cache_dir: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(ident, filename, cache_dir=cache_dir), str)
    except Exception:  # noqa: BLE001 - a malformed id is not in the cache either
        return False


def hub_present(ident: str, cache_dir: Optional[str] = None, marker: str = "config.json") -> bool:
    """A saved folder (holding `marker`), or a hub id whose snapshot (its `marker` file) is in the local hub cache.
    No network is used."""
    path = Path(ident).expanduser()
    if path.exists() or ident.startswith((".", "/", "~")) or ident.count("/") > 1:  # a directory, not a hub id
        return (path / marker).is_file()
    return _in_hub_cache(ident, marker, cache_dir)


def _found(locate: Callable[[], object]) -> bool:
    """Whether a weight-file lookup finds its file (lookups raise or return None when it is absent)."""
    try:
        return locate() is not None
    except ModelNotFoundError:
        return False


def base_model(params: Params) -> WeightStatus:
    base = params.model.base
    if is_tiny(params.model):
        return WeightStatus("base model", base, True, "built offline with random weights (plumbing only)", BASE_KEY)
    if is_world(params.model):
        return WeightStatus("base model", base, _found(lambda: world.model_dir(base)),
                            "pretrained on the miniature world: run `subjectops world build`", BASE_KEY)
    return WeightStatus("base model", base, hub_present(base, params.model.cache_dir, "model_index.json"),
                        how_to_provide(base), BASE_KEY)


def _sam(checkpoint: Optional[str], key: str, stage: str, purpose: str) -> WeightStatus:
    return WeightStatus(purpose, checkpoint or "(unset)", bool(checkpoint) and Path(checkpoint).expanduser().is_file(),
                        f"download a segment-anything checkpoint (.pth, e.g. sam_vit_b_01ec64.pth) on a machine with "
                        f"network access and set {key}=/path/to/it", key, stage)


def _encoder(role: str, ident: str, key: str, stage: str, cache_dir: Optional[str], purpose: str) -> WeightStatus:
    from subjectops.metrics.backbones import how_to_provide as how_encoder

    if ident == "tiny":
        return WeightStatus(purpose, ident, True, "built offline with random weights (numbers measure nothing)",
                            key, stage)
    if ident == "world":
        return WeightStatus(purpose, ident, _found(lambda: world.encoder_dir(role.lower())),
                            "shipped with the miniature world: run `subjectops world build`", key, stage)
    return WeightStatus(purpose, ident, hub_present(ident, cache_dir), how_encoder(role, ident, key), key, stage)


def evaluate_weights(params: Params, generated_by: Optional[str] = None) -> list[WeightStatus]:
    """Every encoder evaluate will load for the configured metrics (as `metrics.encoders.Encoders` decides)."""
    from subjectops.metrics import backbones as B
    from subjectops.metrics.encoders import tiny_mode, world_mode

    cfg, stage = params.evaluate, "evaluate"
    bb, metrics, cache = cfg.backbones, set(cfg.metrics), params.model.cache_dir
    tiny, in_world = tiny_mode(params, generated_by), world_mode(params, generated_by)
    preset = "tiny" if tiny else B.WORLD if in_world else None
    rows: list[WeightStatus] = []
    fid = cfg.fid_features if "fid" in metrics else None
    if fid == "auto":
        fid = "judge" if in_world else "dino" if tiny else "inception?"  # inception when present, else dino
    elif fid == "inception" and tiny:
        fid = "dino"
    inception_present = True
    if fid in ("inception", "inception?"):
        explicit = bb.inception not in ("auto", "none", "", "null")
        inception_present = _found(lambda: B.find_inception(bb.inception))
        required = fid == "inception" or explicit  # a path that does not exist fails even under auto
        rows.append(WeightStatus(
            "Inception (FID features)", bb.inception, inception_present,
            f"put torch-fidelity's {B.INCEPTION_FILE} in {B.hub_checkpoint(B.INCEPTION_FILE).parent} or set "
            "evaluate.backbones.inception=/path/to/it" + ("" if required else
                                                          "; without it FID uses DINO features"),
            "evaluate.backbones.inception", stage, optional=not required))
    fid_on_dino = fid == "dino" or (fid == "inception?" and not inception_present)
    if {"dino", "dino-subject"} & metrics or fid_on_dino:
        rows.append(_encoder("DINO", preset or bb.dino, "evaluate.backbones.dino", stage, cache,
                             "DINO metric encoder"))
    if {"clip-i", "clip-t", "clip-i-subject"} & metrics or fid == "clip":
        rows.append(_encoder("CLIP", preset or bb.clip, "evaluate.backbones.clip", stage, cache,
                             "CLIP metric encoder"))
    if "lpips" in metrics:
        rows.append(_lpips(preset or bb.lpips, stage))
    if in_world or fid == "judge":
        rows.append(_encoder("judge", B.WORLD, "evaluate.fid_features", stage, cache, "world judge (FID features)"))
    if {"dino-subject", "clip-i-subject"} & metrics and params.refine.mask_backend == "sam":
        rows.append(_sam(params.refine.sam_checkpoint, "refine.sam_checkpoint", stage,
                         "SAM masks (subject-region metrics)"))
    return rows


def _lpips(setting: str, stage: str) -> WeightStatus:
    key, purpose = "evaluate.backbones.lpips", "LPIPS backbone"
    if setting in ("tiny", "world"):
        return _encoder("judge" if setting == "world" else "LPIPS", setting, key, stage, None, purpose)
    from subjectops.metrics.backbones import LPIPS_NETS, hub_checkpoint

    if setting not in LPIPS_NETS:
        return WeightStatus(purpose, setting, False, "use alex, vgg, squeeze, tiny or world", key, stage)
    import torchvision

    file = hub_checkpoint(Path(torchvision.models.get_model_weights(LPIPS_NETS[setting]).DEFAULT.url).name)
    return WeightStatus(purpose, f"{setting} ({file.name})", file.is_file(),
                        f"copy torchvision's {file.name} into {file.parent} (or set TORCH_HOME), or set {key}=tiny "
                        "for a smoke test", key, stage)


def infer_weights(params: Params) -> list[WeightStatus]:
    """What the inference strategy loads besides the base model and the finetuned weights."""
    strategy, rows = params.infer.strategy, []
    if strategy == "alchemy":
        cfg = params.infer.alchemy
        if cfg.segmenter == "clipseg":
            rows.append(WeightStatus("CLIPSeg (alchemy segmenter)", cfg.clipseg_model,
                                     hub_present(cfg.clipseg_model, params.model.cache_dir),
                                     f"copy {cfg.clipseg_model} (folder or hub cache) here, or set "
                                     "infer.alchemy.segmenter=auto (GrabCut when CLIPSeg is absent)",
                                     "infer.alchemy.clipseg_model", "infer"))
        elif cfg.segmenter == "sam":
            rows.append(_sam(cfg.sam_checkpoint, "infer.alchemy.sam_checkpoint", "infer", "SAM (alchemy segmenter)"))
    elif strategy == "reference-guided":
        from subjectops.inference.reference_guided import dino_model

        cfg = params.infer.reference_guided
        dino = dino_model(cfg.dino, params.model.base)  # what infer loads: `auto` resolves per base model there
        rows.append(_encoder("DINO", dino, "infer.reference_guided.dino", "infer", params.model.cache_dir,
                             "DINO (reference choice)"))
        if cfg.captioner:
            rows.append(WeightStatus("captioner (reference-guided)", cfg.captioner,
                                     hub_present(cfg.captioner, params.model.cache_dir),
                                     "copy the BLIP-2 model (folder or hub cache) here, or set "
                                     "infer.reference_guided.captioner=null (the class template)",
                                     "infer.reference_guided.captioner", "infer"))
    return rows


def check_weights(params: Params, stages: Optional[set[str]] = None,
                  generated_by: Optional[str] = None) -> list[WeightStatus]:
    """Every weight the plan of `params` loads (or only those of `stages`), with its key and whether it is here.
    `generated_by`: the base model infer recorded, which evaluate's encoders follow (`evaluate.tiny=auto`)."""
    from subjectops.stages.plan import plan

    planned = set(plan(params).names)
    wanted = planned if stages is None else planned & set(stages)
    rows: list[WeightStatus] = []
    if wanted & {"priors", "pretrain_disc", "finetune", "infer", "sweep"} or stages is None:
        rows.append(base_model(params))
    if "refine" in wanted and params.refine.mask_backend == "sam":
        rows.append(_sam(params.refine.sam_checkpoint, "refine.sam_checkpoint", "refine", "SAM masks"))
    if "finetune" in wanted:  # the method says which weights it loads, from its config (an ablated loss: none)
        rows += [WeightStatus(need.purpose, need.ident, _found(need.locate), need.how, need.key, "finetune")
                 for need in configured_method(params).required_weights()]
    if wanted & {"infer", "sweep"}:
        rows += infer_weights(params)
    if "evaluate" in wanted:
        rows += evaluate_weights(params, generated_by)
    unique: dict[tuple[str, str], WeightStatus] = {}
    for row in rows:  # one file loaded by two stages (refine's SAM, also evaluate's subject regions) is one line
        seen = unique.setdefault((row.key, row.ident), row)
        if seen is not row and row.stage not in seen.stage.split(", "):
            seen.stage = f"{seen.stage}, {row.stage}"
    return list(unique.values())
